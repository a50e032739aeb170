"""``tcompose train-unet``: TokenCompose finetuning of a model's denoiser, any family (the UNet of SD1.x / SD2.x /
SDXL, the flow-matching transformer of SD3 / SD3.5 / FLUX.1; what differs is the family's, tcompose.models.families).

- :mod:`.config`: ``TrainUnetConfig``, its checks, the settings a resume must keep;
- :mod:`.loop`: ``run`` (accelerate loop, checkpoints, the pipeline output);
- :mod:`.examples`: a masks dataset as training examples (pixels, token ids, per-word masks, noise), batches;
- :mod:`.geometry`: images and masks resized and cropped as the original implementation did;
- :mod:`.latent_cache`: ``--cache-latents``, the VAE's moments of each image encoded once.
"""

from .config import TrainUnetConfig
from .examples import PreparedRows, TrainingExamples, collate, prepare_rows, split_heldout
from .latent_cache import LatentCache, prepare_latent_cache
from .loop import run

__all__ = ["LatentCache", "PreparedRows", "TrainUnetConfig", "TrainingExamples", "collate", "prepare_latent_cache",
           "prepare_rows", "run", "split_heldout"]
