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

__all__ = ["DTYPES", "resolve_device", "resolve_dtype", "dtype_name", "model_facts", "load_pipeline"]

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
    """(folder, subfolder) of a ``--unet`` path: a UNet folder, or a pipeline / train-unet OUT with unet/.
    ModelFolderError when neither holds a UNet's config.json."""
    import json

    from ..models.loading import ModelFolderError

    path = Path(unet).expanduser()
    folder, sub = (path, "unet") if (path / "unet" / "config.json").is_file() else (path, None)
    config_file = path / (sub or "") / "config.json"
    if not config_file.is_file():
        raise ModelFolderError(f"--unet {path}: no config.json there nor in {path / 'unet'}; pass a UNet folder "
                               "(UNet2DConditionModel.save_pretrained) or a pipeline folder such as a train-unet OUT")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ModelFolderError(f"--unet {path}: {config_file} does not read as JSON ({err})") from None
    if not isinstance(config, dict) or "sample_size" not in config or "cross_attention_dim" not in config:
        kind = config.get("_class_name") or config.get("model_type") if isinstance(config, dict) else None
        raise ModelFolderError(f"--unet {path}: {config_file} is not a UNet2DConditionModel's config "
                               f"({'it describes ' + repr(kind) if kind else 'no sample_size / cross_attention_dim'}); "
                               "pass a UNet folder or a pipeline folder with unet/, such as a train-unet OUT")
    return str(folder), sub


def model_facts(model: str | os.PathLike, unet: str | None = None, revision: str | None = None,
                scheduler: str | None = None) -> dict[str, Any]:
    """Read from configs only (no weights): the inference scheduler's class, the default image size, the VAE's
    downsampling factor and the UNet's config (of a LoRA run's OUT: its base model's)."""
    import contextlib

    from ..models.loading import ModelFolderError, hub_hint, local_path
    from ..models.lora import resolve_lora_model

    model, _, revision, _ = resolve_lora_model(model, None, revision)

    if scheduler is not None and scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)} (or leave it out for "
                         "the model's own)")
    local = local_path(model)
    if local is not None:
        missing = [s for s in ("unet", "vae", "scheduler") if not (local / s).is_dir()]
        if missing:
            raise ModelFolderError(f"{local} is not a diffusers Stable Diffusion folder: missing "
                                   f"{', '.join(s + '/' for s in missing)}. Pass a folder written by "
                                   "`StableDiffusionPipeline.save_pretrained` or `tcompose train-unet`, or a hub id.")
    with contextlib.nullcontext() if local is not None else hub_hint(str(model), None):
        return _facts(model, unet, {} if local is not None else {"revision": revision}, scheduler)


def _facts(model, unet, hub: dict, scheduler: str | None) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    if scheduler is not None:
        sched_class = SCHEDULERS[scheduler][0]
    else:
        sched_class = DDPMScheduler.load_config(str(model), subfolder="scheduler", **hub)["_class_name"]
    if unet is not None:
        folder, sub = _unet_source(unet)
        unet_cfg = UNet2DConditionModel.load_config(folder, subfolder=sub)
    else:
        unet_cfg = UNet2DConditionModel.load_config(str(model), subfolder="unet", **hub)
    vae_cfg = AutoencoderKL.load_config(str(model), subfolder="vae", **hub)
    factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    return {"scheduler": sched_class, "size": int(unet_cfg["sample_size"]) * factor, "vae_factor": factor,
            "unet_config": dict(unet_cfg)}


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
        folder, sub = _unet_source(unet)
        base_channels = comps.unet.config.in_channels
        with folder_hint(folder, "UNet"):
            comps.unet = family.load_denoiser(folder, sub, dtype)  # the base UNet is not kept
        if family_of(comps.unet) is not family:
            raise UserError(f"--unet {unet}: a {family_of(comps.unet).label} denoiser, but {model} is {family.label}; "
                            "pass a UNet of the same family")
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


