"""Models: loading (hub id or folder, revision, dtype, offline), tiny random builders, CLIP and its BPE
tokenizer, ``--model`` specs, regional compile and the default ids.

- :mod:`.loading`: what every loader shares (``local_path``, ``offline``, hub hints, quiet loading, ``--dtype``);
- :mod:`.stable_diffusion`: ``load_components`` (UNet, VAE, text encoder(s), tokenizer(s), DDPM scheduler;
  SD1.x, SD2.x and SDXL), ``load_text_encoder`` and ``check_text_encoder`` for the ``--text-encoder`` swap;
- :mod:`.lora`: LoRA adapters (peft) on the UNet's attention projections, in diffusers' LoRA format;
- :mod:`.clip`: ``load_clip``, ``export_clip`` (a CLIPModel folder whose text tower SD loads);
- :mod:`.tiny_sd`, :mod:`.tiny_vision`: random SD pipelines, GroundingDINO, SAM / SAM-HQ, CLIP and OWLv2
  (tiny for tests and the demo; real-size configurations for benchmarks), written with ``save_pretrained``;
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
    "tiny_sd": ("UNET_SIZES", "build_tiny_text_encoder", "build_tiny_unet", "build_tiny_vae", "count_parameters",
                "tiny_unet_config", "write_tiny_pipeline"),
    "tiny_vision": ("build_clip", "build_owlv2", "write_tiny_clip", "write_tiny_grounding_dino", "write_tiny_owlv2",
                    "write_tiny_sam"),
    "clip_bpe": ("find_clip_bpe", "write_clip_tokenizer"),
    "spec": ("ModelSpec", "parse_model_spec", "parse_model_specs"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)

def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
