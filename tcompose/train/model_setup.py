"""The model of a train-unet run, read and readied: the frozen parts (VAE, text encoders) on the device in the
training precision, and the denoiser as it trains (whole, or LoRA adapters on a frozen, optionally quantized
base; gradient checkpointing, channels-last). :mod:`.loop` calls these between its refusals and its data."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..models.families import Components

#: ``accelerator.mixed_precision`` -> the dtype the frozen parts (and a LoRA run's base) are held in.
TRAINING_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_for_training(cfg, objective, weight_dtype: torch.dtype, device: torch.device, log) -> "Components":
    """The model's parts, with the run's ``objective`` and ``--max-sequence-length``; ``--prediction-type`` set in
    the training scheduler; the VAE and text encoders frozen, in eval mode, on ``device`` in ``weight_dtype``.

    A bf16 LoRA run holds every weight in bf16 (the frozen base, the encoders, the VAE), so it reads them so: the host
    never holds FLUX's 12B transformer and T5 in float32 (67 GB); casting after reading gives the same bits. The
    frozen parts are cast as they move, so a float32 read never lands on the device whole (T5-XXL: 19 GB)."""
    from ..models.families import load_components

    load_dtype = torch.bfloat16 if cfg.lora_rank and weight_dtype == torch.bfloat16 else torch.float32
    comps = load_components(cfg.model, revision=cfg.revision, text_encoder=cfg.text_encoder, vae=cfg.vae,
                            dtype=load_dtype)
    comps.training_objective, comps.max_sequence_length = objective, cfg.max_sequence_length
    scheduler = comps.noise_scheduler
    if cfg.prediction_type:  # diffusers' --prediction_type: the training target follows it (UNetObjective)
        if scheduler.config.prediction_type != cfg.prediction_type:
            log(f"prediction type: {cfg.prediction_type} (the model's scheduler says {scheduler.config.prediction_type})")
        scheduler.register_to_config(prediction_type=cfg.prediction_type)
    # a VAE that asks to be upcast (SDXL's overflows in fp16) stays float32 under fp16; pass an fp16-safe --vae
    upcast = cfg.mixed_precision == "fp16" and comps.vae.config.get("force_upcast", False)
    for frozen, dtype in ((comps.vae, None if upcast else weight_dtype), *((t, weight_dtype) for t in comps.text_encoders)):
        frozen.requires_grad_(False)
        frozen.eval()
        frozen.to(device=device, dtype=dtype)
    return comps


def ready_denoiser(cfg, comps: "Components", weight_dtype: torch.dtype, device: torch.device, log) -> list:
    """The denoiser as it trains, in train mode; returns its trained parameters (all, or the LoRA adapters').

    LoRA: the frozen base in ``weight_dtype``, with ``--quantize-base`` its block linears quantized layer by layer
    onto the device, each as it moves (bitsandbytes quantizes on the move: the device never holds the whole base
    unquantized, FLUX.1's being 23.8 GB in bf16; the rest moves with ``accelerator.prepare``), then the adapters in
    float32. Logs the parameter counts."""
    unet, family = comps.unet, comps.family
    trainable = list(unet.parameters())
    n_all = sum(p.numel() for p in trainable)
    if cfg.lora_rank:
        from ..models.lora import add_lora, cast_base

        cast_base(unet, weight_dtype)
        if cfg.quantize_base:
            from ..models.quantize import quantize_linear_layers

            n_q = quantize_linear_layers(unet, cfg.quantize_base, weight_dtype, device)
            log(f"quantize: {n_q} linear layers of the frozen {family.denoiser_label} in {cfg.quantize_base} (bitsandbytes)")
        add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=cfg.seed)
        trainable = [p for p in unet.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    log(f"model: {family.label}, {n_all:,} denoiser parameters, {n_train:,} trained"
        + (f" (LoRA rank {cfg.lora_rank} on {','.join(cfg.lora_targets)})" if cfg.lora_rank else ""))
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    unet.train()
    return trainable
