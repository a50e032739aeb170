"""Sampling a diffusers pipeline with per-image seeds: what generate, multigen, attnviz and train-unet's
validation images share.

    latents, gens = initial_latents([image_seed(0, p, k) for p, k in jobs], shape)
    images, nsfw = generate_batch(pipe, prompts, seeds, steps=50, guidance=7.5)   # uint8 [B, H, W, 3]

Seeding: image ``i`` of a batch starts from ``torch.randn((1, C, H/8, W/8), generator=Generator("cpu")
.manual_seed(seeds[i]))`` in float32, cast to the pipeline's dtype and moved to its device, so an image's
start does not depend on its batch, the device or the process. The same per-image CPU generators go to the
pipeline too (a stochastic scheduler then draws each image's noise from its own generator). For float32
this is exactly what ``pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds])`` does.
``image_seed(seed, prompt, image)`` is the seed of one image: a hash of the three numbers.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import UserError

__all__ = ["SCHEDULERS", "image_seed", "inference_scheduler", "initial_latents", "PromptEmbeddings", "generate_batch"]


#: ``--scheduler`` names -> (diffusers class, extra config).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
}


def initial_latents(seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> tuple[torch.Tensor, list[torch.Generator]]:
    """Per-image starting noise ``[len(seeds), *shape]`` (each from its own CPU generator, in float32, then
    cast), and the generators, positioned after their draw."""
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    noise = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in gens]
    return torch.cat(noise).to(device=device, dtype=dtype), gens


class PromptEmbeddings:
    """Text embeddings per prompt, cached: the prompts of a batch not seen yet are encoded in one call.

    What a prompt's embeddings are, and the unconditional ones for guidance, is the model family's
    (:mod:`tcompose.models.families`): SD's ``prompt_embeds``; SDXL's also a pooled embedding, its empty prompt
    all zeros when the model says ``force_zeros_for_empty_prompt`` (SDXL base does), as the pipeline's own call
    would make it.
    """

    def __init__(self, pipe, max_cached: int = 512):
        from .families import family_of_pipeline

        self.pipe = pipe
        self.max_cached = max_cached
        self.family = family_of_pipeline(pipe)
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def _encode(self, prompts: list[str]) -> None:
        if len(self._cache) + len(prompts) > self.max_cached:
            self._cache.clear()
        with torch.inference_mode():
            self._cache.update(zip(prompts, self.family.encode_prompts(self.pipe, prompts)))

    def __call__(self, prompts: Sequence[str], guidance: bool) -> dict[str, torch.Tensor]:
        """The pipeline's embedding arguments: ``prompt_embeds [B, 77, D]`` (and the family's others, such as
        SDXL's ``pooled_prompt_embeds``); with guidance the empty prompt's as ``negative_prompt_embeds`` (...)."""
        wanted = list(prompts) + ([""] if guidance else [])
        new = list(dict.fromkeys(p for p in wanted if p not in self._cache))
        if new:
            self._encode(new)
        if any(p not in self._cache for p in wanted):  # the cache was cleared in between: encode all at once
            self._cache.clear()
            self._encode(list(dict.fromkeys(wanted)))
        out = {key: torch.stack([self._cache[p][key] for p in prompts]) for key in self._cache[prompts[0]]}
        if guidance:
            negative = self.family.negative_embeddings(self.pipe, self._cache[""])
            out.update({key: value.expand_as(out[key.replace("negative_", "", 1)]) for key, value in negative.items()})
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
        raise UserError(f"--height/--width must be multiples of 8, got {height}x{width}")
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


def image_seed(seed: int, prompt_id: int, image_index: int) -> int:
    """The seed of image ``image_index`` of prompt ``prompt_id``: a 63-bit hash of the three numbers."""
    digest = hashlib.sha256(f"tcompose-generate:{int(seed)}:{int(prompt_id)}:{int(image_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def inference_scheduler(model: str, revision: str | None = None, name: str | None = None):
    """The model's own inference scheduler (``scheduler/scheduler_config.json``), or ``name`` (see :data:`SCHEDULERS`)
    built from the same config."""
    import diffusers
    from diffusers import DDPMScheduler

    from .loading import local_path

    hub = {} if local_path(model) is not None else {"revision": revision}
    config = DDPMScheduler.load_config(str(model), subfolder="scheduler", **hub)
    if name is None:
        cls = getattr(diffusers, config.get("_class_name", ""), None)
        if cls is None:
            raise UserError(f"{model}: unknown scheduler class {config.get('_class_name')!r} in scheduler/; "
                             f"pass --scheduler {'|'.join(SCHEDULERS)}")
        return cls.from_config(config)
    if name not in SCHEDULERS:
        raise UserError(f"--scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **extra)
