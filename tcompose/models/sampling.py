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

Attend-and-Excite (``generate_batch(..., excite=, excite_indices=)``, :func:`attend_and_excite`) runs around the
pipeline's own loop from the same initial latents: its latent updates come in through the pipeline's
``callback_on_step_end``; the maths is :mod:`tcompose.grounding.attend_excite`.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import torch

from ..io.errors import UserError

__all__ = ["SCHEDULERS", "image_seed", "inference_scheduler", "initial_latents", "PromptEmbeddings", "generate_batch",
           "attend_and_excite", "check_excitable", "excite_groups", "excite_positions"]


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
                   embeddings: PromptEmbeddings | None = None, excite=None,
                   excite_indices: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, list[bool] | None]:
    """Images of ``prompts`` (one per prompt, image i seeded by ``seeds[i]``): uint8 [B, H, W, 3], and the
    safety checker's NSFW flags (None when the pipeline has no checker).

    ``excite``: Attend-and-Excite's settings (``steps``, ``thresholds``, ``refinements``, ``scale``,
    ``resolution``: :class:`tcompose.evaluate.settings.ExciteSettings`), with ``excite_indices[i]`` the token
    positions prompt i excites (an empty list: plain sampling for it). Each image starts from the same noise as
    without it (:func:`attend_and_excite`)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    from .families import family_of_pipeline

    family = family_of_pipeline(pipe)
    denoiser = family.denoiser_of(pipe)
    factor = pipe.vae_scale_factor
    height = height or family.default_image_size(pipe)
    width = width or family.default_image_size(pipe)
    if height % 8 or width % 8:
        raise UserError(f"--height/--width must be multiples of 8, got {height}x{width}")
    device = pipe._execution_device
    shape = (family.latent_channels(denoiser.config), height // factor, width // factor)
    excited = excite is not None and any(excite_indices or ())
    with torch.inference_mode(not excited):  # Attend-and-Excite takes gradients through the denoiser
        latents, gens = initial_latents(seeds, shape, denoiser.dtype, device)
        latents = family.pipeline_latents(pipe, latents)  # FLUX: packed 2 x 2, as its pipeline packs its own noise
        embeds = (embeddings or PromptEmbeddings(pipe))(prompts, guidance > 1 and family.classifier_free_guidance)
        call: dict = {}
        if excited:
            embeds = {k: v.clone() for k, v in embeds.items()}  # cached under inference mode: plain tensors here
            latents, call = attend_and_excite(pipe, latents, embeds["prompt_embeds"], excite, excite_indices, steps)
        with torch.no_grad():
            out = pipe(**embeds, latents=latents, generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                       height=height, width=width, output_type="pt", **call)
            images = out.images.float().mul(255).round().clamp(0, 255).to(torch.uint8)
    flags = getattr(out, "nsfw_content_detected", None)
    nsfw = None if flags is None else [bool(x) for x in flags]
    return images.permute(0, 2, 3, 1).cpu().numpy(), nsfw


def excite_positions(comps, prompt: str, words: Sequence[str], required: bool = False) -> list[int]:
    """The token positions Attend-and-Excite excites in ``prompt``: every token of every word of ``words``
    (flattened; a word absent from the prompt's tokens is left out, or refused when ``required``)."""
    found = comps.phrase_positions(prompt, list(words))
    missing = [w for w, pos in zip(words, found) if pos is None]
    if required and missing:
        raise UserError(f"--excite-words {', '.join(missing)}: not among the tokens of the prompt {prompt!r}")
    return [t for pos in found if pos for t in pos]


def excite_groups(groups: Sequence[str], resolution: int, size: str = "") -> list[str]:
    """The attention groups (of a model at some size: :meth:`Components.attention_groups`) that Attend-and-Excite
    reads: those whose maps have side ``resolution``; a UserError listing the sides there are when none has."""
    picked = [g for g in groups if g.endswith(f"_{resolution}")]
    if not picked:
        sides = sorted({g.rsplit("_", 1)[1] for g in groups}, key=lambda s: (len(s), s))
        raise UserError(f"--excite-res {resolution}: the model has no cross-attention maps of side {resolution}"
                        f"{' at ' + size if size else ''}; its sides there are {', '.join(sides)}")
    return picked


def attend_and_excite(pipe, latents: torch.Tensor, cond: torch.Tensor, excite, indices: Sequence[Sequence[int]],
                      steps: int) -> tuple[torch.Tensor, dict]:
    """Attend-and-Excite around the pipeline's own denoising loop (:mod:`tcompose.grounding.attend_excite`).

    Returns the initial latents with step 0's update applied and the pipeline keyword arguments
    (``callback_on_step_end``) that apply step ``i + 1``'s to the latents the scheduler leaves after step ``i``:
    the update happens where the method has it, before the denoiser's guided pass of each step. ``cond``: the
    prompts' conditional embeddings ``[B, 77, D]``."""
    from ..grounding.attend_excite import excite_latent
    from .families import components_of_pipeline

    comps = components_of_pipeline(pipe)
    check_excitable(comps.family)
    h, w = latents.shape[-2:]
    groups = excite_groups(comps.attention_groups((h, w)), excite.resolution,
                           f"{h * pipe.vae_scale_factor}x{w * pipe.vae_scale_factor} px")
    pipe.scheduler.set_timesteps(steps, device=latents.device)  # the pipeline sets the same ones again
    timesteps = pipe.scheduler.timesteps.clone()
    sigma = pipe.scheduler.init_noise_sigma
    unet, objective = comps.denoiser, comps.objective

    def excite_all(z: torch.Tensor, i: int) -> torch.Tensor:
        out = []
        for b in range(z.shape[0]):
            if not indices[b]:
                out.append(z[b : b + 1])
                continue
            cond_b = {"encoder_hidden_states": cond[b : b + 1]}
            zb, _ = excite_latent(
                lambda x: objective.predict(unet, x, timesteps[i], cond_b),
                lambda layers: objective.capture(unet, layers), z[b : b + 1], i, indices[b], resolution=excite.resolution,
                groups=groups, n_steps=len(timesteps), steps=excite.steps, thresholds=dict(excite.thresholds),
                refinements=excite.refinements, scale=excite.scale)
            out.append(zb.to(z.dtype))
        return torch.cat(out)

    def on_step_end(_pipe, i: int, _t, kwargs: dict) -> dict:
        if i + 1 >= len(timesteps):
            return {}
        return {"latents": excite_all(kwargs["latents"], i + 1)}

    first = excite_all(latents * sigma, 0) / sigma
    return first, {"callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": ["latents"]}


def check_excitable(family) -> None:
    """A UserError unless Attend-and-Excite's sampler serves ``family``, naming the families it serves."""
    from .families import FAMILIES

    if not family.supports_attend_excite:
        raise UserError(f"--attend-excite: {family.label} is not supported; it runs on "
                        f"{', '.join(f.label for f in FAMILIES if f.supports_attend_excite)} models")


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
