"""Open-vocabulary detection with OWLv2 (MultiGen's detector) and OWL-ViT (VISOR's), transformers' models,
batched on the device.

Runbook::

    det = Owlv2Detector.load("google/owlv2-large-patch14-ensemble", device="cuda")   # or a local folder
    found = det.detect(images, [["cat", "dog"], ["book", "cup", "kite"]], threshold=0.01)
    found[0].labels, found[0].scores, found[0].boxes   # names, sigmoid scores, [x0, y0, x1, y1] in pixels

Each image gets its own queries, one per category name, worded ``"a photo of a {name}"``
(:func:`query_text`). Each predicted box keeps its best query as its label and ``sigmoid(max logit)`` as its
score; boxes with score strictly above ``threshold`` are kept. That is transformers'
``Owlv2ImageProcessor.post_process_object_detection``, which the TokenCompose reference used.

Preprocessing happens here, in torch, batched, on the device (the PIL backend of transformers' processor
runs scipy on one CPU core, about 0.2 s per 512 px image, slower than the detector on a GPU; its torchvision
backend needs torchvision). Same steps and, up to float rounding, the same pixels as
``Owlv2ImageProcessorPil``: rescale to [0, 1]; pad bottom and right to a square with 0; resize to the
model's ``vision_config.image_size`` (960 for base/16, 1008 for large/14) with a Gaussian anti-aliasing filter
when shrinking (sigma = (factor - 1) / 2, truncated at 4 sigma, mirrored edges) then linear interpolation
with half-pixel centres and mirrored edges, clipped to the input's range; normalise with CLIP's mean and std.
Both filters are linear, so each axis is one resampling matrix (:func:`resample_matrix`) and an image is
two matmuls. ``tests/evaluate/test_detect.py`` checks pixels and detections against transformers.

:class:`OwlVitDetector` is OWL-ViT (``google/owlvit-base-patch32``, VISOR's detector) with the same interface:
its processor resizes the image, without padding, to the model's square input (768 px for base/32) with PIL's
bicubic filter, which is what is done here too (on the CPU, per image, then batched to the device); its boxes
are relative to the image's own width and height (OWLv2's to the padded square).

:func:`tcompose.testing.tiny_detectors.write_tiny_owlv2` writes a random OWLv2 small enough for tests (64 px, 16
boxes); ``owlv2_config("large")`` there is OWLv2-L/14's architecture (random weights, for benchmarks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..io.errors import UserError
from ..models.clip import CLIP_MEAN, CLIP_STD
from ..models.defaults import OWLV2, OWLVIT

DEFAULT_DETECTOR = OWLV2


def query_text(name: str) -> str:
    return f"a photo of a {name}"


@dataclass
class Detections:
    """One image's kept boxes: ``labels[i]`` (a category name) with ``scores[i]`` at ``boxes[i]`` (x0, y0, x1, y1
    in pixels of the image as given; boxes may reach past its edges, as OWLv2 predicts them)."""

    labels: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- preprocessing


def _mirror(idx: torch.Tensor, n: int) -> torch.Tensor:
    """scipy.ndimage's ``mirror`` boundary: reflect about the edge pixels' centres (d c b | a b c d | c b a)."""
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.abs() % period
    return torch.where(idx > n - 1, period - idx, idx)


def resample_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """float64 ``[n_out, n_in]``: scipy ``gaussian_filter(sigma=max(0, (f - 1) / 2), mode="mirror")`` then
    ``zoom(order=1, mode="mirror", grid_mode=True)`` along one axis, f = n_in / n_out (skimage-style resize)."""
    f = n_in / n_out
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * f - 0.5
    i0 = torch.floor(centre)
    w = centre - i0
    i0 = i0.long()
    z = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    z.index_put_((rows, _mirror(i0, n_in)), 1 - w, accumulate=True)
    z.index_put_((rows, _mirror(i0 + 1, n_in)), w, accumulate=True)
    sigma = max(0.0, (f - 1) / 2)
    if sigma <= 1e-15:
        return z
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1)
    weights = torch.exp(-0.5 * (offsets.double() / sigma) ** 2)
    weights = weights / weights.sum()
    g = torch.zeros(n_in, n_in, dtype=torch.float64)
    src = torch.arange(n_in)[:, None].expand(n_in, len(offsets))
    g.index_put_((src.reshape(-1), _mirror(src + offsets, n_in).reshape(-1)),
                 weights.expand(n_in, -1).reshape(-1), accumulate=True)
    return z @ g


def _to_uint8_hwc(image: Any) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL
        image = image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an RGB image (PIL, or uint8 HxWx3 array), got {arr.dtype} {arr.shape}")
    return arr


# --------------------------------------------------------------------------------------------------- detector


class Owlv2Detector:
    """An ``Owlv2ForObjectDetection`` with its tokenizer, on one device, detecting named categories in batches."""

    square = True  # boxes relative to the image padded to a square
    model_type = "owlv2"
    kind = "OWLv2"
    default = DEFAULT_DETECTOR

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device, dtype).eval()
        self.tokenizer = tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.text_len = int(model.config.text_config.max_position_embeddings)
        self.mean = torch.tensor(mean, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(3, 1, 1)
        self._matrices: dict[int, torch.Tensor] = {}

    @classmethod
    def check(cls, name: str, revision: str | None = None) -> None:
        """Read the checkpoint's config only, so that a model of another kind fails before any image is made."""
        from ..models.loading import model_type

        try:
            kind = model_type(name, revision, f"{cls.kind} detector")
        except (OSError, ValueError) as err:
            raise UserError(f"--detector {name}: no readable model config there ({str(err).splitlines()[0]}); pass "
                            f"an {cls.kind} checkpoint such as {cls.default}") from None
        if kind != cls.model_type:
            raise UserError(f"--detector {name}: model_type {kind!r} is not an {cls.kind} detector; pass an "
                            f"{cls.kind} checkpoint such as {cls.default}")

    @classmethod
    def _model_class(cls):
        from transformers import Owlv2ForObjectDetection

        return Owlv2ForObjectDetection

    use_safetensors: bool | None = True  # OWLv2's hub checkpoints have safetensors weights

    @classmethod
    def load(cls, name: str | None = None, revision: str | None = None, device: str | None = None,
             dtype: str = "auto"):
        """Load weights and tokenizer from a hub id (``HF_HUB_OFFLINE=1`` works with a warm cache) or a local
        folder (default: :attr:`default`). ``dtype``: ``auto`` (fp16 on CUDA, fp32 elsewhere), ``fp32``,
        ``fp16``, ``bf16``."""
        from transformers import AutoTokenizer

        from ..models.loading import local_path, pretrained, tf_dtype_kwargs

        name = name or cls.default
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = resolve_dtype(dtype, device)
        model = pretrained(cls._model_class().from_pretrained, name, revision, f"{cls.kind} detector",
                           use_safetensors=cls.use_safetensors, **tf_dtype_kwargs(torch_dtype))
        tokenizer = pretrained(AutoTokenizer.from_pretrained, name, revision, f"{cls.kind} tokenizer")
        local = local_path(name)
        mean, std = CLIP_MEAN, CLIP_STD
        if local is not None and (local / "preprocessor_config.json").is_file():
            pre = json.loads((local / "preprocessor_config.json").read_text())
            mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
        return cls(model, tokenizer, device, torch_dtype, mean, std)

    def _matrix(self, n: int) -> torch.Tensor:
        if n not in self._matrices:
            self._matrices[n] = resample_matrix(n, self.image_size).to(self.device, torch.float32)
        return self._matrices[n]

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """``[B, 3, S, S]`` pixel values in the model's dtype on its device (S = the model's image size). The
        resampling runs in full float32 even where TF32 matmuls are enabled."""
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            return self._preprocess(images)
        finally:
            torch.set_float32_matmul_precision(precision)

    def _preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        out = []
        for image in images:
            arr = torch.from_numpy(_to_uint8_hwc(image).copy()).to(self.device)
            x = arr.permute(2, 0, 1).float() / 255.0
            h, w = x.shape[1:]
            n = max(h, w)
            if h != w:
                x = torch.nn.functional.pad(x, (0, n - w, 0, n - h), value=0.0)
            m = self._matrix(n)
            y = (m @ x @ m.T).clamp_(x.amin(), x.amax())
            out.append((y - self.mean) / self.std)
        return torch.stack(out).to(self.dtype)

    def encode_queries(self, names: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Token ids and masks ``[B * Q, L]`` of every image's queries, Q = the most queries of any image.
        Missing queries are all-zero ids, which OWLv2 masks out (its ``query_mask`` is ``input_ids[..., 0] > 0``)."""
        q = max(len(n) for n in names)
        if q == 0:
            raise ValueError("every image needs at least one category name to look for")
        texts = [query_text(x) for n in names for x in n]
        enc = self.tokenizer(texts, padding="max_length", max_length=self.text_len, truncation=True,
                             return_tensors="pt")
        ids = torch.zeros(len(names) * q, self.text_len, dtype=torch.long)
        mask = torch.zeros_like(ids)
        mask[:, 0] = 1
        rows = torch.tensor([i * q + j for i, n in enumerate(names) for j in range(len(n))])
        ids[rows], mask[rows] = enc["input_ids"], enc["attention_mask"]
        return ids.to(self.device), mask.to(self.device), q

    @torch.inference_mode()
    def detect(self, images: Sequence[Any], names: Sequence[Sequence[str]], threshold: float = 0.01
               ) -> list[Detections]:
        """Detect ``names[i]`` in ``images[i]``; keep boxes whose score is > ``threshold``."""
        if len(images) != len(names):
            raise ValueError(f"{len(images)} images but {len(names)} query lists")
        if not images:
            return []
        arrays = [_to_uint8_hwc(im) for im in images]
        pixels = self.preprocess(arrays)
        ids, mask, _ = self.encode_queries(names)
        out = self.model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        return postprocess(out.logits, out.pred_boxes, [a.shape[:2] for a in arrays], names, threshold,
                           square=self.square)


class OwlVitDetector(Owlv2Detector):
    """An ``OwlViTForObjectDetection`` (VISOR's detector, ``google/owlvit-base-patch32``) with the same interface:
    the image is resized to the model's square input with PIL's bicubic filter (no padding, as
    ``OwlViTImageProcessor``), and boxes come back in the image's own pixels."""

    square = False
    model_type = "owlvit"
    kind = "OWL-ViT"
    default = OWLVIT
    use_safetensors = None  # the original checkpoints ship PyTorch weights; safetensors are used where present

    @classmethod
    def _model_class(cls):
        from transformers import OwlViTForObjectDetection

        return OwlViTForObjectDetection

    def _preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        from PIL import Image

        n = self.image_size
        out = []
        for image in images:
            im = Image.fromarray(_to_uint8_hwc(image))
            if im.size != (n, n):
                im = im.resize((n, n), Image.BICUBIC)
            x = torch.from_numpy(np.asarray(im).copy()).to(self.device).permute(2, 0, 1).float() / 255.0
            out.append((x - self.mean) / self.std)
        return torch.stack(out).to(self.dtype)


def postprocess(logits: torch.Tensor, pred_boxes: torch.Tensor, sizes: Sequence[tuple[int, int]],
                names: Sequence[Sequence[str]], threshold: float, square: bool = True) -> list[Detections]:
    """``logits [B, P, Q]``, ``pred_boxes [B, P, 4]`` (cx, cy, w, h relative to the padded square when
    ``square``, as OWLv2 predicts them; else to the image's own width and height, as OWL-ViT) -> kept boxes with
    category names (labels = argmax query). Same arithmetic as transformers' OWLv2 / OWL-ViT post-processing."""
    best = logits.float().max(dim=-1)
    scores = torch.sigmoid(best.values)
    cx, cy, w, h = pred_boxes.float().unbind(-1)
    corners = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
    if square:
        scale = torch.tensor([[max(s)] * 4 for s in sizes], device=corners.device, dtype=corners.dtype)
    else:
        scale = torch.tensor([[s[1], s[0], s[1], s[0]] for s in sizes], device=corners.device, dtype=corners.dtype)
    corners = corners * scale.view(-1, 1, 4)
    keep = scores > threshold
    scores, labels, corners, keep = (t.cpu() for t in (scores, best.indices, corners, keep))
    result = []
    for i, image_names in enumerate(names):
        k = keep[i]
        result.append(Detections(
            labels=[image_names[j] for j in labels[i][k].tolist()],
            scores=scores[i][k].tolist(),
            boxes=corners[i][k].tolist(),
        ))
    return result


def resolve_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    """``auto`` -> fp16 on CUDA, fp32 elsewhere; else ``fp32`` / ``fp16`` / ``bf16``."""
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in table:
        raise UserError(f"unknown detector dtype {dtype!r}: choose auto, fp32, fp16 or bf16")
    return table[dtype]


# ------------------------------------------------------------------------------------------------ tiny models

