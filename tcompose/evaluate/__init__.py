"""Evaluation: seeded generation, detection, attention figures and the benchmarks built on them.

- :mod:`.generate`: ``tcompose generate`` (seeded, batched, resumable); :mod:`.sampling`: the pipeline and a batch;
- :mod:`.detect`: ``Owlv2Detector``, OWLv2 batched on the device;
- :mod:`.attnviz`: per-word cross-attention heat maps of several models;
- :mod:`.multigen`: the MultiGen benchmark (prompts, images, detections, MG1..MG5, report).
"""

from .attnviz import AttnvizConfig
from .detect import Owlv2Detector
from ..models.sampling import generate_batch, image_seed
from .generate import GenerateConfig
from .generate import run as generate
from .sampling import load_pipeline

__all__ = ["AttnvizConfig", "GenerateConfig", "Owlv2Detector", "generate", "generate_batch", "image_seed",
           "load_pipeline"]
