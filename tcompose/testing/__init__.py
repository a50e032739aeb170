"""Random models for tests, the offline demo and the bench: not the product's loading (that is tcompose.models).

- :mod:`.tiny_sd`: random Stable Diffusion pipelines (SD1.x layout, SDXL layout) written with ``save_pretrained``,
  tiny for tests and the demo, with the real-size shapes (``UNET_SIZES``, ``SD_VAE``, ``SD_TEXT``) the bench uses;
- :mod:`.tiny_dit`: random SD3.5-layout and FLUX.1-dev-layout pipelines (and a T5-style tokenizer made in code),
  tiny for tests, with the real transformers' shapes (``SD35_MEDIUM``, ``FLUX_DEV``, ...) for the bench;
- :mod:`.tiny_vision`: random GroundingDINO, SAM / SAM-HQ and CLIP folders (the masks stage's models, train-clip's);
- :mod:`.tiny_detectors`: random OWLv2, OWL-ViT and Mask2Former folders (the benchmarks' detectors);
- :mod:`.build`: what the builders share (a seeded build, a folder written whole).

Only the bench, the demo and the tests import this package; a stage never does (tests/test_layout.py).
Import the modules directly: ``from tcompose.testing.tiny_sd import write_tiny_pipeline``.
"""
