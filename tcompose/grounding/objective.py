"""The TokenCompose objective for one batch: L_LDM + lambda * L_token + gamma * L_pixel.

Pure of I/O and of the training loop, so the loop, the benchmarks and the tests run the same code.

The denoiser's conditioning is a dict of its keyword arguments, which the model family's ``encode_text``
builds (:mod:`tcompose.models.families`); how the denoiser is trained (noisy input, target, weights) and how its
attention is captured is the family's ``objective`` (:class:`UNetObjective` for the UNets, :class:`.flow_matching.FlowMatchingObjective` for SD3 / FLUX).

``snr_gamma`` (Min-SNR weighting, Hang et al. 2023, as diffusers' ``train_text_to_image.py`` applies it)
weighs each example's denoising loss by ``min(SNR(t), gamma) / SNR(t)`` for an epsilon target and
``min(SNR(t), gamma) / (SNR(t) + 1)`` for a v target; the grounding terms are not weighted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..io.errors import UserError
from .attention import attention_groups, capture_cross_attention, describe_groups, resolve_layers
from .losses import MAP_REDUCTIONS, grounding_losses, reduce_over_words, resize_mask


def snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``alpha_bar_t / (1 - alpha_bar_t)`` of each timestep, float32 ``[B]``."""
    alphas = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas / (1.0 - alphas)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights of the denoising loss per example ``[B]`` (epsilon or v-prediction targets)."""
    s = snr(noise_scheduler, timesteps)
    clipped = torch.minimum(s, torch.full_like(s, float(gamma)))
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / s
    if kind == "v_prediction":
        return clipped / (s + 1.0)
    raise UserError(f"--snr-gamma needs an epsilon or v_prediction model, this one predicts {kind!r}")


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """L_LDM: the mean squared error in float32, each example weighted by ``weights [B]`` when given."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    return (per_example * weights).mean()


def _as_cond(cond) -> dict:
    return cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}


class UNetObjective:
    """What the TokenCompose objective needs to know of a DDPM-trained UNet (SD1.x, SD2.x, SDXL): the noisy input
    and target of a training step (epsilon or v, as the scheduler says), the Min-SNR weights, how to run the
    denoiser, and how to capture its text-to-image attention (:func:`capture_cross_attention`, groups named
    ``{block}_{side}``). A model family (:mod:`tcompose.models.families`) names the objective of its denoiser;
    a family with another denoiser or training process brings its own with the same methods (the diffusion
    transformers: :class:`.flow_matching.FlowMatchingObjective`)."""

    def draw_timestep(self, noise_scheduler, generator: torch.Generator) -> torch.Tensor:
        """One example's timestep, uniform over the scheduler's training timesteps, drawn from ``generator``."""
        return torch.randint(0, noise_scheduler.config.num_train_timesteps, (), generator=generator)

    def training_inputs(self, noise_scheduler, latents, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noisy latents, target)`` of a DDPM training step."""
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            return noisy, noise_scheduler.get_velocity(latents, noise, timesteps)
        return noisy, noise

    def loss_weights(self, noise_scheduler, timesteps, snr_gamma: float | None) -> torch.Tensor | None:
        return min_snr_weights(noise_scheduler, timesteps, snr_gamma) if snr_gamma is not None else None

    def predict(self, denoiser, noisy, timesteps, cond: dict) -> torch.Tensor:
        return denoiser(noisy, timesteps, **cond).sample

    def capture(self, denoiser, layers):
        """A context manager recording the ``layers`` maps of every forward pass (see :mod:`.attention`)."""
        return capture_cross_attention(_unwrap(denoiser), layers)

    def attention_groups(self, denoiser_config, latent_hw: tuple[int, int], conditioning: dict | None = None) -> dict[str, int]:
        """The capturable groups (name -> layer count) at ``latent_hw``, from the config alone (``conditioning``:
        one example's denoiser keyword arguments, for their shapes)."""
        return attention_groups(denoiser_config, latent_hw, conditioning)

    def default_layers(self, denoiser_config) -> tuple[str, ...]:
        """The groups supervised when ``--layers`` is not given: the reference's mid and up blocks."""
        return ("mid", "up")

    def resolve_layers(self, layers, groups: dict[str, int], where: str = "") -> dict[str, int]:
        """The groups of ``groups`` a ``--layers`` selection picks (:func:`.attention.resolve_layers`)."""
        return resolve_layers(layers, groups, where)

    def describe(self, groups: dict[str, int]) -> str:
        return describe_groups(groups)


#: The objective of every UNet family; the default of the functions below.
UNET = UNetObjective()


def tokencompose_losses(unet, latents, cond, batch, noise_scheduler, layers, lambda_token, gamma_pixel, backward=None,
                        map_reduction: str = "sum", snr_gamma: float | None = None, objective=UNET) -> dict:
    """One forward pass: the denoising loss and, when their weights are non-zero, the grounding losses.

    ``latents`` are clean VAE latents; ``cond`` the denoiser's conditioning (a dict of its keyword arguments, as
    the model family's ``encode_text`` gives it; a tensor is taken as ``encoder_hidden_states``); ``batch`` holds
    ``noise``, ``timesteps``, ``masks [B, W, R, R]``, ``word_index`` and ``word_valid`` (see
    :mod:`tcompose.train.examples`). ``objective`` says how the denoiser is trained and captured
    (:class:`UNetObjective` for the UNets). Token and pixel losses are summed over the supervised layer groups
    and averaged over examples, like the denoising loss; within a group the token loss sums its maps
    (``map_reduction="sum"``, the reference's) or averages them (``"mean"``).
    ``backward(total)`` is called inside the capture (needed under gradient checkpointing).
    """
    if map_reduction not in MAP_REDUCTIONS:
        raise UserError(f"--map-reduction must be one of {', '.join(MAP_REDUCTIONS)}, got {map_reduction!r}")
    cond = _as_cond(cond)
    timesteps = batch["timesteps"]
    noisy, target = objective.training_inputs(noise_scheduler, latents, batch["noise"], timesteps)
    weights = objective.loss_weights(noise_scheduler, timesteps, snr_gamma)
    grounded = lambda_token > 0 or gamma_pixel > 0
    zero = latents.new_zeros((), dtype=torch.float32)
    if not grounded:
        pred = objective.predict(unet, noisy, timesteps, cond)
        ldm = denoising_loss(pred, target, weights)
        out = {"ldm": ldm, "token": zero, "pixel": zero, "total": ldm}
        if backward is not None:
            backward(ldm)
        return out

    with objective.capture(unet, layers) as store:
        pred = objective.predict(unet, noisy, timesteps, cond)
        ldm = denoising_loss(pred, target, weights)
        token, pixel = zero, zero
        index, valid = batch["word_index"], batch["word_valid"]
        resized: dict[int, torch.Tensor] = {}
        for maps in store.maps.values():
            side = math.isqrt(maps[0].shape[2])
            if side not in resized:
                resized[side] = resize_mask(batch["masks"], side).flatten(-2)
            tok, pix = grounding_losses(maps, resized[side], index, valid, map_reduction)
            token = token + reduce_over_words(tok, valid)
            pixel = pixel + reduce_over_words(pix, valid)
        total = ldm + lambda_token * token + gamma_pixel * pixel
        if backward is not None:
            backward(total)
    return {"ldm": ldm, "token": token, "pixel": pixel, "total": total}


def _unwrap(model):
    return getattr(model, "module", model)
