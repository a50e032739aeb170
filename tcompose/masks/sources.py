"""Where the masks stage gets its masks: one :class:`Source` per ``--source``.

A source is split in two, because images are decoded and preprocessed in DataLoader worker processes while
the models run in the main process:

- its **prep** (picklable, no models) runs in the workers: ``parse(image, captions)`` analyses the text of
  all of an image's captions (which phrases each has) and ``preprocess(images)`` turns a batch of decoded
  PIL images into model inputs (``needs_pixels`` False: the images are not decoded at all);
- its **grounder** runs in the main process: ``ground(items, inputs, chosen)`` returns, for each image, one
  :class:`Grounding` per chosen caption (``chosen[j]``: indices into ``items[j].captions``).

``coco-gt`` takes COCO's instance masks of the categories the caption names (no models, no pixels);
``grounded-sam`` (:mod:`tcompose.grounded_sam`) detects the caption's noun phrases with GroundingDINO and
segments the boxes with SAM / SAM-HQ. ``content(cfg)`` gives the settings of a source that decide its rows
(they go into the dataset fingerprint); ``stats`` names the counters it adds to the manifest's ``stats``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .coco import CocoDataset, CocoImage
from .vocab import default_vocabulary, match_categories

if TYPE_CHECKING:
    from .masks import MasksConfig
    from .masks_loader import Item


@dataclass
class Grounding:
    """One caption's grounded phrases: ``masks[i]`` (bool HxW, or None) grounds ``phrases[i]``; ``stats``
    holds source counters to add to the shard's statistics (summed whether or not the caption gets a row)."""

    caption: str
    phrases: list[str]
    categories: list[str]
    masks: list[np.ndarray | None]
    stats: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    """A way to get masks: ``build(cfg, coco, device)`` loads what it needs once and returns (prep, grounder)."""

    name: str
    needs_instances: bool
    build: Callable[["MasksConfig", CocoDataset, Any], tuple[Any, Any]]
    content: Callable[["MasksConfig"], dict]
    no_match: str  # the skip reason of a caption that yields no phrase
    stats: tuple[str, ...] = ()
    uses_workers: bool = True  # False: everything runs in the main process (cheap per image)


# ----------------------------------------------------------------------------------------------------------
# coco-gt


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


def _coco_gt_build(cfg: "MasksConfig", coco: CocoDataset, device: Any) -> tuple[CocoGtPrep, CocoGtGrounder]:
    return CocoGtPrep(coco, cfg.include_crowd), CocoGtGrounder(coco, cfg.include_crowd)


def _coco_gt_content(cfg: "MasksConfig") -> dict:
    return {"include_crowd": cfg.include_crowd, "vocab": default_vocabulary().fingerprint()}


# ----------------------------------------------------------------------------------------------------------
# grounded-sam (the models live in tcompose.grounded_sam, imported only when this source is used)


def _grounded_sam_build(cfg: "MasksConfig", coco: CocoDataset, device: Any):
    from .grounded_sam import build

    return build(cfg, device)


def _grounded_sam_content(cfg: "MasksConfig") -> dict:
    from .grounded_sam import content

    return content(cfg)


SOURCES: dict[str, Source] = {
    "coco-gt": Source("coco-gt", needs_instances=True, build=_coco_gt_build, content=_coco_gt_content,
                      no_match="no caption noun names an annotated category", uses_workers=False),
    "grounded-sam": Source("grounded-sam", needs_instances=False, build=_grounded_sam_build,
                           content=_grounded_sam_content, no_match="no noun phrase in the caption",
                           stats=("boxes", "phrases_no_box", "phrases_not_prompted")),
}
