"""The crops stage (``tcompose crops``): object crops labelled "a photo of a {category}", for train-clip.

:mod:`.stage` cuts one per COCO instance annotation; :mod:`.from_masks` one per masked phrase of a masks dataset
(``--from-masks``, the grounded-SAM recipe); :mod:`.geometry` holds the box maths (margin, square, image edges).
"""

from .from_masks import MaskCropsConfig
from .from_masks import run as crops_from_masks
from .stage import STATS_KEYS, CropsConfig, run, summary_line

__all__ = ["STATS_KEYS", "CropsConfig", "MaskCropsConfig", "crops_from_masks", "run", "summary_line"]
