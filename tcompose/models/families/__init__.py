"""Model families behind one interface, and loading a model as its family's :class:`Components`.

- :mod:`.base`: ``ModelFamily`` (the interface the stages use) and ``Components`` (a model's parts, bound to it);
- :mod:`.sd`: SD1.x / SD2.x; :mod:`.sdxl`: SDXL; :mod:`.sd3`: SD3 / SD3.5 (MMDiT); :mod:`.flux`: FLUX.1.

    comps = load_components("CompVis/stable-diffusion-v1-4")   # or a folder; revision, dtype, --text-encoder, --vae
    comps.family.name                                           # "sd"

A family is recognised from its denoiser's config (``unet/config.json`` or ``transformer/config.json``) by :meth:`ModelFamily.matches`; the
first registered family that matches serves. Adding a family: its module here (a ``ModelFamily`` subclass), its
capture adapter and objective if its denoiser is not a UNet (:mod:`tcompose.grounding.objective`), a line in
``FAMILIES`` below, a tiny random builder in :mod:`tcompose.testing` and its tests (docs/design.md lists them).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from ...io.errors import UserError
from ..loading import ModelFolderError, folder_hint, hub_hint, local_path
from .base import TEXT_STATE, Components, ModelFamily
from .flux import Flux
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

__all__ = ["FAMILIES", "TEXT_STATE", "Components", "ModelFamily", "components_of_pipeline", "denoiser_subfolders", "family_named",
           "family_of", "family_of_model",
           "family_of_pipeline", "load_components"]

#: Every family, in the order they are asked whether a model is theirs.
FAMILIES: tuple[ModelFamily, ...] = (StableDiffusionXL(), StableDiffusion(), StableDiffusion3(), Flux())

#: The subfolders every family's folder holds besides its denoiser's (a family checks its own extra ones).
BASE_SUBFOLDERS = ("vae", "text_encoder", "tokenizer", "scheduler")


def denoiser_subfolders() -> list[str]:
    """The families' denoiser subfolders, each once, in the order of :data:`FAMILIES` (``unet``, ``transformer``)."""
    return list(dict.fromkeys(f.denoiser_subfolder for f in FAMILIES))


def family_of(denoiser_config: Any) -> ModelFamily:
    """The family whose denoiser has this config (a dict, or a model with ``.config``)."""
    config = dict(getattr(denoiser_config, "config", denoiser_config))
    for family in FAMILIES:
        if family.matches(config):
            return family
    raise ModelFolderError(f"no model family of tcompose takes a denoiser of class {config.get('_class_name')!r} "
                           f"(known: {', '.join(f.label for f in FAMILIES)})")


def family_named(name: str) -> ModelFamily:
    """The family recorded as ``name`` (training summaries, LoRA metadata)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UserError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def family_of_pipeline(pipe) -> ModelFamily:
    """The family of a diffusers pipeline object."""
    for family in FAMILIES:
        if family.owns_pipeline(pipe):
            return family
    raise ValueError(f"no model family of tcompose serves a {type(pipe).__name__}")


def components_of_pipeline(pipe) -> Components:
    """The components a diffusers pipeline of a known family holds, bound to that family (no copies; no training
    scheduler)."""
    family = family_of_pipeline(pipe)
    return Components(family=family, unet=family.denoiser_of(pipe), vae=pipe.vae, text_encoder=pipe.text_encoder,
                      tokenizer=pipe.tokenizer, noise_scheduler=None,
                      text_encoder_2=getattr(pipe, "text_encoder_2", None), tokenizer_2=getattr(pipe, "tokenizer_2", None),
                      text_encoder_3=getattr(pipe, "text_encoder_3", None), tokenizer_3=getattr(pipe, "tokenizer_3", None))


def family_of_model(model: str | os.PathLike, revision: str | None = None,
                    local_files_only: bool | None = None) -> ModelFamily:
    """The family of a model (hub id or folder), from its denoiser's config alone (no weights)."""
    from ..components import model_configs

    return family_of(model_configs(model, revision, local_files_only)[0])


def _denoiser_config(source: str, hub: dict, local: bool) -> dict:
    """The denoiser's config of a model, from the first families' ``denoiser_subfolder`` it has (``unet/``, then
    ``transformer/``)."""
    from pathlib import Path

    from diffusers import UNet2DConditionModel  # load_config reads any config.json

    subfolders = denoiser_subfolders()
    for sub in subfolders[:-1]:
        if local and not (Path(source) / sub / "config.json").is_file():
            continue
        try:
            return dict(UNet2DConditionModel.load_config(source, subfolder=sub, **hub))
        except OSError:  # a hub model without this subfolder: try the next family's
            if local:
                raise
    return dict(UNet2DConditionModel.load_config(source, subfolder=subfolders[-1], **hub))


def _folder_or_hub(name: str | os.PathLike, what: str, local_files_only: bool | None):
    """The error context of loading ``name``: a folder's (:func:`folder_hint`) or the hub's."""
    local = local_path(name)
    return folder_hint(local, what) if local is not None else contextlib.nullcontext()


def load_components(
    model: str | os.PathLike,
    revision: str | None = None,
    text_encoder: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    local_files_only: bool | None = None,
    vae: str | os.PathLike | None = None,
) -> Components:
    """A model's parts from a hub id or local folder, bound to its family.

    ``text_encoder``: another CLIP text model in place of the (first) text encoder (see
    :func:`tcompose.models.components.load_text_encoder`; SDXL, SD3 and FLUX refuse it); ``vae``: another VAE (SDXL's
    fp16-safe one, say). Weights are read from safetensors only. ``revision`` applies to a hub id;
    ``local_files_only`` None follows ``HF_HUB_OFFLINE``. Raises ModelFolderError (a ValueError) for a missing
    or incomplete local folder, TextEncoderMismatchError when the text encoder cannot condition the denoiser.
    """
    from ..components import load_vae

    local = local_path(model)
    hub: dict[str, Any] = {}
    if local is not None:
        need = [s for s in BASE_SUBFOLDERS if not (s == "text_encoder" and text_encoder is not None)]
        missing = [s + "/" for s in need if not (local / s).is_dir()]
        if not any((local / s).is_dir() for s in denoiser_subfolders()):
            missing.insert(0, " or ".join(s + "/" for s in denoiser_subfolders()))
        if missing:
            raise ModelFolderError(
                f"{local} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}. "
                "Pass a folder written by `StableDiffusionPipeline.save_pretrained` (unet/, vae/, text_encoder/, "
                "tokenizer/, scheduler/; SD3 / FLUX: transformer/ and their text encoders) or a hub id such as "
                "CompVis/stable-diffusion-v1-4."
            )
        source = str(local)
        context: contextlib.AbstractContextManager = folder_hint(local)
    else:
        source = str(model)
        hub["revision"] = revision
        if local_files_only is not None:
            hub["local_files_only"] = local_files_only
        context = hub_hint(source, local_files_only)
    with context:
        family = family_of(_denoiser_config(source, hub, local is not None))
        comps = family.load(source, hub, local is not None, dtype, swap_vae=vae is not None,
                            swap_text_encoder=text_encoder is not None)
    if vae is not None:
        with _folder_or_hub(vae, "VAE", local_files_only):
            comps.vae = load_vae(vae, dtype=dtype, local_files_only=local_files_only)
    if text_encoder is not None:
        with _folder_or_hub(text_encoder, "text encoder", local_files_only):
            family.swap_text_encoder(comps, text_encoder, dtype, local_files_only)
    family.check_components(comps)
    return comps
