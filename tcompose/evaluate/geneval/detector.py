"""GenEval's detector through transformers: a COCO instance-segmentation Mask2Former, its detections named with
GenEval's object names and coloured by :class:`.colors.ColorClassifier`.

    det = Mask2FormerDetector.load("facebook/mask2former-swin-small-coco-instance", device="cuda")
    found = det.detect(images, [["car", "dog"]], threshold=0.3)
    found[0].labels, found[0].scores, found[0].boxes, found[0].colors

GenEval ran mmdet 2.x's ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco`` checkpoint; transformers' Mask2Former
ports (``facebook/mask2former-swin-small-coco-instance``, the default) are detectron2's Swin-S COCO instance
model, another training run of the same architecture: the same rules give close, not identical, scores. What is
done here follows mmdet's test path for that config (``MaskFormerFusionHead.simple_test`` and
``instance_postprocess``):

- preprocessing: resize keeping the aspect ratio so the short side is ``size`` (800) and the long side at most
  ``size x 1333 / 800``, bilinear, rounded to uint8 as OpenCV returns it; normalise with the checkpoint's mean
  and std (ImageNet's, x 255); pad bottom and right with 0 to a multiple of 32;
- post-processing: class probabilities = softmax over the classes and "no object", the last dropped; the 100
  best (query, class) pairs; each pair's mask = its query's mask logits resized (bilinear, half-pixel) to the
  padded input, cropped to the resized image, resized to the original image, ``> 0``; score = class
  probability x the mean sigmoid inside the mask; box = the mask's extent ``[x0, y0, x_last + 1, y_last + 1]``.

Pairs scoring above ``threshold`` are returned, labelled with GenEval's name of their COCO class
(:func:`geneval_label`); those whose name the prompt includes get a colour (CLIP zero-shot on the mask, as
GenEval's evaluator does). :func:`tcompose.testing.tiny_detectors.write_tiny_mask2former` writes a random one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ...io.errors import UserError
from ...models.defaults import CLIP, MASK2FORMER
from ..detect import Detections, _to_uint8_hwc, resolve_dtype
from .prompts import GENEVAL_OBJECTS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: mmdet's test scale for GenEval's config: (1333, 800), the short side's 800 being ``size``.
SIZE, LONG_OVER_SHORT = 800, 1333 / 800
MAX_PER_IMAGE = 100

#: COCO label spellings in detector configs -> GenEval's object names (names already GenEval's map to themselves).
ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard", "tvmonitor": "tv",
           "tv monitor": "tv", "diningtable": "dining table", "pottedplant": "potted plant", "sofa": "couch",
           "motorbike": "motorcycle", "aeroplane": "airplane", "hair dryer": "hair drier", "doughnut": "donut",
           "cellphone": "cell phone", "wineglass": "wine glass", "teddybear": "teddy bear"}


def geneval_label(label: str) -> str | None:
    """GenEval's object name of a detector's COCO label (``"dining_table"`` -> ``"dining table"``, ``"mouse"`` ->
    ``"computer mouse"``); None for a label that is none of GenEval's 80 (a panoptic model's stuff classes)."""
    key = " ".join(label.lower().replace("_", " ").replace("-", " ").split())
    key = ALIASES.get(key, key)
    return key if key in GENEVAL_OBJECTS else None


@dataclass
class ColoredDetections(Detections):
    """:class:`tcompose.evaluate.detect.Detections` with ``colors[i]`` (one of GenEval's colours, or None where
    the prompt does not include the object's class)."""

    colors: list[str | None] = field(default_factory=list)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``[N, H, W]`` bool -> ``[N, 4]`` float: each mask's ``[x0, y0, x_last + 1, y_last + 1]`` (mmdet's
    ``mask2bbox``; an empty mask gives zeros)."""
    n, h, w = masks.shape
    xs, ys = masks.any(dim=1), masks.any(dim=2)
    ar_x = torch.arange(w, device=masks.device)
    ar_y = torch.arange(h, device=masks.device)
    x0 = torch.where(xs, ar_x, w).amin(dim=1)
    x1 = torch.where(xs, ar_x, -1).amax(dim=1) + 1
    y0 = torch.where(ys, ar_y, h).amin(dim=1)
    y1 = torch.where(ys, ar_y, -1).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return torch.where((xs.any(dim=1))[:, None], boxes, torch.zeros_like(boxes))


class Mask2FormerDetector:
    """A ``Mask2FormerForUniversalSegmentation`` on one device with a colour classifier; the detector of
    ``tcompose geneval`` (the interface of :class:`tcompose.evaluate.detect.Owlv2Detector`)."""

    model_type = "mask2former"
    kind = "Mask2Former"
    default = MASK2FORMER
    size = SIZE
    clip = CLIP
    clip_revision: str | None = None

    def __init__(self, model, colors, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, size: int = SIZE):
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device, dtype).eval()
        self.colors = colors
        self.mean = torch.tensor(mean, device=self.device).view(3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(3, 1, 1) * 255
        self.size = size
        id2label = {int(k): v for k, v in model.config.id2label.items()}
        self.labels = [geneval_label(id2label[i]) for i in range(len(id2label))]

    @classmethod
    def configured(cls, size: int = SIZE, clip: str = CLIP, clip_revision: str | None = None):
        """This class with another input ``size`` (short side) and colour CLIP, for ``run_models``."""
        return type(cls.__name__, (cls,), {"size": size, "clip": clip, "clip_revision": clip_revision})

    @classmethod
    def check(cls, name: str, revision: str | None = None) -> None:
        """Read the config only: a checkpoint of another kind, or one whose labels miss GenEval's objects, fails
        before any image is made."""
        from transformers import AutoConfig

        from ...models.loading import pretrained

        hint = f"pass a COCO instance-segmentation Mask2Former such as {cls.default}"
        try:
            config = pretrained(AutoConfig.from_pretrained, name, revision, f"{cls.kind} detector")
        except (OSError, ValueError) as err:
            raise UserError(f"--detector {name}: no readable model config there ({str(err).splitlines()[0]}); "
                            f"{hint}") from None
        if config.model_type != cls.model_type:
            raise UserError(f"--detector {name}: model_type {config.model_type!r} is not a {cls.kind}; {hint}")
        covered = {geneval_label(v) for v in config.id2label.values()} - {None}
        if len(covered) < len(GENEVAL_OBJECTS):
            missing = sorted(set(GENEVAL_OBJECTS) - covered)
            raise UserError(f"--detector {name}: its labels name {len(covered)} of GenEval's {len(GENEVAL_OBJECTS)} "
                            f"objects (missing e.g. {', '.join(missing[:3])}); {hint}")

    @classmethod
    def load(cls, name: str | None = None, revision: str | None = None, device: str | None = None,
             dtype: str = "auto"):
        """Weights from a hub id or local folder (default :attr:`default`), with :attr:`clip` for colours.
        ``dtype``: ``auto`` (fp16 on CUDA, fp32 elsewhere), ``fp32``, ``fp16``, ``bf16`` (the detector's; CLIP
        runs in the same)."""
        from transformers import Mask2FormerForUniversalSegmentation

        from ...models.loading import local_path, pretrained, tf_dtype_kwargs
        from .colors import ColorClassifier

        name = name or cls.default
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = resolve_dtype(dtype, device)
        model = pretrained(Mask2FormerForUniversalSegmentation.from_pretrained, name, revision,
                           f"{cls.kind} detector", **tf_dtype_kwargs(torch_dtype))
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        local = local_path(name)
        if local is not None and (local / "preprocessor_config.json").is_file():
            pre = json.loads((local / "preprocessor_config.json").read_text())
            mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
        colors = ColorClassifier.load(cls.clip, cls.clip_revision, device, torch_dtype)
        return cls(model, colors, device, torch_dtype, mean, std, cls.size)

    def resized_shape(self, h: int, w: int) -> tuple[int, int]:
        """mmcv's ``imrescale`` to (``size x 1333 / 800``, ``size``): (height, width) after resizing."""
        scale = min(self.size * LONG_OVER_SHORT / max(h, w), self.size / min(h, w))
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def preprocess(self, arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """``[B, 3, H, W]`` normalised, zero-padded to a multiple of 32, and each image's resized (h, w)."""
        xs, shapes = [], []
        for arr in arrays:
            x = torch.from_numpy(arr.copy()).to(self.device).permute(2, 0, 1).float()[None]
            shape = self.resized_shape(*arr.shape[:2])
            if shape != tuple(arr.shape[:2]):
                x = torch.nn.functional.interpolate(x, size=shape, mode="bilinear", align_corners=False)
                x = x.round().clamp(0, 255)
            xs.append((x[0] - self.mean) / self.std)
            shapes.append(shape)
        ph = -(-max(s[0] for s in shapes) // 32) * 32
        pw = -(-max(s[1] for s in shapes) // 32) * 32
        batch = torch.zeros(len(xs), 3, ph, pw, device=self.device)
        for i, x in enumerate(xs):
            batch[i, :, :x.shape[1], :x.shape[2]] = x
        return batch.to(self.dtype), shapes

    @torch.inference_mode()
    def detect(self, images: Sequence[Any], names: Sequence[Sequence[str]], threshold: float = 0.3
               ) -> list[ColoredDetections]:
        """Detect every COCO class in ``images[i]``; keep (query, class) pairs scoring > ``threshold``, and colour
        those whose GenEval name is in ``names[i]``."""
        if len(images) != len(names):
            raise ValueError(f"{len(images)} images but {len(names)} name lists")
        if not images:
            return []
        arrays = [_to_uint8_hwc(im) for im in images]
        pixels, shapes = self.preprocess(arrays)
        out = self.model(pixel_values=pixels)
        return [self._postprocess(out.class_queries_logits[i].float(), out.masks_queries_logits[i].float(),
                                  pixels.shape[-2:], shapes[i], arr, set(want), threshold)
                for i, (arr, want) in enumerate(zip(arrays, names))]

    def _postprocess(self, logits: torch.Tensor, mask_logits: torch.Tensor, padded, shape, arr: np.ndarray,
                     want: set[str], threshold: float) -> ColoredDetections:
        num_classes = logits.shape[-1] - 1
        probs = logits.softmax(dim=-1)[:, :-1].flatten()
        top, index = probs.topk(min(MAX_PER_IMAGE, probs.numel()), sorted=False)
        keep = top > threshold  # the score is this probability times a mean sigmoid <= 1: nothing else can pass
        top, index = top[keep], index[keep]
        classes, queries = index % num_classes, index // num_classes
        if not len(index):
            return ColoredDetections()
        masks = torch.nn.functional.interpolate(mask_logits[queries][None], size=tuple(padded), mode="bilinear",
                                                align_corners=False)[:, :, :shape[0], :shape[1]]
        masks = torch.nn.functional.interpolate(masks, size=arr.shape[:2], mode="bilinear", align_corners=False)[0]
        binary = masks > 0
        mask_score = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        scores = top * mask_score
        boxes = mask_boxes(binary)
        result = ColoredDetections()
        picked = []
        for j in (scores > threshold).nonzero().flatten().tolist():
            label = self.labels[int(classes[j])]
            if label is None:
                continue
            picked.append(j)
            result.labels.append(label)
            result.scores.append(float(scores[j]))
            result.boxes.append(boxes[j].tolist())
        result.colors = [None] * len(picked)
        for label in want:
            which = [n for n, j in enumerate(picked) if result.labels[n] == label]
            if which:
                objects = [(result.boxes[n], binary[picked[n]].cpu().numpy()) for n in which]
                for n, color in zip(which, self.colors.classify(arr, objects, label)):
                    result.colors[n] = color
        return result
