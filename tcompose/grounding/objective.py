"""The TokenCompose objective for one batch: L_LDM + lambda * L_token + gamma * L_pixel.

Pure of I/O and of the training loop, so the loop, the benchmarks and the tests run the same code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import capture_cross_attention
from .losses import grounding_losses, reduce_over_words, resize_mask


def tokencompose_losses(unet, latents, emb, batch, noise_scheduler, layers, lambda_token, gamma_pixel, backward=None) -> dict:
    """One forward pass: the denoising loss and, when their weights are non-zero, the grounding losses.

    ``latents`` are clean VAE latents; ``batch`` holds ``noise``, ``timesteps``, ``masks [B, W, R, R]``,
    ``word_index`` and ``word_valid`` (see :mod:`tcompose.train.examples`). Token and pixel losses are
    summed over the supervised layer groups and averaged over examples, like the denoising loss.
    ``backward(total)`` is called inside the capture (needed under gradient checkpointing).
    """
    noise, timesteps = batch["noise"], batch["timesteps"]
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    grounded = lambda_token > 0 or gamma_pixel > 0
    zero = latents.new_zeros((), dtype=torch.float32)
    if not grounded:
        pred = unet(noisy, timesteps, encoder_hidden_states=emb).sample
        ldm = F.mse_loss(pred.float(), target.float())
        out = {"ldm": ldm, "token": zero, "pixel": zero, "total": ldm}
        if backward is not None:
            backward(ldm)
        return out

    with capture_cross_attention(_unwrap(unet), layers) as store:
        pred = unet(noisy, timesteps, encoder_hidden_states=emb).sample
        ldm = F.mse_loss(pred.float(), target.float())
        token, pixel = zero, zero
        index, valid = batch["word_index"], batch["word_valid"]
        resized: dict[int, torch.Tensor] = {}
        for maps in store.maps.values():
            side = math.isqrt(maps[0].shape[2])
            if side not in resized:
                resized[side] = resize_mask(batch["masks"], side).flatten(-2)
            tok, pix = grounding_losses(maps, resized[side], index, valid)
            token = token + reduce_over_words(tok, valid)
            pixel = pixel + reduce_over_words(pix, valid)
        total = ldm + lambda_token * token + gamma_pixel * pixel
        if backward is not None:
            backward(total)
    return {"ldm": ldm, "token": token, "pixel": pixel, "total": total}


def _unwrap(model):
    return getattr(model, "module", model)


def encode_batch(vae, text_encoder, batch, weight_dtype):
    """Frozen parts, no gradients: latents ``mean + std * eps`` (eps from the batch) and text embeddings.

    The VAE's ``mean`` and ``std`` come from ``batch["latent_moments"]`` ``[B, 2, C, h, w]`` when the batch
    carries them (``--cache-latents``, :mod:`tcompose.train.latent_cache`), else from encoding ``pixel_values``.
    """
    with torch.no_grad():
        if "latent_moments" in batch:
            mean, std = batch["latent_moments"].unbind(1)
        else:
            dist = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist
            mean, std = dist.mean, dist.std
        latents = (mean + std * batch["latent_eps"].to(mean.dtype)) * vae.config.scaling_factor
        emb = text_encoder(batch["input_ids"])[0]
    return latents.float(), emb
