"""The baseline of ``tcompose bench``: a TokenCompose training step as the original implementation ran it.

A measurement baseline, not a product path. The original (mlpc-ucsd/TokenCompose) trained in fp32 at batch 1
with every attention layer of the UNet (self and cross) on diffusers' explicit ``AttnProcessor`` (scores by
``baddbmm``, softmax, ``bmm``) and an attention store that kept every probability map of the step (self and
cross) in lists; the grounding losses then ran per example, per layer group, from the stored cross maps.

:func:`keep_all_attention` reproduces that store; :func:`baseline_losses` is a drop-in for
:func:`tcompose.grounding.objective.tokencompose_losses` (same arguments, same returned dict) that computes the same
quantities the slow way: per example, per group, with the single-example loss functions
:func:`tcompose.grounding.losses.token_loss` / :func:`~tcompose.grounding.losses.pixel_loss`, masks resized per example. On the
same inputs in fp32 both give the same losses and gradients (``tests/bench/test_bench.py`` checks it)::

    with keep_all_attention(unet) as kept:      # kept.maps: list of (block, is_cross, heads, probs [B*heads, HW, K])
        unet(latents, t, encoder_hidden_states=emb)
    losses = baseline_losses(unet, latents, emb, batch, scheduler, ("mid", "up"), 1e-3, 5e-5, backward=...)
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from ..grounding.attention import BLOCKS, parse_layers
from ..grounding.losses import pixel_loss, resize_mask, token_loss


@dataclass
class KeptMaps:
    """Every attention probability map of the UNet's latest forward pass: (block, is_cross, heads, probs)."""

    maps: list[tuple[str, bool, int, torch.Tensor]] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for *_, p in self.maps)


class KeepAllMapsProcessor:
    """diffusers' ``AttnProcessor`` (explicit scores, softmax and ``bmm`` for every layer), keeping the
    probabilities in a list, as the original's attention store did."""

    def __init__(self, kept: KeptMaps, block: str):
        self.kept, self.block = kept, block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        is_cross = encoder_hidden_states is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)

        probs = attn.get_attention_scores(query, key, attention_mask)  # [B * heads, HW, K]
        self.kept.maps.append((self.block, is_cross, attn.heads, probs))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def keep_all_attention(unet) -> Iterator[KeptMaps]:
    """Every attention layer of ``unet`` on :class:`KeepAllMapsProcessor`; the original processors on exit.
    Each UNet forward pass inside the block starts a fresh list."""
    kept = KeptMaps()
    originals = unet.attn_processors
    procs = {name: KeepAllMapsProcessor(kept, BLOCKS.get(name.split(".")[0], "other")) for name in originals}
    unet.set_attn_processor(procs)
    handle = unet.register_forward_pre_hook(lambda *_: kept.maps.clear())
    try:
        yield kept
    finally:
        handle.remove()
        unet.set_attn_processor(originals)


def _words(index: torch.Tensor, valid: torch.Tensor, i: int) -> list[list[int]]:
    """Example ``i``'s words as lists of token positions (padding words dropped)."""
    return [index[i, j][valid[i, j]].tolist() for j in range(index.shape[1]) if bool(valid[i, j].any())]


def cross_groups(kept: KeptMaps, layers) -> dict[str, list[torch.Tensor]]:
    """The selected cross-attention maps by group ``f"{block}_{side}"``: lists of ``[B, heads, HW, T]``."""
    blocks, groups = parse_layers(tuple(layers))
    out: dict[str, list[torch.Tensor]] = {}
    for block, is_cross, heads, probs in kept.maps:
        if not is_cross:
            continue
        name = f"{block}_{math.isqrt(probs.shape[1])}"
        if block in blocks or name in groups:
            out.setdefault(name, []).append(probs.reshape(-1, heads, *probs.shape[1:]))
    return out


def baseline_losses(unet, latents, emb, batch, noise_scheduler, layers, lambda_token, gamma_pixel,
                    backward=None) -> dict:
    """:func:`tcompose.grounding.objective.tokencompose_losses` the original's way (see the module docstring).

    Always keeps every map, whatever the weights (the original's store ran on every step). Square latents only.
    """
    noise, timesteps = batch["noise"], batch["timesteps"]
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    with keep_all_attention(getattr(unet, "module", unet)) as kept:
        cond = emb if isinstance(emb, dict) else {"encoder_hidden_states": emb}
        pred = unet(noisy, timesteps, **cond).sample
        ldm = F.mse_loss(pred.float(), target.float())
        groups = cross_groups(kept, layers)
        index, valid = batch["word_index"], batch["word_valid"]
        n = latents.shape[0]
        token = pixel = latents.new_zeros((), dtype=torch.float32)
        for i in range(n):
            words = _words(index, valid, i)
            for maps in groups.values():
                attn = torch.stack([m[i] for m in maps]).float()  # [n_maps, heads, HW, T]
                masks = resize_mask(batch["masks"][i, : len(words)], math.isqrt(attn.shape[2])).flatten(-2)
                token = token + token_loss(attn, masks, words) / n
                pixel = pixel + pixel_loss(attn, masks, words) / n
        total = ldm + lambda_token * token + gamma_pixel * pixel
        if backward is not None:
            backward(total)
        return {"ldm": ldm, "token": token, "pixel": pixel, "total": total, "kept_maps": len(kept.maps),
                "kept_mb": kept.nbytes() / 2**20}


def bench_baseline(size: str, latent_size: int | None = None, warmup: int = 2, steps: int = 3, rounds: int = 3,
                   device: torch.device | None = None, mem=None, flops: bool = False) -> dict:
    """Seconds per step, images/s and peak memory of the original's step (fp32, batch 1, grounding losses on)
    on a UNet of ``size`` (tcompose.testing.tiny_sd.UNET_SIZES); ``flops``: add ``flops_per_step``. On CUDA it runs with
    torch's default precision settings, as the original did, whatever ``--tf32/--no-tf32`` sets for the rest of
    the bench: TF32 matmuls off (``torch.backends.cuda.matmul.allow_tf32 = False``), cuDNN convolutions allowed
    TF32 (``torch.backends.cudnn.allow_tf32 = True``); the settings before are restored after. The row records
    them under ``tf32`` (None on CPU, where TF32 does not apply)."""
    import gc
    import statistics

    from ..testing.tiny_sd import UNET_SIZES, build_tiny_unet
    from .measure import PeakMemory, alternate, count_flops
    from .train import SEED, TC, TrainStep

    device = device or torch.device("cpu")
    mem = mem or PeakMemory(device)
    latent = latent_size or UNET_SIZES[size]["sample_size"]
    unet = build_tiny_unet(SEED, size=size).to(device)
    unet.train()
    step = TrainStep(unet, 1, latent, "fp32", device, losses_fn=baseline_losses)
    last: dict = {}
    row: dict = {"size": size, "batch_size": 1, "latent_size": latent, "dtype": "fp32",
                 "attention": "explicit (AttnProcessor) in every layer, every map kept",
                 "tf32": {"matmul": False, "cudnn": True} if device.type == "cuda" else None}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # torch's defaults
    try:
        if flops:
            row["flops_per_step"] = count_flops(lambda: step(TC))
        res = alternate({"baseline": lambda: last.update(step(TC))}, warmup, steps, rounds, device, mem)["baseline"]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    med = statistics.median(res["times"])
    row.update({
        "step_s": round(med, 5), "step_s_min": round(min(res["times"]), 5), "images_per_s": round(1 / med, 4),
        "peak_mem_mb": round(res["peak_mb"], 1), "timed_steps": len(res["times"]),
        "kept_maps": last.get("kept_maps"), "kept_maps_mb": round(last.get("kept_mb", 0.0), 1),
    })
    if res["reserved_mb"] is not None:
        row["peak_reserved_mb"] = round(res["reserved_mb"], 1)
    del step, unet
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row
