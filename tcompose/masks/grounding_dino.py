"""GroundingDINO on caption phrases: the text prompt, box -> phrase mapping by token spans, batched detection.

Prompt. The phrases are cleaned (lower case; ``.`` and ``?``, which GroundingDINO treats as phrase delimiters,
become spaces; whitespace collapsed), deduplicated (case and spacing variants of one phrase share one slot)
and joined as ``"a . b . c ."``, the original Grounded-SAM format. Each phrase's token span (its positions
in the prompt's input ids, ``[CLS]`` at 0) comes from the tokenizer's character offsets, so nothing depends
on decoding tokens back to text.

Mapping (:func:`assign_phrases`). For each query box: ``p[t] = sigmoid(logit[t])``; the box is kept when
``max_t p[t] > box_threshold`` (over all text tokens, as the original); it goes to the phrase whose span holds
the highest ``p[t]``, provided that maximum exceeds ``text_threshold``; ties go to the earlier phrase. A box
whose best token is a separator, ``[CLS]`` or ``[SEP]`` and no span token passes ``text_threshold`` is
dropped. The label is therefore always one of the caption's phrases: never a fragment ("wine" of "wine
glass") nor two neighbours merged, which string matching of decoded tokens cannot promise.

Long prompts. The text encoder sees at most ``max_text_len`` tokens (256 for GroundingDINO, ``[CLS]`` and
``[SEP]`` included). Phrases are packed greedily, in order, into as many prompts as needed; each prompt is
one more detector pass over the same image. A single phrase longer than a whole prompt cannot be detected:
it is kept without a mask and counted (``PromptSet.index`` is None for it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..io.errors import UserError
from ..models.defaults import GROUNDING_DINO

DEFAULT_DETECTOR = GROUNDING_DINO
_DELIMITERS = re.compile(r"[.?]")


@dataclass(frozen=True)
class Prompt:
    """One detector text input: ``text`` ("a . b ."), its ``input_ids`` and each phrase's token ``spans``."""

    text: str
    phrases: tuple[str, ...]
    input_ids: tuple[int, ...]
    spans: tuple[tuple[int, ...], ...]


@dataclass
class PromptSet:
    """The prompts of one image; ``index[i]`` = (prompt, slot) of input phrase ``i``, None if not promptable."""

    prompts: list[Prompt] = field(default_factory=list)
    index: list[tuple[int, int] | None] = field(default_factory=list)


def clean_phrase(phrase: str) -> str:
    """A phrase as it goes into the prompt: lower case, no ``.``/``?`` delimiters, single spaces."""
    return " ".join(_DELIMITERS.sub(" ", phrase.lower()).split())


def _spans(tokenizer: Any, text: str, bounds: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, ...]]]:
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    spans: list[list[int]] = [[] for _ in bounds]
    k = 0
    for pos, ((start, end), special) in enumerate(zip(enc["offset_mapping"], enc["special_tokens_mask"])):
        if special or end <= start:
            continue
        while k < len(bounds) and start >= bounds[k][1]:
            k += 1
        if k < len(bounds) and start >= bounds[k][0]:
            spans[k].append(pos)
    return list(enc["input_ids"]), [tuple(s) for s in spans]


def build_prompts(tokenizer: Any, phrases: Sequence[str], max_tokens: int = 256) -> PromptSet:
    """Pack ``phrases`` into prompts of at most ``max_tokens`` tokens (see the module docstring)."""
    out = PromptSet(index=[None] * len(phrases))
    keys: dict[str, list[int]] = {}  # cleaned phrase -> input positions
    for i, p in enumerate(phrases):
        key = clean_phrase(p)
        if key:
            keys.setdefault(key, []).append(i)
    budget = max_tokens - 2  # [CLS] ... [SEP]
    chunks: list[list[str]] = []
    used = budget + 1
    for key in keys:
        cost = len(tokenizer(key, add_special_tokens=False)["input_ids"]) + 1  # the phrase and its " ."
        if cost - 1 == 0 or cost > budget:
            continue  # no token at all, or longer than a whole prompt
        if used + cost > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(key)
        used += cost
    for chunk in chunks:
        text, bounds = "", []
        for key in chunk:
            bounds.append((len(text), len(text) + len(key)))
            text += key + " . "
        text = text.rstrip()
        ids, spans = _spans(tokenizer, text, bounds)
        if len(ids) > max_tokens or not all(spans):
            raise RuntimeError(f"prompt {text!r} tokenized into {len(ids)} tokens (limit {max_tokens}) or lost a "
                               "phrase: the tokenizer does not split on spaces and punctuation like BERT's")
        for slot, key in enumerate(chunk):
            for i in keys[key]:
                out.index[i] = (len(out.prompts), slot)
        out.prompts.append(Prompt(text, tuple(chunk), tuple(ids), tuple(spans)))
    return out


def assign_phrases(
    probs: torch.Tensor, spans: Sequence[Sequence[int]], box_threshold: float = 0.25, text_threshold: float = 0.25
) -> torch.Tensor:
    """Per query box, the index of its phrase in ``spans`` or -1 (dropped): LongTensor [Q].

    ``probs``: float [Q, T], sigmoid of GroundingDINO's logits (padding positions 0). See the module docstring.
    """
    q = probs.shape[0]
    if q == 0 or not spans:
        return torch.full((q,), -1, dtype=torch.long)
    keep = probs.max(dim=-1).values > box_threshold
    per_phrase = torch.stack([probs[:, list(s)].max(dim=-1).values for s in spans], dim=-1)  # [Q, P]
    best, label = per_phrase.max(dim=-1)  # first maximum on ties
    return torch.where(keep & (best > text_threshold), label, torch.full_like(label, -1))


def boxes_to_pixels(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """GroundingDINO's relative (cx, cy, w, h) -> absolute (x0, y0, x1, y1) pixels of an HxW image."""
    cx, cy, w, h = boxes.float().unbind(-1)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=boxes.device)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1) * scale


@dataclass
class Detections:
    """Kept boxes of one (image, prompt): ``boxes`` float [K, 4] pixels xyxy, ``labels`` [K] prompt slots."""

    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor


def preprocess(image_processor: Any, images: list) -> dict[str, torch.Tensor]:
    """Worker side: PIL images -> ``pixel_values`` [B, 3, H, W] (padded to the batch) and ``pixel_mask``."""
    enc = image_processor(images, return_tensors="pt")
    return {"pixel_values": enc["pixel_values"], "pixel_mask": enc["pixel_mask"]}


class Detector:
    """A GroundingDINO model (on its device, in its dtype) with its tokenizer and image processor."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, box_threshold: float = 0.25,
                 text_threshold: float = 0.25, batch_size: int = 8):
        self.model, self.tokenizer, self.image_processor = model.eval(), tokenizer, image_processor
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.batch_size = batch_size
        self.max_tokens = int(model.config.max_text_len)

    @classmethod
    def load(cls, name: str = DEFAULT_DETECTOR, revision: str | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, **kwargs: Any) -> "Detector":
        """From a hub id or a local folder (``model_type`` must be grounding-dino); ``kwargs`` go to __init__."""
        from transformers import AutoImageProcessor, AutoModelForZeroShotObjectDetection, AutoTokenizer

        from ..models.loading import model_type, pretrained

        kind = model_type(name, revision, "detector")
        if kind != "grounding-dino":
            raise UserError(f"--detector {name}: model_type {kind!r} is not a GroundingDINO checkpoint "
                            f"(expected 'grounding-dino', e.g. {DEFAULT_DETECTOR})")
        model = pretrained(AutoModelForZeroShotObjectDetection.from_pretrained, name, revision, "detector",
                           dtype=dtype).to(device)
        tokenizer = pretrained(AutoTokenizer.from_pretrained, name, revision, "detector")
        image_processor = pretrained(AutoImageProcessor.from_pretrained, name, revision, "detector", backend="pil")
        return cls(model, tokenizer, image_processor, **kwargs)

    def prompts(self, phrases: Sequence[str]) -> PromptSet:
        return build_prompts(self.tokenizer, phrases, self.max_tokens)

    @torch.no_grad()
    def detect(self, inputs: dict[str, torch.Tensor], jobs: list[tuple[int, Prompt]],
               sizes: Sequence[tuple[int, int]]) -> list[Detections]:
        """Run ``jobs`` = (row of ``inputs``, prompt) in batches; boxes in pixels of ``sizes[row]`` = (H, W)."""
        out: list[Detections] = []
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(jobs), self.batch_size):
            part = jobs[start : start + self.batch_size]
            rows = torch.tensor([r for r, _ in part])
            width = max(len(p.input_ids) for _, p in part)
            ids = torch.full((len(part), width), pad, dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for i, (_, p) in enumerate(part):
                ids[i, : len(p.input_ids)] = torch.tensor(p.input_ids)
                mask[i, : len(p.input_ids)] = 1
            result = self.model(
                pixel_values=inputs["pixel_values"][rows].to(self.device, self.dtype),
                pixel_mask=inputs["pixel_mask"][rows].to(self.device),
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                token_type_ids=torch.zeros_like(ids).to(self.device),
            )
            probs = result.logits.float().sigmoid()
            for i, (row, prompt) in enumerate(part):
                labels = assign_phrases(probs[i], prompt.spans, self.box_threshold, self.text_threshold)
                keep = labels >= 0
                h, w = sizes[row]
                out.append(Detections(
                    boxes=boxes_to_pixels(result.pred_boxes[i][keep], h, w).cpu(),
                    labels=labels[keep].cpu(),
                    scores=probs[i][keep].max(dim=-1).values.cpu(),
                ))
        return out
