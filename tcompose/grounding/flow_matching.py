"""The training objective of a flow-matching diffusion transformer (SD3 / SD3.5, FLUX.1), as diffusers' DreamBooth
scripts train them (``examples/dreambooth/train_dreambooth_lora_sd3.py``, ``train_dreambooth_lora_flux.py``), with
the joint-attention capture of :mod:`.joint_attention`.

    objective = FlowMatchingObjective(weighting_scheme="logit_normal", packed=True, guidance=3.5)   # FLUX.1-dev
    t = objective.draw_timestep(noise_scheduler, generator)        # one example's timestep, from its own generator
    noisy, target = objective.training_inputs(noise_scheduler, latents, noise, timesteps)
    losses = tokencompose_losses(transformer, latents, cond, batch, noise_scheduler, layers, lam, gam, objective=objective)

- Timesteps: ``u = compute_density_for_timestep_sampling(weighting_scheme, ...)`` (logit-normal with ``logit_mean``
  / ``logit_std``, ``mode`` with ``mode_scale``, else uniform), index ``int(u * num_train_timesteps)`` into the
  training scheduler's ``timesteps`` (``FlowMatchEulerDiscreteScheduler`` as read from ``scheduler/``: shifted for
  SD3, unshifted for FLUX.1-dev, whose scheduler shifts dynamically at inference). Each example draws its ``u``
  from its own generator (:class:`tcompose.train.examples.TrainingExamples`), so a resumed run sees the same ones.
- ``sigma`` is the scheduler's sigma at that timestep (a timestep not on the schedule, such as the grounding
  score's fixed 100 ... 900: ``t / num_train_timesteps``); ``noisy = (1 - sigma) x + sigma noise``, target
  ``noise - x``; per-example loss weights ``compute_loss_weighting_for_sd3(weighting_scheme, sigma)`` (``sigma_sqrt``:
  ``sigma^-2``, ``cosmap``: ``2 / (pi (1 - 2 sigma + 2 sigma^2))``, the others 1).
- The transformer is called with ``timestep = t`` (SD3) or ``t / 1000`` with the latents packed 2 x 2 into tokens,
  their ``img_ids`` and, where the model embeds it, the distilled ``guidance`` (FLUX.1, ``packed=True``); its
  prediction is unpacked back to ``[B, C, h, w]``.
- Capture: :func:`.joint_attention.capture_joint_attention` with ``attention_norm`` (text or joint softmax).

Pure tensor code: what differs between the families (packing, guidance) is passed in by the model family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from ..io.errors import UserError
from .joint_attention import (NORMS, capture_joint_attention, default_joint_layers, describe_blocks,
                              joint_attention_groups, resolve_joint_layers)

#: ``--weighting-scheme`` values (diffusers' SD3 / FLUX training scripts).
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w] -> [B, (h/2)(w/2), 4C]``: 2 x 2 patches as tokens, row-major (FLUX.1's packing)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: ``[B, (h/2)(w/2), 4C] -> [B, C, h, w]``."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[h * w, 3]`` position ids of a packed ``h x w`` token grid: ``(0, row, column)``, row-major."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(dtype)


def _unwrap(model):
    return getattr(model, "module", model)


@dataclass(frozen=True)
class FlowMatchingObjective:
    """Flow-matching training and joint-attention capture of a diffusion transformer (see the module docstring).

    ``packed``: FLUX.1's 2 x 2 packed latents with ``img_ids`` and ``timestep / 1000``; ``guidance``: the guidance
    value fed to a transformer that embeds it (None: none is fed)."""

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    attention_norm: str = "text"
    packed: bool = False
    guidance: float | None = None

    def __post_init__(self):
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise UserError(f"--weighting-scheme {self.weighting_scheme!r}: choose one of {', '.join(WEIGHTING_SCHEMES)}")
        if self.attention_norm not in NORMS:
            raise UserError(f"--attention-norm {self.attention_norm!r}: choose one of {', '.join(NORMS)}")

    # -- one example's timestep ------------------------------------------------------------------------------------
    def draw_timestep(self, noise_scheduler, generator: torch.Generator) -> torch.Tensor:
        """One example's timestep (a float32 scalar from the scheduler's ``timesteps``), drawn from ``generator``."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.weighting_scheme, 1, self.logit_mean, self.logit_std,
                                                  self.mode_scale, generator=generator)
        index = (u * noise_scheduler.config.num_train_timesteps).long()
        return noise_scheduler.timesteps[index][0].float()

    # -- the training step ----------------------------------------------------------------------------------------
    def sigmas(self, noise_scheduler, timesteps: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
        """Each example's sigma, shaped to broadcast over ``ndim``-dimensional latents: the scheduler's sigma of the
        timestep (diffusers' ``get_sigmas``), or ``t / num_train_timesteps`` for a timestep not on its schedule."""
        device = timesteps.device
        schedule = noise_scheduler.timesteps.to(device)
        table = noise_scheduler.sigmas.to(device=device, dtype=dtype)
        t = timesteps.to(schedule.dtype).reshape(-1)
        match = schedule[None, :] == t[:, None]
        on_schedule = table[match.to(torch.int64).argmax(dim=1)]
        off_schedule = (t / noise_scheduler.config.num_train_timesteps).to(dtype)
        sigma = torch.where(match.any(dim=1), on_schedule, off_schedule)
        return sigma.reshape(-1, *([1] * (ndim - 1)))

    def training_inputs(self, noise_scheduler, latents, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noisy latents, target)``: ``(1 - sigma) x + sigma noise`` and ``noise - x``."""
        sigma = self.sigmas(noise_scheduler, timesteps, latents.ndim, latents.dtype)
        return (1.0 - sigma) * latents + sigma * noise, noise - latents

    def loss_weights(self, noise_scheduler, timesteps, snr_gamma: float | None) -> torch.Tensor | None:
        """Per-example weights ``[B]`` of the denoising loss (``compute_loss_weighting_for_sd3``); None where the
        scheme weighs every example 1 (``snr_gamma`` is the UNets' and refused before training)."""
        if self.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        sigma = self.sigmas(noise_scheduler, timesteps, 1, torch.float32)
        return compute_loss_weighting_for_sd3(self.weighting_scheme, sigma).float()

    def predict(self, denoiser, noisy, timesteps, cond: dict) -> torch.Tensor:
        """The transformer's velocity prediction for ``noisy [B, C, h, w]`` (FLUX: packed in, unpacked out)."""
        b = noisy.shape[0]
        t = timesteps.reshape(-1).expand(b) if timesteps.numel() == 1 else timesteps
        if not self.packed:
            return denoiser(hidden_states=noisy, timestep=t, return_dict=False, **cond)[0]
        h, w = noisy.shape[-2:]
        extra = {}
        if self.guidance is not None:
            extra["guidance"] = torch.full((b,), float(self.guidance), device=noisy.device, dtype=torch.float32)
        out = denoiser(hidden_states=pack_latents(noisy), timestep=t.float() / 1000.0,
                       img_ids=image_ids(h // 2, w // 2, noisy.device, noisy.dtype), return_dict=False, **cond, **extra)[0]
        return unpack_latents(out, h, w)

    # -- attention ------------------------------------------------------------------------------------------------
    def capture(self, denoiser, layers):
        """A context manager recording the ``layers`` blocks' image-to-text maps (:func:`capture_joint_attention`)."""
        return capture_joint_attention(_unwrap(denoiser), layers, norm=self.attention_norm)

    def attention_groups(self, denoiser_config, latent_hw: tuple[int, int], conditioning: dict | None = None) -> dict[str, int]:
        return joint_attention_groups(denoiser_config)

    def default_layers(self, denoiser_config) -> tuple[str, ...]:
        return default_joint_layers(denoiser_config)

    def resolve_layers(self, layers: Iterable[str], groups: dict[str, int], where: str = "") -> dict[str, int]:
        return resolve_joint_layers(layers, groups, where)

    def describe(self, groups: dict[str, int]) -> str:
        return describe_blocks(groups)


__all__ = ["FlowMatchingObjective", "WEIGHTING_SCHEMES", "image_ids", "pack_latents", "unpack_latents"]
