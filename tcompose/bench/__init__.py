"""``tcompose bench``: speed and memory of training and inference on the machine it runs on.

:mod:`.run` (``BenchConfig``, ``run``) gathers the sections: :mod:`.train` (the train-unet step, FLOPs,
memory), :mod:`.baseline` (the original implementation's step), :mod:`.infer` (generation, OWLv2, the
masks models); :mod:`.report` prints the table and the targets.
"""

from .run import BenchConfig, run

__all__ = ["BenchConfig", "run"]
