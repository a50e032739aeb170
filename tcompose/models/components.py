"""Component loaders the model families share: the ``--text-encoder`` swap (a CLIP text model from a folder or
hub id) and its checks, another ``--vae``, and a model's configs read without weights.

    text_encoder, tokenizer = load_text_encoder("runs/clip", base_tokenizer=tokenizer)
    check_text_encoder(text_encoder, unet, tokenizer)      # TextEncoderMismatchError when it cannot condition it
    unet_config, vae_factor = model_configs("CompVis/stable-diffusion-v1-4")

Whole models load through their family: :func:`tcompose.models.families.load_components`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..io.errors import UserError
from .loading import ModelFolderError, hub_hint, local_path, quiet_logger, tf_dtype_kwargs

#: Where a model folder keeps its denoiser: a UNet, or a diffusion transformer (SD3 / FLUX).
DENOISER_SUBFOLDERS = ("unet", "transformer")

__all__ = ["TextEncoderMismatchError", "load_text_encoder", "check_text_encoder", "clip_text_from_pretrained",
           "model_configs", "model_index", "load_vae"]


class TextEncoderMismatchError(UserError):
    """A text encoder that cannot condition this UNet (width or context length)."""


def clip_text_from_pretrained(source: str | Path, **kwargs: Any):
    """CLIPTextModel.from_pretrained (safetensors only) that fails on missing weights (a text tower must load
    completely) and keeps quiet about the unused vision tower of a CLIPModel checkpoint."""
    from transformers import CLIPTextModel

    with quiet_logger("transformers.modeling_utils"):
        model, info = CLIPTextModel.from_pretrained(source, output_loading_info=True, use_safetensors=True, **kwargs)
    missing = list(info.get("missing_keys") or [])
    if missing:
        where = f"{source}/{kwargs['subfolder']}" if kwargs.get("subfolder") else str(source)
        raise ModelFolderError(f"{where}: {len(missing)} text-encoder weights missing from the checkpoint "
                               f"(e.g. {sorted(missing)[0]}); it is not a CLIP text model checkpoint")
    return model


def _has_tokenizer(folder: Path) -> bool:
    if (folder / "tokenizer.json").is_file():
        return True
    return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


def load_text_encoder(
    path_or_id: str | os.PathLike,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    base_tokenizer: Any = None,
    local_files_only: bool | None = None,
) -> tuple[Any, Any]:
    """(CLIPTextModel, tokenizer) from a folder or hub id.

    Accepts: a folder with ``text_encoder/`` and ``tokenizer/`` subfolders (a pipeline, or what
    ``train-clip`` writes); a CLIPTextModel folder (``model_type`` clip_text_model); a full CLIPModel folder
    or hub id (its text tower is taken). Without tokenizer files beside the weights, ``base_tokenizer`` is used.
    """
    from transformers import CLIPTokenizer

    local = local_path(path_or_id)
    if local is not None:
        if (local / "text_encoder").is_dir():
            model_dir, tok_dir = local / "text_encoder", local / "tokenizer"
        elif (local / "config.json").is_file():
            model_type = json.loads((local / "config.json").read_text()).get("model_type")
            if model_type not in ("clip_text_model", "clip"):
                raise ModelFolderError(
                    f"{local / 'config.json'}: model_type {model_type!r} is not a CLIP text model; pass a "
                    "CLIPTextModel or CLIPModel folder, or a folder with text_encoder/ and tokenizer/"
                )
            model_dir, tok_dir = local, local
        else:
            raise ModelFolderError(
                f"{local}: neither text_encoder/ nor config.json found; pass a CLIPTextModel or CLIPModel folder "
                "(save_pretrained output) or a folder with text_encoder/ and tokenizer/ subfolders"
            )
        text_model = clip_text_from_pretrained(model_dir, **tf_dtype_kwargs(dtype))
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir) if _has_tokenizer(tok_dir) else base_tokenizer
        if tokenizer is None:
            raise ModelFolderError(f"{tok_dir}: no tokenizer files (vocab.json + merges.txt or tokenizer.json) "
                                   "and no base model tokenizer to fall back on")
        return text_model, tokenizer
    hub: dict[str, Any] = {"revision": revision}
    if local_files_only is not None:
        hub["local_files_only"] = local_files_only
    model_id = str(path_or_id)
    with hub_hint(model_id, local_files_only):
        try:  # a CLIPModel / CLIPTextModel repository
            text_model = clip_text_from_pretrained(model_id, **hub, **tf_dtype_kwargs(dtype))
            sub: dict[str, str] = {}
        except OSError as first:  # a diffusers pipeline repository
            try:
                text_model = clip_text_from_pretrained(model_id, subfolder="text_encoder", **hub, **tf_dtype_kwargs(dtype))
            except OSError:
                raise first from None
            sub = {"subfolder": "tokenizer"}
        try:
            tokenizer = CLIPTokenizer.from_pretrained(model_id, **sub, **hub)
        except OSError:
            if base_tokenizer is None:
                raise
            tokenizer = base_tokenizer
    return text_model, tokenizer


def check_text_encoder(text_encoder: Any, unet: Any, tokenizer: Any = None, text_encoder_2: Any = None) -> None:
    """Raise TextEncoderMismatchError unless ``text_encoder`` (SDXL: with ``text_encoder_2``, their hidden states
    concatenated) can condition ``unet`` with 77-token prompts."""
    hidden = text_encoder.config.hidden_size + (text_encoder_2.config.hidden_size if text_encoder_2 is not None else 0)
    cross = unet.config.cross_attention_dim
    crosses = set(cross) if isinstance(cross, (list, tuple)) else {cross}
    if crosses != {hidden}:
        raise TextEncoderMismatchError(
            f"text encoder hidden size {hidden} != UNet cross_attention_dim {cross}: use a text encoder of width "
            f"{cross} (SD1.x: CLIP ViT-L/14, 768; SD2.x: OpenCLIP ViT-H, 1024)"
        )
    length = 77
    if tokenizer is not None and 0 < int(tokenizer.model_max_length) < 100_000:
        length = int(tokenizer.model_max_length)
    positions = text_encoder.config.max_position_embeddings
    if positions < length:
        raise TextEncoderMismatchError(
            f"text encoder max_position_embeddings {positions} < prompt length {length} (tokenizer.model_max_length): "
            "it cannot encode a padded prompt"
        )
    if tokenizer is not None and len(tokenizer) > text_encoder.config.vocab_size:
        raise TextEncoderMismatchError(
            f"tokenizer has {len(tokenizer)} tokens but the text encoder's vocab_size is "
            f"{text_encoder.config.vocab_size}: pair the text encoder with its own tokenizer"
        )


def model_configs(model: str | os.PathLike, revision: str | None = None,
                  local_files_only: bool | None = None) -> tuple[dict, int]:
    """(the denoiser's config (``unet/`` or ``transformer/``), the VAE's downsampling factor) of a model, from its
    config files alone (no weights):
    what a stage needs to check sizes and ``--layers`` before it loads anything."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    local = local_path(model)
    if local is not None:
        denoiser = next((s for s in DENOISER_SUBFOLDERS if (local / s / "config.json").is_file()), None)
        missing = ([] if denoiser else [" or ".join(s + "/" for s in DENOISER_SUBFOLDERS)]) + \
            (["vae/"] if not (local / "vae" / "config.json").is_file() else [])
        if missing:
            raise ModelFolderError(
                f"{local} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}. "
                "Pass a folder written by `StableDiffusionPipeline.save_pretrained` or `tcompose train-unet`, or a "
                "hub id such as CompVis/stable-diffusion-v1-4."
            )
        kw: dict[str, Any] = {}
        context: contextlib.AbstractContextManager = contextlib.nullcontext()
    else:
        kw = {"revision": revision}
        if local_files_only is not None:
            kw["local_files_only"] = local_files_only
        context = hub_hint(str(model), local_files_only)
        denoiser = None
    with context:
        if denoiser is not None:
            unet = UNet2DConditionModel.load_config(str(model), subfolder=denoiser, **kw)
        else:  # a hub id: the first denoiser subfolder it has
            for sub in DENOISER_SUBFOLDERS[:-1]:
                try:
                    unet = UNet2DConditionModel.load_config(str(model), subfolder=sub, **kw)
                    break
                except OSError:
                    continue
            else:
                unet = UNet2DConditionModel.load_config(str(model), subfolder=DENOISER_SUBFOLDERS[-1], **kw)
        vae = AutoencoderKL.load_config(str(model), subfolder="vae", **kw)
    return dict(unet), 2 ** (len(vae["block_out_channels"]) - 1)


def load_vae(vae: str | os.PathLike, revision: str | None = None, dtype: torch.dtype = torch.float32,
             local_files_only: bool | None = None):
    """An AutoencoderKL from a VAE folder or hub id (``madebyollin/sdxl-vae-fp16-fix``), or a pipeline's ``vae/``."""
    from diffusers import AutoencoderKL

    local = local_path(vae)
    weights: dict[str, Any] = {"use_safetensors": True}
    if dtype != torch.float32:
        weights["torch_dtype"] = dtype
    if local is not None:
        sub = "vae" if (local / "vae" / "config.json").is_file() else None
        if not (local / (sub or "") / "config.json").is_file():
            raise ModelFolderError(f"--vae {local}: no config.json there nor in {local / 'vae'}; pass an AutoencoderKL "
                                   "folder, a pipeline folder with vae/, or a hub id such as madebyollin/sdxl-vae-fp16-fix")
        return AutoencoderKL.from_pretrained(str(local), subfolder=sub, **weights)
    kw: dict[str, Any] = {"revision": revision}
    if local_files_only is not None:
        kw["local_files_only"] = local_files_only
    with hub_hint(str(vae), local_files_only):
        return AutoencoderKL.from_pretrained(str(vae), **weights, **kw)


def model_index(model: str | os.PathLike, revision: str | None = None) -> dict:
    """The model's ``model_index.json`` ({} when it has none): the pipeline settings saved with it."""
    local = local_path(model)
    try:
        if local is not None:
            return json.loads((local / "model_index.json").read_text())
        from diffusers import DiffusionPipeline

        return dict(DiffusionPipeline.load_config(str(model), revision=revision))
    except (OSError, ValueError):
        return {}
