"""``tcompose train-unet``: TokenCompose finetuning of a Stable Diffusion UNet.

- :mod:`.loop`: ``TrainUnetConfig`` and ``run`` (accelerate loop, checkpoints, the pipeline output);
- :mod:`.examples`: a masks dataset as training examples (pixels, token ids, per-word masks, noise), batches;
- :mod:`.latent_cache`: ``--cache-latents``, the VAE's moments of each image encoded once.
"""

from .examples import PreparedRows, TrainingExamples, collate, prepare_rows, split_heldout
from .latent_cache import LatentCache, prepare_latent_cache
from .loop import TrainUnetConfig, run

__all__ = ["LatentCache", "PreparedRows", "TrainUnetConfig", "TrainingExamples", "collate", "prepare_latent_cache",
           "prepare_rows", "run", "split_heldout"]
