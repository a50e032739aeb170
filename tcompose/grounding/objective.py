"""The TokenCompose objective for one batch: L_LDM + lambda * L_token + gamma * L_pixel.

Pure of I/O and of the training loop, so the loop, the benchmarks and the tests run the same code.

The UNet's conditioning is a dict of its keyword arguments (:func:`encode_text`): ``encoder_hidden_states``
for SD1.x / SD2.x; for SDXL also ``added_cond_kwargs`` (the second encoder's pooled ``text_embeds`` and the
six ``time_ids`` of each example's micro-conditioning: original size, crop corner, target size).

``snr_gamma`` (Min-SNR weighting, Hang et al. 2023, as diffusers' ``train_text_to_image.py`` applies it)
weighs each example's denoising loss by ``min(SNR(t), gamma) / SNR(t)`` for an epsilon target and
``min(SNR(t), gamma) / (SNR(t) + 1)`` for a v target; the grounding terms are not weighted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import capture_cross_attention
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
    raise ValueError(f"--snr-gamma needs an epsilon or v_prediction model, this one predicts {kind!r}")


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """L_LDM: the mean squared error in float32, each example weighted by ``weights [B]`` when given."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    return (per_example * weights).mean()


def _as_cond(cond) -> dict:
    return cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}


def tokencompose_losses(unet, latents, cond, batch, noise_scheduler, layers, lambda_token, gamma_pixel, backward=None,
                        map_reduction: str = "sum", snr_gamma: float | None = None) -> dict:
    """One forward pass: the denoising loss and, when their weights are non-zero, the grounding losses.

    ``latents`` are clean VAE latents; ``cond`` the UNet's conditioning (:func:`encode_text`; a tensor is taken
    as ``encoder_hidden_states``); ``batch`` holds ``noise``, ``timesteps``, ``masks [B, W, R, R]``,
    ``word_index`` and ``word_valid`` (see :mod:`tcompose.train.examples`). Token and pixel losses are summed
    over the supervised layer groups and averaged over examples, like the denoising loss; within a group the
    token loss sums its maps (``map_reduction="sum"``, the reference's) or averages them (``"mean"``).
    ``backward(total)`` is called inside the capture (needed under gradient checkpointing).
    """
    if map_reduction not in MAP_REDUCTIONS:
        raise ValueError(f"--map-reduction must be one of {', '.join(MAP_REDUCTIONS)}, got {map_reduction!r}")
    cond = _as_cond(cond)
    noise, timesteps = batch["noise"], batch["timesteps"]
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    weights = min_snr_weights(noise_scheduler, timesteps, snr_gamma) if snr_gamma is not None else None
    grounded = lambda_token > 0 or gamma_pixel > 0
    zero = latents.new_zeros((), dtype=torch.float32)
    if not grounded:
        pred = unet(noisy, timesteps, **cond).sample
        ldm = denoising_loss(pred, target, weights)
        out = {"ldm": ldm, "token": zero, "pixel": zero, "total": ldm}
        if backward is not None:
            backward(ldm)
        return out

    with capture_cross_attention(_unwrap(unet), layers) as store:
        pred = unet(noisy, timesteps, **cond).sample
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


def encode_text(text_encoder, input_ids, text_encoder_2=None, input_ids_2=None, time_ids=None) -> dict:
    """The UNet's text conditioning, without gradients.

    SD1.x / SD2.x: ``{"encoder_hidden_states": text_encoder(ids)[0]}``. SDXL (``text_encoder_2`` given): both
    encoders' penultimate hidden states concatenated on the feature axis, and ``added_cond_kwargs`` with the
    second encoder's pooled projection (``text_embeds``) and ``time_ids [B, 6]``, as diffusers' SDXL pipeline
    and training script build them.
    """
    with torch.no_grad():
        if text_encoder_2 is None:
            return {"encoder_hidden_states": text_encoder(input_ids)[0]}
        first = text_encoder(input_ids, output_hidden_states=True)
        second = text_encoder_2(input_ids_2, output_hidden_states=True)
        emb = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        pooled = second.text_embeds
        return {"encoder_hidden_states": emb,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}}


def encode_batch(vae, text_encoder, batch, text_encoder_2=None):
    """Frozen parts, no gradients: latents ``mean + std * eps`` (eps from the batch) and the UNet's conditioning.

    The VAE's ``mean`` and ``std`` come from ``batch["latent_moments"]`` ``[B, 2, C, h, w]`` when the batch
    carries them (``--cache-latents``, :mod:`tcompose.train.latent_cache`), else from encoding ``pixel_values``
    in the VAE's own dtype. Returns ``(latents float32, cond)`` with ``cond`` as :func:`encode_text` gives it.
    """
    with torch.no_grad():
        if "latent_moments" in batch:
            mean, std = batch["latent_moments"].unbind(1)
        else:
            dist = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist
            mean, std = dist.mean, dist.std
        latents = (mean + std * batch["latent_eps"].to(mean.dtype)) * vae.config.scaling_factor
    cond = encode_text(text_encoder, batch["input_ids"], text_encoder_2, batch.get("input_ids_2"), batch.get("time_ids"))
    return latents.float(), cond
