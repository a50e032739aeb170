"""GenEval (``tcompose geneval``; Ghosh et al. 2023, djghosh13/geneval): 553 prompts -> images of every model ->
Mask2Former + CLIP colours (transformers) -> GenEval's rules -> per-task and overall scores.

:mod:`.rules`: ``score`` and GenEval's keep / ``evaluate`` / ``relative_position`` / summary arithmetic;
:mod:`.prompts`: the prompt file (pinned commit, sha256-checked, cached) and GenEval's 80 object names;
:mod:`.colors`: the CLIP colour classifier and its grey-composited crop; :mod:`.detector`: Mask2Former through
transformers with mmdet's post-processing; :mod:`.stage`: the run (``GenevalConfig``, ``run``, ``rescore``) on
the machinery MultiGen and VISOR share (:mod:`tcompose.evaluate.benchmark`); :mod:`.report`: GenEval's results
JSONL, the summary and the grids. The torch-free names are imported here; the rest load with their module.
"""

from .prompts import GENEVAL_OBJECTS, GenevalPrompt, resolve_prompts
from .rules import COLORS, TASKS, evaluate, relative_position, score

__all__ = ["COLORS", "GENEVAL_OBJECTS", "GenevalPrompt", "TASKS", "evaluate", "relative_position", "resolve_prompts",
           "score"]
