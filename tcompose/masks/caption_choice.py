"""Which of an image's captions get rows: ``--captions first|all|clip-best``.

- ``first``: the image's first caption (COCO's annotation order); one row per image.
- ``all``: every caption; one row per caption.
- ``clip-best``: the caption a CLIP model scores highest for the image (cosine similarity of the projected
  image and text embeddings; ties go to the earlier caption), as TokenCompose's data preparation did with
  OpenAI CLIP ViT-L/14@336px (``openai/clip-vit-large-patch14-336``, the default of ``--clip-model``).
  Captions longer than CLIP's 77 tokens are truncated for scoring only.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..io.errors import UserError
from ..models.defaults import CAPTION_CLIP

CAPTION_MODES = ("first", "all", "clip-best")
DEFAULT_CLIP = CAPTION_CLIP


def check_mode(mode: str) -> None:
    if mode not in CAPTION_MODES:
        raise UserError(f"--captions must be one of {', '.join(CAPTION_MODES)}, got {mode!r}")


def static_choice(mode: str, n_captions: int) -> list[int] | None:
    """Indices of the kept captions for ``first`` / ``all``; None for ``clip-best`` (needs the image)."""
    check_mode(mode)
    if mode == "first":
        return [0] if n_captions else []
    if mode == "all":
        return list(range(n_captions))
    return None


def best_per_image(scores: torch.Tensor, counts: Sequence[int]) -> list[int]:
    """``scores`` [B, sum(counts)]: image i's own captions are the i-th run of ``counts`` columns; the index,
    within that run, of its highest-scoring caption (the first on ties)."""
    out, start = [], 0
    for i, n in enumerate(counts):
        out.append(int(scores[i, start : start + n].argmax()) if n else -1)
        start += n
    return out


class ClipScorer:
    """A CLIPModel (on its device, in its dtype) with its tokenizer and image processor: picks best captions."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any):
        self.model, self.tokenizer, self.image_processor = model.eval(), tokenizer, image_processor
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @classmethod
    def load(cls, name: str = DEFAULT_CLIP, revision: str | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> "ClipScorer":
        """From a hub id or a local folder (``model_type`` clip)."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        from ..models.loading import model_type, pretrained

        kind = model_type(name, revision, "CLIP model")
        if kind != "clip":
            raise UserError(f"--clip-model {name}: model_type {kind!r} is not a CLIP model (e.g. {DEFAULT_CLIP})")
        model = pretrained(CLIPModel.from_pretrained, name, revision, "CLIP model", dtype=dtype).to(device)
        tokenizer = pretrained(AutoTokenizer.from_pretrained, name, revision, "CLIP model")
        image_processor = pretrained(AutoImageProcessor.from_pretrained, name, revision, "CLIP model", backend="pil")
        return cls(model, tokenizer, image_processor)

    @staticmethod
    def preprocess(image_processor: Any, images: list) -> torch.Tensor:
        """Worker side: PIL images -> CLIP ``pixel_values`` [B, 3, S, S]."""
        return image_processor(images, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def best(self, pixel_values: torch.Tensor, captions: Sequence[Sequence[str]]) -> list[int]:
        """For image i (row i of ``pixel_values``), the index of its best caption in ``captions[i]``."""
        flat = [c for cs in captions for c in cs]
        if not flat:
            return [-1] * len(captions)
        max_len = min(int(self.model.config.text_config.max_position_embeddings), 77)
        enc = self.tokenizer(flat, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        img = self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype))
        txt = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                           attention_mask=enc["attention_mask"].to(self.device))
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
        img = torch.nn.functional.normalize(img.float(), dim=-1)
        txt = torch.nn.functional.normalize(txt.float(), dim=-1)
        return best_per_image((img @ txt.T).cpu(), [len(cs) for cs in captions])
