"""``tcompose train-unet``: TokenCompose finetuning of a model's denoiser, any family (the UNet of SD1.x / SD2.x /
SDXL, the flow-matching transformer of SD3 / SD3.5 / FLUX.1; what differs is the family's, tcompose.models.families).

- :mod:`.config`: ``TrainUnetConfig``, its checks, the settings a resume must keep;
- :mod:`.loop`: ``run`` (accelerate loop, checkpoints, the pipeline output);
- :mod:`.model_setup`: the model read and readied for training (frozen parts, LoRA, a quantized base);
- :mod:`.examples`: a masks dataset as training examples (pixels, token ids, per-word masks, noise), batches;
- :mod:`.geometry`: images and masks resized and cropped as the original implementation did;
- :mod:`.latent_cache`: ``--cache-latents``, the VAE's moments of each image encoded once;
- :mod:`.text_cache`: ``--cache-text``, each caption's text-encoder states encoded once, the encoders then freed;
- :mod:`.shard_cache`: what both caches share (sharded safetensors, fingerprint, resumable multi-process build).
"""

from .config import TrainUnetConfig
from .examples import PreparedRows, TrainingExamples, collate, prepare_rows, split_heldout
from .latent_cache import LatentCache, prepare_latent_cache
from .loop import run
from .text_cache import TextCache, prepare_text_cache

__all__ = ["LatentCache", "PreparedRows", "TextCache", "TrainUnetConfig", "TrainingExamples", "collate",
           "prepare_latent_cache", "prepare_rows", "prepare_text_cache", "run", "split_heldout"]
