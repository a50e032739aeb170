"""Models: loading real checkpoints (hub id or folder, revision, dtype, offline), CLIP and its BPE tokenizer,
``--model`` specs, regional compile and the default ids. Random models for tests, the demo and the bench are
built by :mod:`tcompose.testing`, not here.

- :mod:`.loading`: what every loader shares (``local_path``, ``offline``, hub hints, quiet loading, ``--dtype``);
- :mod:`.stable_diffusion`: ``load_components`` (UNet, VAE, text encoder(s), tokenizer(s), DDPM scheduler;
  SD1.x, SD2.x and SDXL), ``load_text_encoder`` and ``check_text_encoder`` for the ``--text-encoder`` swap;
- :mod:`.lora`: LoRA adapters (peft) on the UNet's attention projections, in diffusers' LoRA format;
- :mod:`.clip`: ``load_clip``, ``export_clip`` (a CLIPModel folder whose text tower SD loads);
- :mod:`.clip_bpe`: CLIP-format BPE vocabularies (the real one from a file, or a small one trained here);
- :mod:`.spec`: ``--model NAME=ID[,unet=..]``; :mod:`.compile`: regional ``torch.compile``;
  :mod:`.defaults`: the default hub id of every stage.

Names are re-exported lazily (``from tcompose.models import load_components``): ``tcompose.models.defaults``
is read by the CLI's ``--help``, which must not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "loading": ("ModelFolderError", "DTYPES", "local_path", "offline", "pretrained", "torch_dtype"),
    "stable_diffusion": ("SDComponents", "TextEncoderMismatchError", "check_text_encoder", "is_sdxl",
                         "load_components", "load_text_encoder", "load_vae", "model_configs"),
    "lora": ("add_lora", "apply_lora", "lora_parameter_count", "read_lora_meta", "save_lora"),
    "clip": ("export_clip", "load_clip"),
    "clip_bpe": ("find_clip_bpe", "write_clip_tokenizer"),
    "spec": ("ModelSpec", "parse_model_spec", "parse_model_specs"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)

def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
