"""Models: loading real checkpoints (hub id or folder, revision, dtype, offline), CLIP and its BPE tokenizer,
``--model`` specs, regional compile and the default ids. Random models for tests, the demo and the bench are
built by :mod:`tcompose.testing`, not here.

- :mod:`.loading`: what every loader shares (``local_path``, ``offline``, hub hints, quiet loading, ``--dtype``);
- :mod:`.families`: one module per model family (``sd``: SD1.x / SD2.x, ``sdxl``, ``sd3``: SD3 / SD3.5,
  ``flux``: FLUX.1) behind one interface (``ModelFamily``), and ``load_components``: a model's parts bound to its
  family;
- :mod:`.components`: loaders the families share: ``load_text_encoder`` and ``check_text_encoder`` for the
  ``--text-encoder`` swap, ``load_vae``, ``model_configs``;
- :mod:`.lora`: LoRA adapters (peft) on the denoiser's attention projections, in diffusers' LoRA format;
- :mod:`.quantize`: ``quantize_linear_layers``, a bitsandbytes nf4 / int8 frozen base for LoRA;
- :mod:`.clip`: ``load_clip``, ``export_clip`` (a CLIPModel folder whose text tower SD loads);
- :mod:`.spec`: ``--model NAME=ID[,unet=..]``; :mod:`.compile`: regional ``torch.compile``;
  :mod:`.defaults`: the default hub id of every stage.

Names are re-exported lazily (``from tcompose.models import load_components``): ``tcompose.models.defaults``
is read by the CLI's ``--help``, which must not import torch.
"""

from __future__ import annotations

from ..io.exports import lazy_exports

_EXPORTS = {
    "loading": ("ModelFolderError", "DTYPES", "local_path", "offline", "pretrained", "torch_dtype"),
    "families": ("Components", "ModelFamily", "components_of_pipeline", "family_named", "family_of", "family_of_pipeline",
                 "load_components"),
    "components": ("TextEncoderMismatchError", "check_text_encoder", "load_text_encoder", "load_vae", "model_configs"),
    "lora": ("add_lora", "apply_lora", "lora_parameter_count", "read_lora_meta", "save_lora"),
    "clip": ("export_clip", "load_clip"),
    "spec": ("ModelSpec", "parse_model_spec", "parse_model_specs"),
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
