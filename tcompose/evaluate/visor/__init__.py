"""VISOR (Gokhale et al. 2022): SR2D two-object spatial prompts -> images -> OWL-ViT -> Object Accuracy and the
VISOR scores. :func:`sr2d_prompts` builds the prompt set, :func:`score` scores detections; ``stage.py`` is
``tcompose visor``."""

from .prompts import sr2d_prompts
from .scoring import score

__all__ = ["sr2d_prompts", "score"]
