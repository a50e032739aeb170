"""Timing one TokenCompose training step: the batch, the step, and the UNet rows of the bench.

Shared by ``tcompose bench`` (:mod:`tcompose.bench`) and ``benchmarks/train_step.py``::

    mem = PeakMemory(torch.device("cuda"))
    rows = bench_unet("sd14", batch_size=8, dtype="bf16", checkpointing=(False, True), device=..., mem=mem)
    rows[0]["overhead_ratio"], rows[0]["images_per_s"], rows[0]["peak_mem_mb"], rows[0]["flops_per_step_tc"]

One step is what the training loop does per batch: ``tokencompose_losses(..., backward=...)`` (UNet forward,
the denoising loss and, for "tc", the token and pixel losses on the captured cross-attention maps; then
backward), ``optimizer.step()`` (AdamW) and ``optimizer.zero_grad(set_to_none=True)``. "plain" is the same
step with lambda = gamma = 0 (no capture, SDPA everywhere). Both run on the same model, optimizer, batch and
precision; they alternate round by round (the order flips every round), so drift on the machine affects both.

Precision: ``bf16`` / ``fp16`` run the UNet's forward under autocast as accelerate's ``prepare`` wraps it
(fp32 master weights, optimizer and losses in fp32; fp16 with a GradScaler); ``fp32`` is no autocast.

Peak memory, alternating rounds and FLOPs are measured as :mod:`.measure` says; FLOPs over one whole step
(forward + backward), counted once, outside the timed loop, without gradient checkpointing (model FLOPs, not the
recomputation), before any ``torch.compile``.
"""

from __future__ import annotations

import gc
import math
import random
import statistics
from typing import Any

import torch

from ..grounding.losses import pad_words
from ..grounding.objective import tokencompose_losses
from ..models.compile import compile_regions, uncompile_regions
from ..testing.tiny_sd import UNET_SIZES, build_tiny_unet, count_parameters
from .measure import PeakMemory, alternate, count_flops, timed

PLAIN = dict(lambda_token=0.0, gamma_pixel=0.0)
TC = dict(lambda_token=1e-3, gamma_pixel=5e-5)
LAYERS = ("mid", "up")
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_LEN = 77
SEED = 0


# ----------------------------------------------------------------------------------------------------- batch


def make_batch(batch_size: int, latent_size: int, cross_dim: int | None, device: torch.device, seed: int = SEED,
               unet_config=None, family=None, text_len: int = TEXT_LEN, draw_timestep=None) -> tuple:
    """Random latents, the denoiser's conditioning, noise, timesteps, words and rectangle masks at pixel size 8 *
    latent. The conditioning is text embeddings, or with ``unet_config`` the model family's conditioning dict of
    random values (SDXL's has a pooled embedding and time ids too; SD3 / FLUX their pooled projections): of
    ``family`` (default: the family the config is of), ``text_len`` tokens, latents of the family's channels.
    Timesteps: uniform integers in [0, 1000), or ``draw_timestep(generator)`` per example (a flow-matching
    objective's draw from the scheduler's timesteps)."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    b, s = batch_size, latent_size
    r = 8 * s  # masks arrive at pixel resolution; the objective resizes them to each attention map's side
    channels = 4
    if unet_config is not None:
        from ..models.families import family_of

        config = dict(getattr(unet_config, "config", unet_config))
        family = family or family_of(config)
        channels = family.latent_channels(config)
    latents = torch.randn(b, channels, s, s, generator=g)
    if unet_config is None:
        emb = torch.randn(b, text_len, cross_dim, generator=g)
    else:  # the model family's conditioning (SDXL's adds a pooled embedding and time ids)
        emb = family.example_conditioning(config, b, s, text_len, g)
    noise = torch.randn(b, channels, s, s, generator=g)
    timesteps = (torch.randint(0, 1000, (b,), generator=g) if draw_timestep is None
                 else torch.stack([draw_timestep(g) for _ in range(b)]))
    words = []
    for _ in range(b):
        pos, ws = 1, []  # position 0 is <|startoftext|>
        for _ in range(rng.randint(2, 4)):
            pos += rng.randint(0, 1)
            n_tok = rng.choice((1, 1, 2, 3))  # some words span several tokens
            ws.append(list(range(pos, pos + n_tok)))
            pos += n_tok
        words.append(ws)
    index, valid = pad_words(words)
    masks = torch.zeros(b, index.shape[1], r, r)
    for i, ws in enumerate(words):
        for j in range(len(ws)):
            h, w = rng.randint(r // 8, r // 2), rng.randint(r // 8, r // 2)
            y, x = rng.randint(0, r - h), rng.randint(0, r - w)
            masks[i, j, y : y + h, x : x + w] = 1.0
    batch = {"noise": noise, "timesteps": timesteps, "masks": masks, "word_index": index, "word_valid": valid}
    batch = {k: v.to(device) for k, v in batch.items()}
    return latents.to(device), _to(emb, device), batch


def _to(x, device: torch.device):
    """A tensor, or a (nested) dict of them, on ``device``."""
    return {k: _to(v, device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def make_scheduler():
    """DDPM with SD1.4's betas (the training noise schedule)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False)


class Autocast(torch.nn.Module):
    """The UNet's forward under autocast, as accelerate's ``prepare`` wraps it: fp32 master weights, the
    losses outside autocast. ``.module`` is the UNet (what the objective unwraps to capture attention)."""

    def __init__(self, module: torch.nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------- step


class TrainStep:
    """One optimizer step of ``unet`` on a fixed random batch; ``step(weights)`` -> the losses dict.

    ``losses_fn`` is :func:`tcompose.grounding.objective.tokencompose_losses` (or the baseline's slow equivalent, same
    signature). A non-finite total loss raises FloatingPointError. A diffusion transformer (:mod:`.dit`) comes with
    its ``family``, training ``objective`` and ``scheduler`` (flow matching), a text length and its ``optimizer``
    (``adamw`` or bitsandbytes' ``adamw8bit``, as train-unet's ``--optimizer``).
    """

    def __init__(self, unet, batch_size: int, latent_size: int, dtype: str, device: torch.device,
                 losses_fn=tokencompose_losses, layers=LAYERS, seed: int = SEED, family=None, objective=None,
                 scheduler=None, text_len: int = TEXT_LEN, optimizer: str = "adamw"):
        from ..io.trainer import adamw_class

        amp = AMP_DTYPES[dtype]
        self.unet, self.device, self.losses_fn, self.layers = unet, device, losses_fn, tuple(layers)
        self.model = unet if amp is None else Autocast(unet, device.type, amp)
        trainable = [p for p in unet.parameters() if p.requires_grad]  # LoRA: the adapters only
        self.opt = adamw_class(optimizer)(trainable, lr=5e-6, weight_decay=1e-2)  # as train-unet builds it
        self.scaler = torch.amp.GradScaler(device.type) if amp is torch.float16 else None
        self.sched = scheduler or make_scheduler()
        self.extra = {} if objective is None else {"objective": objective}
        draw = None if objective is None else (lambda g: objective.draw_timestep(self.sched, g))
        self.latents, self.emb, self.batch = make_batch(batch_size, latent_size,
                                                        getattr(unet.config, "cross_attention_dim", None), device,
                                                        seed, unet.config, family, text_len, draw)

    def set_channels_last(self, on: bool) -> None:
        """UNet weights, latents and noise in ``torch.channels_last`` (or back to contiguous)."""
        fmt = torch.channels_last if on else torch.contiguous_format
        self.unet.to(memory_format=fmt)
        self.latents = self.latents.contiguous(memory_format=fmt)
        self.batch["noise"] = self.batch["noise"].contiguous(memory_format=fmt)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def __call__(self, weights: dict) -> dict:
        losses = self.losses_fn(self.model, self.latents, self.emb, self.batch, self.sched, self.layers,
                                backward=self.backward, **weights, **self.extra)
        if self.scaler is None:
            self.opt.step()
        else:
            self.scaler.step(self.opt)
            self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        if not math.isfinite(float(losses["total"].detach())):
            raise FloatingPointError(f"non-finite training loss {losses}")
        return losses


def step_flops(step: TrainStep) -> dict[str, int]:
    """``flops_per_step_tc`` / ``_plain``: one whole step of each, counted (run it without checkpointing)."""
    return {f"flops_per_step_{k}": count_flops(lambda w=w: step(w)) for k, w in (("tc", TC), ("plain", PLAIN))}


def plain_vs_tc(step: TrainStep, batch_size: int, warmup: int, steps: int, rounds: int, device: torch.device,
                mem: PeakMemory) -> dict[str, Any]:
    """Time ``step`` with the losses off (PLAIN) and on (TC) in alternating rounds: the medians, their ratio
    (``overhead_ratio``), images/s, peak memory of each, the per-round ratios (the fields of a bench row)."""
    res = alternate({"plain": lambda: step(PLAIN), "tc": lambda: step(TC)}, warmup, steps, rounds, device, mem)
    plain, tc = (statistics.median(res[k]["times"]) for k in ("plain", "tc"))
    ratios = [t / p for t, p in zip(res["tc"]["round_medians"], res["plain"]["round_medians"])]
    row = {
        "step_s_plain": round(plain, 5), "step_s_tc": round(tc, 5), "overhead_ratio": round(tc / plain, 4),
        "images_per_s": round(batch_size / tc, 3), "images_per_s_plain": round(batch_size / plain, 3),
        "peak_mem_mb": round(res["tc"]["peak_mb"], 1), "peak_mem_mb_plain": round(res["plain"]["peak_mb"], 1),
        "timed_steps": len(res["tc"]["times"]),
        "step_s_plain_min": round(min(res["plain"]["times"]), 5),
        "step_s_tc_min": round(min(res["tc"]["times"]), 5),
        "overhead_ratio_min": round(min(res["tc"]["times"]) / min(res["plain"]["times"]), 4),
        "round_ratios": [round(x, 4) for x in ratios],
    }
    if res["tc"]["reserved_mb"] is not None:
        row["peak_reserved_mb"] = round(res["tc"]["reserved_mb"], 1)
    return row


def bench_vae_encode(size: str, batch_size: int, latent_size: int, dtype: str = "fp32", warmup: int = 1,
                     calls: int = 5, device: torch.device | None = None) -> dict:
    """Seconds of the VAE encode that train-unet runs every micro-step unless ``--cache-latents``: SD1.x's VAE
    (``size`` sd14) or the tiny one, cast to the training dtype as train-unet casts the frozen VAE, on
    ``batch_size`` random images that encode to ``latent_size`` latents, sampling ``mean + std * eps``."""
    from ..testing.tiny_sd import SD_VAE, build_tiny_vae

    device = device or torch.device("cpu")
    vae = build_tiny_vae(SEED, **(SD_VAE if size == "sd14" else {})).to(device, AMP_DTYPES[dtype] or torch.float32)
    vae.requires_grad_(False).eval()
    side = latent_size * 2 ** (len(vae.config.block_out_channels) - 1)
    g = torch.Generator().manual_seed(SEED)
    pixels = (torch.rand(batch_size, 3, side, side, generator=g) * 2 - 1).to(device, vae.dtype)
    eps = torch.randn(batch_size, vae.config.latent_channels, latent_size, latent_size, generator=g).to(device, vae.dtype)

    def encode():
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
            return dist.mean + dist.std * eps

    timed(encode, warmup, device)
    times = timed(encode, calls, device)
    return {"vae_encode_s": round(statistics.median(times), 5), "vae_image_side": side}


def bench_unet(size: str, batch_size: int, latent_size: int | None = None, dtype: str = "fp32",
               checkpointing=(False,), warmup: int = 2, steps: int = 3, rounds: int = 8,
               device: torch.device | None = None, mem: PeakMemory | None = None, flops: bool = False,
               compile: bool = False, channels_last=(False,), lora_rank: int | None = None) -> list[dict]:
    """Plain vs tc training steps of a UNet of ``size`` (tcompose.testing.tiny_sd.UNET_SIZES), one result per
    memory format (``channels_last``: UNet weights and latents in ``torch.channels_last``, as train-unet's
    ``--channels-last``) and checkpointing mode. ``flops``: add ``flops_per_step_tc`` / ``_plain`` (see the
    module docstring). ``compile``: :func:`compile_regions`; if compiling fails (no compiler), runs eager and
    says so. ``lora_rank``: train LoRA adapters on the attention projections instead, the base held frozen in
    ``dtype`` (as train-unet --lora-rank does)."""
    device = device or torch.device("cpu")
    mem = mem or PeakMemory(device)
    cfg = UNET_SIZES[size]
    latent = latent_size or cfg["sample_size"]
    unet = build_tiny_unet(SEED, size=size).to(device)
    if lora_rank:
        from ..models.lora import add_lora, cast_base

        cast_base(unet, AMP_DTYPES[dtype] or torch.float32)
        add_lora(unet, lora_rank, seed=SEED)
    unet.train()
    params_m = count_parameters(unet) / 1e6
    trainable_m = sum(p.numel() for p in unet.parameters() if p.requires_grad) / 1e6
    step = TrainStep(unet, batch_size, latent, dtype, device)
    counted = {}
    if flops:
        unet.disable_gradient_checkpointing()
        counted = step_flops(step)
    compiled, compile_note = False, None
    if compile:
        compile_regions(unet)
        try:
            step(TC)
            compiled = True
        except Exception as err:  # no C++ compiler / Triton, or an unsupported op: measure eager instead
            uncompile_regions(unet)
            compile_note = f"torch.compile unavailable, ran eager: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    results = []
    for cl, ckpt in ((cl, ckpt) for cl in channels_last for ckpt in checkpointing):
        step.set_channels_last(cl)
        if ckpt:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        row = {
            "size": size, "params_m": round(params_m, 3), "trainable_params_m": round(trainable_m, 3),
            "lora_rank": lora_rank, "batch_size": batch_size, "latent_size": latent,
            "dtype": dtype, "gradient_checkpointing": ckpt, "compiled": compiled, "channels_last": cl,
            **plain_vs_tc(step, batch_size, warmup, steps, rounds, device, mem), **counted,
        }
        if compile_note:
            row["compile_note"] = compile_note
        results.append(row)
    unet.disable_gradient_checkpointing()
    step.set_channels_last(False)
    del step, unet
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results
