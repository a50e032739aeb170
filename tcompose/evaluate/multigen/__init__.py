"""MultiGen (``tcompose multigen``): 5-category prompts -> images of every model -> OWLv2 -> MG1..MG5.

:mod:`.stage` runs it (``MultigenConfig``, ``run``, ``rescore``); :mod:`.prompts`: the paper's prompt sets
(pinned, sha256-checked) and sampling; :mod:`.scoring`: ``score``, the reference's arithmetic; :mod:`.report`:
tables with the published rows, grids. What it shares with VISOR (the run up to scoring, run.json) is
:mod:`tcompose.evaluate.benchmark`; detections on disk are :mod:`tcompose.evaluate.detection_store`.
"""

from .prompts import Prompt, resolve_prompts, sample_prompts
from .scoring import score
from .stage import MultigenConfig, rescore, run

__all__ = ["MultigenConfig", "Prompt", "rescore", "resolve_prompts", "run", "sample_prompts", "score"]
