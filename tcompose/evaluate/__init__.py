"""Evaluation: seeded generation, detection, attention figures and the benchmarks built on them.

- :mod:`.settings`: ``GenerationSettings``, how every generating stage samples (steps, guidance, size, ...);
- :mod:`.generate`: ``tcompose generate`` (seeded, batched, resumable); :mod:`.sampling`: the pipeline and a batch;
- :mod:`.detect`: ``Owlv2Detector``, OWLv2 batched on the device; :mod:`.detection_store`: detections on disk;
- :mod:`.attnviz`: per-word cross-attention heat maps of several models;
- :mod:`.benchmark`: what the benchmarks share; :mod:`.multigen`, :mod:`.visor`, :mod:`.geneval`, :mod:`.fid`,
  :mod:`.latency` (MultiGen, VISOR, GenEval, FID and CLIP score, seconds per image) and :mod:`.table` (the
  paper's Table 1 of them, GenEval's columns beside).

Names are re-exported lazily (``from tcompose.evaluate import GenerateConfig``), so that the CLI's ``--help`` can
read :mod:`.settings` without importing torch. No name shadows a submodule: ``tcompose.evaluate.generate`` is the
module (its ``run`` is ``tcompose.evaluate.generate.run``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    ".settings": ("GenerationSettings",),
    ".attnviz": ("AttnvizConfig",),
    ".detect": ("Owlv2Detector",),
    ".generate": ("GenerateConfig",),
    ".sampling": ("load_pipeline",),
    "..models.sampling": ("generate_batch", "image_seed"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
