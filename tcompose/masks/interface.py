"""What a mask source gives the masks stage: :class:`Grounding` (one caption's phrases and their masks) and
:class:`Source` (how a source plugs in: what it loads, which settings decide its rows, its counters)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..data.coco import CocoDataset

if TYPE_CHECKING:
    from .config import MasksConfig


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
