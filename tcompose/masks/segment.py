"""SAM / SAM-HQ: boxes -> masks, one image-encoder pass per image, then the union of each phrase's masks.

``Segmenter.load(name)`` reads the checkpoint's ``model_type`` and loads ``SamHQModel`` (``sam_hq``, e.g.
``syscv-community/sam-hq-vit-huge``) or ``SamModel`` (``sam``, e.g. ``facebook/sam-vit-huge``). For a batch of
images, :meth:`Segmenter.segment` runs the image encoder once over the images that have boxes, then the
prompt encoder and mask decoder once per image for all of its boxes (``multimask_output=False``: one mask per
box; SAM-HQ with ``hq_token_only=False``, as SAM-HQ's own predictor; at most ``boxes_per_call`` boxes per
call, which bounds the memory of the full-size float masks), and upsamples the low-resolution mask
logits to the image the way the processor does (bilinear to the padded input, crop the padding, bilinear to
the original size, ``> 0``). :func:`union_by_label` then ORs the masks of the boxes that share a phrase.

Boxes are in original-image pixels (x0, y0, x1, y1); they are scaled to the resized input frame exactly as
``SamProcessor`` scales them (by the resized / original size ratio of each axis).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..io.errors import UserError
from ..models.defaults import SEGMENTER

DEFAULT_SEGMENTER = SEGMENTER
SEGMENTER_TYPES = ("sam_hq", "sam")


def preprocess(image_processor: Any, images: list) -> dict[str, torch.Tensor]:
    """Worker side: PIL images -> ``pixel_values`` [B, 3, S, S], ``original_sizes`` and
    ``reshaped_input_sizes`` [B, 2] (H, W)."""
    enc = image_processor(images, return_tensors="pt")
    return {k: enc[k] for k in ("pixel_values", "original_sizes", "reshaped_input_sizes")}


def scale_boxes(boxes: torch.Tensor, original: Sequence[int], reshaped: Sequence[int]) -> torch.Tensor:
    """Boxes [N, 4] in original (H, W) pixels -> the frame of the resized (H', W') model input."""
    (h, w), (rh, rw) = [int(v) for v in original], [int(v) for v in reshaped]
    scale = torch.tensor([rw / w, rh / h, rw / w, rh / h], dtype=torch.float32)
    return boxes.float().cpu() * scale


def union_by_label(masks: torch.Tensor, labels: torch.Tensor, n_labels: int) -> list[torch.Tensor | None]:
    """OR of the masks [N, H, W] (bool) of each label in ``0..n_labels-1``; None for a label with no mask."""
    out: list[torch.Tensor | None] = []
    for k in range(n_labels):
        sel = labels == k
        out.append(masks[sel].any(dim=0) if bool(sel.any()) else None)
    return out


class Segmenter:
    """A SAM or SAM-HQ model (on its device, in its dtype) with its image processor."""

    def __init__(self, model: Any, image_processor: Any, batch_size: int = 8, boxes_per_call: int = 64):
        self.model, self.image_processor, self.batch_size = model.eval(), image_processor, batch_size
        self.boxes_per_call = boxes_per_call
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @classmethod
    def load(cls, name: str = DEFAULT_SEGMENTER, revision: str | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, batch_size: int = 8) -> "Segmenter":
        """From a hub id or a local folder: SamHQModel for ``model_type`` sam_hq, SamModel for sam."""
        from transformers import AutoImageProcessor, SamHQModel, SamModel

        from ..models.loading import model_type, pretrained

        kind = model_type(name, revision, "segmenter")
        if kind not in SEGMENTER_TYPES:
            raise UserError(f"--segmenter {name}: model_type {kind!r} is neither SAM-HQ nor SAM (expected one of "
                            f"{', '.join(SEGMENTER_TYPES)}, e.g. {DEFAULT_SEGMENTER} or facebook/sam-vit-huge)")
        cls_ = SamHQModel if kind == "sam_hq" else SamModel
        model = pretrained(cls_.from_pretrained, name, revision, "segmenter", dtype=dtype).to(device)
        image_processor = pretrained(AutoImageProcessor.from_pretrained, name, revision, "segmenter", backend="pil")
        return cls(model, image_processor, batch_size)

    @torch.no_grad()
    def embed(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Image encoder over [B, 3, S, S] in batches: (embeddings, SAM-HQ's intermediate embeddings or None)."""
        embs, inters = [], []
        for start in range(0, pixel_values.shape[0], self.batch_size):
            px = pixel_values[start : start + self.batch_size].to(self.device, self.dtype)
            out = self.model.get_image_embeddings(px)
            if isinstance(out, tuple):
                embs.append(out[0])
                inters.append(out[1])
            else:
                embs.append(out)
        emb = torch.cat(embs)
        inter = [torch.cat([part[i] for part in inters]) for i in range(len(inters[0]))] if inters else None
        return emb, inter

    @torch.no_grad()
    def segment(self, inputs: dict[str, torch.Tensor], boxes: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Masks of ``boxes[i]`` ([N_i, 4] pixels, may be empty) on image ``i`` of ``inputs``: bool [N_i, H, W]
        at the original size, on this segmenter's device; None where an image has no box (no encoder pass)."""
        todo = [i for i, b in enumerate(boxes) if b.shape[0] > 0]
        out: list[torch.Tensor | None] = [None] * len(boxes)
        if not todo:
            return out
        emb, inter = self.embed(inputs["pixel_values"][todo])
        for j, i in enumerate(todo):
            original, reshaped = inputs["original_sizes"][i].tolist(), inputs["reshaped_input_sizes"][i].tolist()
            extra = {"intermediate_embeddings": [t[j : j + 1] for t in inter]} if inter is not None else {}
            frame = scale_boxes(boxes[i], original, reshaped)
            parts = []
            for start in range(0, frame.shape[0], self.boxes_per_call):  # bounds the full-size float masks
                pred = self.model(
                    image_embeddings=emb[j : j + 1],
                    input_boxes=frame[None, start : start + self.boxes_per_call].to(self.device, self.dtype),
                    multimask_output=False, **extra,
                ).pred_masks  # [1, n, 1, h, w] logits
                full = self.image_processor.post_process_masks([pred[0].float()], [original], [reshaped])[0]
                parts.append(full[:, 0])
            out[i] = torch.cat(parts)
        return out
