"""GenEval's colour classifier: CLIP zero-shot over :data:`.rules.COLORS` on an object's mask, as
evaluate_images.py's ``ImageCrops`` and ``color_classification`` do it.

    clf = ColorClassifier.load("openai/clip-vit-large-patch14", device="cuda")   # or a local CLIPModel folder
    clf.classify(image, [(box, mask), ...], "car")      # -> ["red", "blue", ...]

- The crop (:func:`object_crop`): the image composited over a flat grey #999 (153, 153, 153) through the
  object's boolean mask (the object's pixels kept, the rest grey), then cropped to its box (PIL rounds the box).
- The classifier (per object name, cached): each colour's three prompts (:data:`TEMPLATES`) embedded by CLIP's
  text tower, each normalised, averaged, normalised again (clip_benchmark's ``zero_shot_classifier``); an
  image's colour is the argmax of ``100 x`` its normalised image embedding against them (``run_classification``).
- Preprocessing: CLIP's own processor from the checkpoint (shortest edge to 224 with bicubic, centre crop,
  CLIP's mean and std), as open_clip's transform for ViT-L/14 does.

GenEval ran open_clip's ``ViT-L-14`` with ``pretrained="openai"``: the same weights as transformers'
``openai/clip-vit-large-patch14``, the default here.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .rules import COLORS

#: GenEval's three templates; ``{c}`` is the colour, ``{object}`` the object's name.
TEMPLATES = ("a photo of a {c} {object}", "a photo of a {c}-colored {object}", "a photo of a {c} object")
GREY = (153, 153, 153)  # "#999"


def color_prompts(name: str) -> list[list[str]]:
    """The texts of each colour (``COLORS`` order), three templates each, for objects called ``name``."""
    return [[t.format(c=c, object=name) for t in TEMPLATES] for c in COLORS]


def object_crop(image: Any, box: Sequence[float], mask: np.ndarray | None):
    """The PIL image GenEval's colour classifier sees: ``image`` (PIL or HxWx3 uint8) where ``mask`` (HxW bool)
    is set, grey #999 elsewhere, cropped to ``box`` ``[x0, y0, x1, y1]`` (rounded, as PIL's crop rounds)."""
    from PIL import Image

    im = image.convert("RGB") if hasattr(image, "convert") else Image.fromarray(np.asarray(image, dtype=np.uint8))
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (im.height, im.width):
            raise ValueError(f"mask of shape {mask.shape} for an image of {im.height}x{im.width}")
        im = Image.composite(im, Image.new("RGB", im.size, GREY), Image.fromarray(mask))
    return im.crop(tuple(float(v) for v in box[:4]))


class ColorClassifier:
    """A CLIPModel with its tokenizer and image processor, classifying object crops into :data:`COLORS`."""

    def __init__(self, model, tokenizer, processor, device: str = "cpu", dtype=None):
        import torch

        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        self.tokenizer = tokenizer
        self.processor = processor
        self._classifiers: dict[str, Any] = {}

    @classmethod
    def load(cls, name: str, revision: str | None = None, device: str = "cpu", dtype=None) -> "ColorClassifier":
        """From a hub id (``HF_HUB_OFFLINE=1`` works with a warm cache) or a local CLIPModel folder."""
        from transformers import CLIPImageProcessor

        from ...models.clip import load_clip
        from ...models.loading import pretrained, quiet_transformers

        with quiet_transformers():  # no "Loading weights" bar beside the stage's own
            model, tokenizer = load_clip(name, revision)
        processor = pretrained(CLIPImageProcessor.from_pretrained, name, revision, "CLIP image processor")
        return cls(model, tokenizer, processor, device, dtype)

    def classifier(self, name: str):
        """``[D, 10]``: the colours' averaged, normalised text embeddings for objects called ``name`` (cached)."""
        import torch

        if name not in self._classifiers:
            columns = []
            with torch.inference_mode():
                for texts in color_prompts(name):
                    enc = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
                    emb = self.model.get_text_features(**enc)
                    emb = getattr(emb, "pooler_output", emb).float()
                    emb = torch.nn.functional.normalize(emb, dim=-1).mean(dim=0)
                    columns.append(emb / emb.norm())
            self._classifiers[name] = torch.stack(columns, dim=1)
        return self._classifiers[name]

    def classify(self, image: Any, objects: Sequence[tuple[Sequence[float], np.ndarray | None]], name: str,
                 batch_size: int = 16) -> list[str]:
        """The colour of each ``(box, mask)`` object of ``image``, all called ``name``."""
        import torch

        if not objects:
            return []
        clf = self.classifier(name)
        out: list[str] = []
        crops = [object_crop(image, box, mask) for box, mask in objects]
        with torch.inference_mode():
            for start in range(0, len(crops), batch_size):
                pixels = self.processor(images=crops[start:start + batch_size], return_tensors="pt")["pixel_values"]
                emb = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
                emb = torch.nn.functional.normalize(getattr(emb, "pooler_output", emb).float(), dim=-1)
                out += [COLORS[i] for i in (100.0 * emb @ clf).argmax(dim=1).tolist()]
        return out
