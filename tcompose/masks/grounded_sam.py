"""The ``grounded-sam`` source of the masks stage: caption noun phrases -> GroundingDINO boxes -> SAM masks.

Per image, for the captions that get rows (``--captions``): the noun phrases of each caption
(:func:`tcompose.data.nouns.noun_phrases`, ``--nouns vocab|spacy``; computed in the loader's worker processes);
the union of those phrases (one detector prompt "a . b . c ." for all of the image's captions, split into
several prompts only past GroundingDINO's 256 text tokens); GroundingDINO's boxes, each mapped to a phrase
by token spans (:func:`tcompose.masks.grounding_dino.assign_phrases`; box and text thresholds 0.25); one SAM /
SAM-HQ mask per box (one image-encoder pass per image, its boxes in decoder calls of up to 64); the union of
the masks of each phrase (:func:`tcompose.masks.segment.union_by_label`). Each caption's row lists its phrases in
caption order; a phrase that got no box is kept with a null mask, as the original pipeline did, and counted
(``phrases_no_box``; ``phrases_not_prompted`` for one too long for the text encoder). ``categories`` is
empty ("") for every phrase: this source does not know dataset categories.

Batches of ``--batch-size`` images (grouped by size within a shard, so padding is rare): one detector
forward (GroundingDINO's processor pads the batch and passes a pixel mask, but its Swin backbone still sees
the padding, which is why ``--batch-size`` is one of the settings in the dataset fingerprint), one SAM
image-encoder forward, then the mask decoder per image. Models run in ``--dtype`` (fp16 / bf16 on GPU;
fp16 on CPU runs in fp32, see :func:`tcompose.models.loading.torch_dtype`; the effective dtype is a setting too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ..data.coco import CocoDataset
from ..data.nouns import METHODS, default_nouns, noun_phrases
from ..io.errors import UserError
from .config import MasksConfig, model_dtype
from .grounding_dino import Detector
from .grounding_dino import preprocess as detector_inputs
from .interface import Grounding
from .segment import Segmenter, union_by_label
from .segment import preprocess as segmenter_inputs

if TYPE_CHECKING:
    from .loader import Item


class GroundedSamPrep:
    """Worker side: noun phrases of every caption; detector and segmenter inputs of a batch of images."""

    needs_pixels = True

    def __init__(self, nouns: str, detector_processor: Any, segmenter_processor: Any):
        self.nouns, self.detector_processor, self.segmenter_processor = nouns, detector_processor, segmenter_processor

    def parse(self, image: Any, captions: Sequence[str]) -> list[list[str]]:
        return [noun_phrases(c, method=self.nouns) for c in captions]

    def preprocess(self, images: list) -> dict:
        return {"detector": detector_inputs(self.detector_processor, images),
                "segmenter": segmenter_inputs(self.segmenter_processor, images)}


class GroundedSam:
    """Main side: the detector and the segmenter."""

    def __init__(self, detector: Detector, segmenter: Segmenter):
        self.detector, self.segmenter = detector, segmenter

    def ground(self, items: Sequence["Item"], inputs: dict, chosen: Sequence[Sequence[int]]) -> list[list[Grounding]]:
        """Groundings of ``items[j].captions[c]`` for ``c`` in ``chosen[j]`` (``inputs``: a row per item)."""
        captions = [[it.captions[c] for c in picks] for it, picks in zip(items, chosen)]
        phrases = [[it.parsed[c] for c in picks] for it, picks in zip(items, chosen)]
        sizes = [(it.image.height, it.image.width) for it in items]
        return self.ground_phrases(inputs, sizes, captions, phrases)

    def ground_phrases(self, inputs: dict, sizes: Sequence[tuple[int, int]], captions: Sequence[Sequence[str]],
                       phrases: Sequence[Sequence[Sequence[str]]]) -> list[list[Grounding]]:
        """Image j (row j of ``inputs``, ``sizes[j]`` = (H, W)): one Grounding per caption ``captions[j][k]``
        with the phrases ``phrases[j][k]``."""
        sets, jobs, bases = [], [], []
        for j, per_caption in enumerate(phrases):
            unique = list(dict.fromkeys(p for ps in per_caption for p in ps))
            pset = self.detector.prompts(unique)
            base = np.cumsum([0] + [len(p.phrases) for p in pset.prompts]).tolist()
            sets.append((unique, pset))
            bases.append(base)
            jobs += [(j, prompt) for prompt in pset.prompts]
        detections = self.detector.detect(inputs["detector"], jobs, sizes) if jobs else []
        boxes = [[] for _ in phrases]
        labels = [[] for _ in phrases]
        prompt_no = [0] * len(phrases)
        for (j, _), det in zip(jobs, detections):
            boxes[j].append(det.boxes)
            labels[j].append(det.labels + bases[j][prompt_no[j]])
            prompt_no[j] += 1
        box_t = [torch.cat(b) if b else torch.zeros((0, 4)) for b in boxes]
        label_t = [torch.cat(lab) if lab else torch.zeros((0,), dtype=torch.long) for lab in labels]
        masks = self.segmenter.segment(inputs["segmenter"], box_t)
        out = []
        for j, per_caption in enumerate(phrases):
            unique, pset = sets[j]
            n_slots = bases[j][-1]
            slot_masks: list[Any] = [None] * n_slots
            if masks[j] is not None:
                union = union_by_label(masks[j], label_t[j].to(masks[j].device), n_slots)
                slot_masks = [m.cpu().numpy() if m is not None else None for m in union]
            by_phrase = {}
            for u, where in zip(unique, pset.index):
                by_phrase[u] = (None, "phrases_not_prompted") if where is None else (
                    slot_masks[bases[j][where[0]] + where[1]], "phrases_no_box")
            groundings = []
            for k, (caption, ps) in enumerate(zip(captions[j], per_caption)):
                stats = {"boxes": int(box_t[j].shape[0]) if k == 0 else 0, "phrases_no_box": 0,
                         "phrases_not_prompted": 0}
                for p in ps:
                    mask, why = by_phrase[p]
                    if mask is None:
                        stats[why] += 1
                groundings.append(Grounding(caption, list(ps), [""] * len(ps), [by_phrase[p][0] for p in ps], stats))
            out.append(groundings)
        return out


def build(cfg: MasksConfig, coco: CocoDataset, device: Any) -> tuple[GroundedSamPrep, GroundedSam]:
    """Load the detector and the segmenter on ``device`` (once per process); the noun vocabulary is built here,
    before the loader's worker processes fork, so they share it. ``coco`` is not needed (only the captions,
    which the loader passes with each image)."""
    if cfg.nouns not in METHODS:
        raise UserError(f"--nouns must be one of {', '.join(METHODS)}, got {cfg.nouns!r}")
    default_nouns()
    noun_phrases("a dog on a table", method=cfg.nouns)  # spaCy missing: fail now, with its install hint
    dtype, _ = model_dtype(cfg)
    detector = Detector.load(cfg.detector, cfg.detector_revision, device, dtype, box_threshold=cfg.box_threshold,
                             text_threshold=cfg.text_threshold, batch_size=cfg.batch_size)
    segmenter = Segmenter.load(cfg.segmenter, cfg.segmenter_revision, device, dtype, cfg.batch_size)
    prep = GroundedSamPrep(cfg.nouns, detector.image_processor, segmenter.image_processor)
    return prep, GroundedSam(detector, segmenter)


def content(cfg: MasksConfig) -> dict:
    """The grounded-sam settings that decide the rows."""
    dtype, _ = model_dtype(cfg)
    return {
        "detector": str(cfg.detector), "detector_revision": cfg.detector_revision,
        "segmenter": str(cfg.segmenter), "segmenter_revision": cfg.segmenter_revision,
        "box_threshold": cfg.box_threshold, "text_threshold": cfg.text_threshold,
        "nouns": cfg.nouns, "nouns_vocab": default_nouns().fingerprint(),
        "dtype": str(dtype).removeprefix("torch."),
        # GroundingDINO's Swin backbone sees a batch's zero padding, so boxes move (slightly) with the batch
        "batch_size": cfg.batch_size,
    }
