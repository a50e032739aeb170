"""Stable Diffusion inference for `generate`, `multigen` and `attnviz`: the pipeline, seeded latents, a batch.

    pipe = load_pipeline("runs/tc", dtype="fp16", scheduler="ddim", device="cuda")
    images, nsfw = generate_batch(pipe, ["a cat and a wine glass"] * 2, seeds=[11, 12], steps=50, guidance=7.5)
    # images: uint8 numpy [B, H, W, 3]; nsfw: list of bool, or None without a safety checker

The pipeline is diffusers' ``StableDiffusionPipeline`` built from :func:`tcompose.models.load_components`
(same loading rules, offline hints and text-encoder checks as training), with the model's own inference
scheduler (``scheduler/scheduler_config.json``) unless ``scheduler`` names another: ``pndm``, ``ddim``,
``euler`` (Euler discrete, no churn) or ``dpm++`` (DPM-Solver++ multistep). All four are deterministic
given the initial latents.

Seeding: image ``i`` of a batch starts from ``torch.randn((1, C, H/8, W/8), generator=Generator("cpu")
.manual_seed(seeds[i]))`` in float32, cast to the pipeline's dtype and moved to its device, so an image's
start does not depend on its batch, the device or the process. The same per-image CPU generators go to the
pipeline too (a stochastic scheduler then draws each image's noise from its own generator). For float32
this is exactly what ``pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds])`` does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["SCHEDULERS", "DTYPES", "resolve_device", "resolve_dtype", "dtype_name", "model_facts",
           "load_pipeline", "initial_latents", "PromptEmbeddings", "generate_batch"]

#: ``--scheduler`` names -> (diffusers class, extra config).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
}
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
        raise ValueError(f"--dtype {dtype!r}: use auto, fp16, bf16 or fp32")
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
        raise ValueError(f"--scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)} (or leave it out for "
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


def _scheduler(model: str, revision: str | None, name: str | None):
    import diffusers
    from diffusers import DDPMScheduler

    from ..models.loading import local_path

    hub = {} if local_path(model) is not None else {"revision": revision}
    config = DDPMScheduler.load_config(str(model), subfolder="scheduler", **hub)
    if name is None:
        cls = getattr(diffusers, config.get("_class_name", ""), None)
        if cls is None:
            raise ValueError(f"{model}: unknown scheduler class {config.get('_class_name')!r} in scheduler/; "
                             f"pass --scheduler {'|'.join(SCHEDULERS)}")
        return cls.from_config(config)
    if name not in SCHEDULERS:
        raise ValueError(f"--scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **extra)


def _force_zeros(model: str, revision: str | None) -> bool:
    """SDXL's ``force_zeros_for_empty_prompt`` from the model's ``model_index.json`` (True, as diffusers', if absent)."""
    import json

    from ..models.loading import local_path

    local = local_path(model)
    try:
        if local is not None:
            index = json.loads((local / "model_index.json").read_text())
        else:
            from diffusers import DiffusionPipeline

            index = DiffusionPipeline.load_config(str(model), revision=revision)
    except (OSError, ValueError):
        return True
    return bool(index.get("force_zeros_for_empty_prompt", True))


def _safety_parts(model: str, revision: str | None, dtype: torch.dtype):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    from ..models.loading import local_path

    local = local_path(model)
    if local is not None and not ((local / "safety_checker").is_dir() and (local / "feature_extractor").is_dir()):
        raise ValueError(f"{local} has no safety_checker/ and feature_extractor/: pass --safety-checker off, or a "
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
    """A ready ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (progress bar off) on ``device``.

    ``unet``: a UNet folder, or a pipeline folder with ``unet/`` (a train-unet OUT), replacing the model's.
    ``text_encoder``: see :func:`tcompose.models.load_text_encoder`. ``lora``: a train-unet --lora-rank OUT
    (diffusers LoRA weights) merged into the UNet at ``lora_scale``; a LoRA OUT given as ``model`` stands for
    its base model with those adapters. ``scheduler``: None = the model's own. ``safety_checker``: load the
    model's ``safety_checker/`` (SD1.x; ValueError when it has none).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    from ..models.loading import no_hf_progress_bars
    from ..models.lora import apply_lora, resolve_lora_model
    from ..models.stable_diffusion import check_text_encoder, load_components

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    model, lora, revision, vae = resolve_lora_model(model, lora, revision)
    with no_hf_progress_bars():
        comps = load_components(model, revision=revision, text_encoder=text_encoder, dtype=dtype, vae=vae)
    unet_model = comps.unet
    if unet is not None:
        folder, sub = _unet_source(unet)
        kw = {"torch_dtype": dtype} if dtype != torch.float32 else {}
        unet_model = UNet2DConditionModel.from_pretrained(folder, subfolder=sub, use_safetensors=True, **kw)
        if unet_model.config.in_channels != comps.unet.config.in_channels:
            raise ValueError(f"--unet {unet}: {unet_model.config.in_channels} input channels, but {model}'s VAE "
                             f"latents have {comps.unet.config.in_channels}; pass a UNet of the same family")
        check_text_encoder(comps.text_encoder, unet_model, comps.tokenizer, comps.text_encoder_2)
        comps.unet = None  # the base UNet is not kept
    if comps.is_sdxl:
        if safety_checker:
            raise ValueError("--safety-checker on: SDXL pipelines have no safety checker; use --safety-checker off")
        pipe = StableDiffusionXLPipeline(
            vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
            tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=unet_model,
            scheduler=_scheduler(str(model), revision, scheduler), force_zeros_for_empty_prompt=_force_zeros(model, revision),
            add_watermarker=False,
        )
    else:
        checker, extractor = _safety_parts(str(model), revision, dtype) if safety_checker else (None, None)
        pipe = StableDiffusionPipeline(
            vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=unet_model,
            scheduler=_scheduler(str(model), revision, scheduler), safety_checker=checker,
            feature_extractor=extractor, requires_safety_checker=safety_checker,
        )
    if lora is not None:
        apply_lora(pipe, lora, lora_scale)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def initial_latents(seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> tuple[torch.Tensor, list[torch.Generator]]:
    """Per-image starting noise ``[len(seeds), *shape]`` (each from its own CPU generator, in float32, then
    cast), and the generators, positioned after their draw."""
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    noise = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in gens]
    return torch.cat(noise).to(device=device, dtype=dtype), gens


class PromptEmbeddings:
    """Text embeddings per prompt, cached: the prompts of a batch not seen yet are encoded in one call.

    SDXL pipelines also give each prompt a pooled embedding; its empty prompt is all zeros when the model says
    ``force_zeros_for_empty_prompt`` (SDXL base does), as the pipeline's own call would make it.
    """

    def __init__(self, pipe, max_cached: int = 512):
        self.pipe = pipe
        self.max_cached = max_cached
        self.sdxl = hasattr(pipe, "text_encoder_2")
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _encode(self, prompts: list[str]) -> None:
        if len(self._cache) + len(prompts) > self.max_cached:
            self._cache.clear()
        with torch.inference_mode():
            if self.sdxl:
                emb, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.pipe._execution_device,
                                                            num_images_per_prompt=1, do_classifier_free_guidance=False)
                self._cache.update(zip(prompts, zip(emb.unbind(0), pooled.unbind(0))))
            else:
                emb, _ = self.pipe.encode_prompt(prompts, self.pipe._execution_device, 1, False)
                self._cache.update(zip(prompts, ((e, None) for e in emb.unbind(0))))

    def _empty(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        emb, pooled = self._cache[""]
        if self.sdxl and self.pipe.config.get("force_zeros_for_empty_prompt", True):
            return torch.zeros_like(emb), torch.zeros_like(pooled)
        return emb, pooled

    def __call__(self, prompts: Sequence[str], guidance: bool) -> dict[str, torch.Tensor]:
        """The pipeline's embedding arguments: ``prompt_embeds [B, 77, D]``, with guidance the empty prompt's as
        ``negative_prompt_embeds``; SDXL also ``pooled_prompt_embeds`` (and the negative one)."""
        wanted = list(prompts) + ([""] if guidance else [])
        new = list(dict.fromkeys(p for p in wanted if p not in self._cache))
        if new:
            self._encode(new)
        if any(p not in self._cache for p in wanted):  # the cache was cleared in between: encode all at once
            self._cache.clear()
            self._encode(list(dict.fromkeys(wanted)))
        cond = torch.stack([self._cache[p][0] for p in prompts])
        out = {"prompt_embeds": cond}
        if self.sdxl:
            out["pooled_prompt_embeds"] = torch.stack([self._cache[p][1] for p in prompts])
        if guidance:
            emb, pooled = self._empty()
            out["negative_prompt_embeds"] = emb.expand_as(cond)
            if self.sdxl:
                out["negative_pooled_prompt_embeds"] = pooled.expand_as(out["pooled_prompt_embeds"])
        return out


def generate_batch(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int = 50, guidance: float = 7.5,
                   height: int | None = None, width: int | None = None,
                   embeddings: PromptEmbeddings | None = None) -> tuple[np.ndarray, list[bool] | None]:
    """Images of ``prompts`` (one per prompt, image i seeded by ``seeds[i]``): uint8 [B, H, W, 3], and the
    safety checker's NSFW flags (None when the pipeline has no checker)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    factor = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * factor
    width = width or pipe.unet.config.sample_size * factor
    if height % 8 or width % 8:
        raise ValueError(f"--height/--width must be multiples of 8, got {height}x{width}")
    device = pipe._execution_device
    shape = (pipe.unet.config.in_channels, height // factor, width // factor)
    latents, gens = initial_latents(seeds, shape, pipe.unet.dtype, device)
    embeds = (embeddings or PromptEmbeddings(pipe))(prompts, guidance > 1)
    with torch.inference_mode():
        out = pipe(**embeds, latents=latents, generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                   height=height, width=width, output_type="pt")
        images = out.images.float().mul(255).round().clamp(0, 255).to(torch.uint8)
    flags = getattr(out, "nsfw_content_detected", None)
    nsfw = None if flags is None else [bool(x) for x in flags]
    return images.permute(0, 2, 3, 1).cpu().numpy(), nsfw
