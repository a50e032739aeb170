"""The pipeline that `generate`, `multigen` and `attnviz` sample: loading, device and precision.

    pipe = load_pipeline("runs/tc", dtype="fp16", scheduler="ddim", device="cuda")
    images, nsfw = generate_batch(pipe, ["a cat and a wine glass"] * 2, seeds=[11, 12])   # tcompose.models.sampling

The pipeline is the model family's diffusers pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``)
built from :func:`tcompose.models.families.load_components` (same loading rules, offline hints and text-encoder checks as
training), optionally with a swapped UNet, text encoder or merged LoRA adapters, with the model's own
inference scheduler (``scheduler/scheduler_config.json``) unless ``scheduler`` names another: ``pndm``,
``ddim``, ``euler`` (Euler discrete, no churn) or ``dpm++`` (DPM-Solver++ multistep). All four are
deterministic given the initial latents; seeding is :mod:`tcompose.models.sampling`'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..io.errors import UserError
from ..models.sampling import SCHEDULERS, inference_scheduler

__all__ = ["DTYPES", "resolve_device", "resolve_dtype", "dtype_name", "model_facts", "check_image_size",
           "load_pipeline", "settings_for"]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``: this process's device under accelerate (cuda:LOCAL_RANK, else cuda, else cpu)."""
    if device is not None:
        return torch.device(device)
    from accelerate import PartialState

    return torch.device(PartialState().device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` -> fp16 on CUDA, fp32 elsewhere; ``fp16|bf16|fp32`` or a torch dtype as given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: use auto, fp16, bf16 or fp32")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _unet_source(unet: str | os.PathLike) -> tuple[str, str | None]:
    """(folder, subfolder) of a ``--unet`` path: a denoiser folder (a UNet, or an SD3 / FLUX transformer), or a
    pipeline / train-unet OUT with ``unet/`` or ``transformer/``. ModelFolderError when none holds a denoiser
    config that a model family of tcompose takes."""
    import json

    from ..models.components import DENOISER_SUBFOLDERS
    from ..models.families import family_of
    from ..models.loading import ModelFolderError

    path = Path(unet).expanduser()
    sub = next((s for s in DENOISER_SUBFOLDERS if (path / s / "config.json").is_file()), None)
    config_file = path / (sub or "") / "config.json"
    if not config_file.is_file():
        raise ModelFolderError(f"--unet {path}: no config.json there nor in {' or '.join(str(path / s) for s in DENOISER_SUBFOLDERS)}; "
                               "pass a denoiser folder (save_pretrained of a UNet or transformer) or a pipeline "
                               "folder such as a train-unet OUT")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ModelFolderError(f"--unet {path}: {config_file} does not read as JSON ({err})") from None
    try:
        if not isinstance(config, dict) or "_class_name" not in config:  # a transformers config, say
            raise ValueError("not a diffusers model's config")
        family_of(config)
    except ValueError:
        kind = config.get("_class_name") or config.get("model_type") if isinstance(config, dict) else None
        raise ModelFolderError(f"--unet {path}: {config_file} is not the config of a denoiser tcompose takes "
                               f"({'it describes ' + repr(kind) if kind else 'no _class_name'}); pass a UNet or "
                               "transformer folder, or a pipeline folder with unet/ or transformer/, such as a "
                               "train-unet OUT") from None
    return str(path), sub


def model_facts(model: str | os.PathLike, unet: str | None = None, revision: str | None = None,
                scheduler: str | None = None) -> dict[str, Any]:
    """Read from configs only (no weights): the inference scheduler's class, the default image size, the VAE's
    downsampling factor, the denoiser's config (of a LoRA run's OUT: its base model's) and its family."""
    from ..models.components import model_configs
    from ..models.families import family_of
    from ..models.lora import resolve_lora_model

    model, _, revision, _ = resolve_lora_model(model, None, revision)
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)} (or leave it out for "
                         "the model's own)")
    from ..models.loading import ModelFolderError, local_path

    local = local_path(model)
    if local is not None and local.is_dir() and not (local / "scheduler").is_dir():
        raise ModelFolderError(f"{local} is not a diffusers pipeline folder: missing scheduler/. Pass a folder written "
                               "by a pipeline's save_pretrained or `tcompose train-unet`, or a hub id.")
    config, factor = model_configs(model, revision)
    if unet is not None:
        from diffusers import UNet2DConditionModel  # load_config reads any config.json

        folder, sub = _unet_source(unet)
        config = dict(UNet2DConditionModel.load_config(folder, subfolder=sub))
    family = family_of(config)
    if scheduler is not None and not family.takes_schedulers:
        raise UserError(f"--scheduler {scheduler}: {family.label} models sample with their own flow-matching "
                        "scheduler; leave --scheduler out")
    sched_class = SCHEDULERS[scheduler][0] if scheduler is not None else _scheduler_class(model, revision)
    return {"scheduler": sched_class, "size": family.native_resolution(config, factor), "vae_factor": factor,
            "unet_config": dict(config), "family": family.name, "family_label": family.label,
            "size_multiple": factor * family.latent_multiple(config),
            "sampling_defaults": family.sampling_defaults(config)}


def settings_for(pipe, settings):
    """``settings`` (a GenerationSettings) with ``pipe``'s model's steps and guidance where they are None."""
    from ..models.families import family_of_pipeline

    family = family_of_pipeline(pipe)
    return settings.resolved(family.sampling_defaults(dict(family.denoiser_of(pipe).config)))


def check_image_size(height: int | None, width: int | None, facts: dict) -> None:
    """``--height`` / ``--width`` that the model's pipeline would silently round (FLUX: multiples of 16) are
    refused, naming the multiple."""
    m = facts["size_multiple"]
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None and value % m:
            raise UserError(f"{flag} {value}: {facts['family_label']} images are a multiple of {m} pixels (its "
                            f"pipeline would round it down); pass {value // m * m or m} or {(value // m + 1) * m}")


def _scheduler_class(model, revision: str | None) -> str:
    from diffusers import DDPMScheduler  # load_config reads any scheduler config

    from ..models.loading import local_path

    hub = {} if local_path(model) is not None else {"revision": revision}
    return DDPMScheduler.load_config(str(model), subfolder="scheduler", **hub)["_class_name"]


def _safety_parts(model: str, revision: str | None, dtype: torch.dtype):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    from ..models.loading import local_path

    local = local_path(model)
    if local is not None and not ((local / "safety_checker").is_dir() and (local / "feature_extractor").is_dir()):
        raise UserError(f"{local} has no safety_checker/ and feature_extractor/: pass --safety-checker off, or a "
                         "model that has them (CompVis/stable-diffusion-v1-4)")
    hub = {} if local is not None else {"revision": revision}
    kw = {"torch_dtype": dtype} if dtype != torch.float32 else {}
    checker = StableDiffusionSafetyChecker.from_pretrained(str(model), subfolder="safety_checker",
                                                           use_safetensors=True, **hub, **kw)
    return checker, CLIPImageProcessor.from_pretrained(str(model), subfolder="feature_extractor", **hub)


def load_pipeline(model: str | os.PathLike, unet: str | None = None, text_encoder: str | None = None,
                  revision: str | None = None, dtype: str | torch.dtype = "auto", scheduler: str | None = None,
                  safety_checker: bool = False, device: str | torch.device | None = None, lora: str | None = None,
                  lora_scale: float = 1.0):
    """A ready pipeline of the model's family (progress bar off) on ``device``.

    ``unet``: a UNet folder, or a pipeline folder with ``unet/`` (a train-unet OUT), replacing the model's.
    ``text_encoder``: see :func:`tcompose.models.load_text_encoder`. ``lora``: a train-unet --lora-rank OUT
    (diffusers LoRA weights) merged into the UNet at ``lora_scale``; a LoRA OUT given as ``model`` stands for
    its base model with those adapters. ``scheduler``: None = the model's own. ``safety_checker``: load the
    model's ``safety_checker/`` (SD1.x; ValueError when it has none).
    """
    from ..models.components import model_index
    from ..models.families import family_of, load_components
    from ..models.loading import folder_hint, no_hf_progress_bars
    from ..models.lora import apply_lora, check_lora, resolve_lora_model

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    model, lora, revision, vae = resolve_lora_model(model, lora, revision)
    if lora is not None:  # adapters of another family refused, the run's --text-encoder taken, before any weight
        text_encoder = check_lora(model, lora, revision, text_encoder)
    with no_hf_progress_bars():
        comps = load_components(model, revision=revision, text_encoder=text_encoder, dtype=dtype, vae=vae)
    family = comps.family
    if safety_checker and not family.has_safety_checker:
        raise UserError(f"--safety-checker on: {family.label} pipelines have no safety checker; use --safety-checker off")
    if unet is not None:
        from diffusers import UNet2DConditionModel  # load_config reads any config.json

        folder, sub = _unet_source(unet)
        other = family_of(UNet2DConditionModel.load_config(folder, subfolder=sub))
        if other is not family:  # before its weights are read
            raise UserError(f"--unet {unet}: a {other.label} denoiser, but {model} is {family.label}; pass a "
                            f"{family.denoiser_label} of the same family")
        base_channels = comps.unet.config.in_channels
        with folder_hint(folder, family.denoiser_label):
            comps.unet = family.load_denoiser(folder, sub, dtype)  # the base UNet is not kept
        if comps.unet.config.in_channels != base_channels:
            raise UserError(f"--unet {unet}: {comps.unet.config.in_channels} input channels, but {model}'s VAE "
                             f"latents have {base_channels}; pass a UNet of the same family")
        family.check_components(comps)
    checker, extractor = _safety_parts(str(model), revision, dtype) if safety_checker else (None, None)
    pipe = family.pipeline(comps, inference_scheduler(str(model), revision, scheduler), checker, extractor,
                           family.pipeline_options(model_index(model, revision)))
    if lora is not None:
        apply_lora(pipe, lora, lora_scale)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


