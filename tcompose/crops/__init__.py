"""The crops stage (``tcompose crops``): one object crop per COCO instance, labelled "a photo of a {category}",
for train-clip. :mod:`.stage` runs it; :mod:`.geometry` holds the box maths (margin, square, image edges)."""

from .stage import STATS_KEYS, CropsConfig, run, summary_line

__all__ = ["STATS_KEYS", "CropsConfig", "run", "summary_line"]
