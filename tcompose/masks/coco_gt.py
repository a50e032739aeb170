"""The ``coco-gt`` source of the masks stage: the caption noun phrases that name one of the image's annotated
COCO categories (:func:`tcompose.data.vocab.match_categories`), each with the union of that category's
instance masks. No model; cheap per image, so it runs in the main process."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..data.coco import CocoDataset, CocoImage
from ..data.vocab import default_vocabulary, match_categories
from .config import MasksConfig
from .interface import Grounding

if TYPE_CHECKING:
    from .loader import Item


class CocoGtPrep:
    """Caption phrases that name one of the image's annotated categories; no pixels needed."""

    needs_pixels = False

    def __init__(self, coco: CocoDataset, include_crowd: bool):
        self.coco, self.include_crowd = coco, include_crowd

    def parse(self, image: CocoImage, captions: Sequence[str]) -> list[list[tuple[str, str]]]:
        names = self.coco.category_names(image, include_crowd=self.include_crowd)
        return [match_categories(c, names) for c in captions]

    def preprocess(self, images: list) -> dict:
        return {}


class CocoGtGrounder:
    """Union of each named category's instance masks in the image, at image resolution."""

    def __init__(self, coco: CocoDataset, include_crowd: bool):
        self.coco, self.include_crowd = coco, include_crowd

    def ground(self, items: Sequence["Item"], inputs: dict, chosen: Sequence[Sequence[int]]) -> list[list[Grounding]]:
        out = []
        for item, picks in zip(items, chosen):
            masks: dict[str, np.ndarray] = {}
            groundings = []
            for c in picks:
                pairs = item.parsed[c]
                for _, cat in pairs:
                    if cat not in masks:
                        masks[cat] = self.coco.category_mask(item.image, cat, include_crowd=self.include_crowd)
                groundings.append(Grounding(item.captions[c], [p for p, _ in pairs], [c_ for _, c_ in pairs],
                                            [masks[c_] for _, c_ in pairs]))
            out.append(groundings)
        return out


def build(cfg: MasksConfig, coco: CocoDataset, device: Any) -> tuple[CocoGtPrep, CocoGtGrounder]:
    """The prep and the grounder of coco-gt (nothing to load)."""
    return CocoGtPrep(coco, cfg.include_crowd), CocoGtGrounder(coco, cfg.include_crowd)


def content(cfg: MasksConfig) -> dict:
    """The coco-gt settings that decide the rows."""
    return {"include_crowd": cfg.include_crowd, "vocab": default_vocabulary().fingerprint()}
