"""What a training configuration holds in memory before activations: parameters, gradients, optimizer state.

Counted from the models' configurations on the meta device (no memory, no weights, any machine):

- full finetuning (train-unet's default): the UNet's float32 master weights (mixed precision autocasts the
  compute, the weights stay float32), their float32 gradients, AdamW's two float32 moments: 16 bytes a parameter;
- LoRA (``--lora-rank``): the frozen base in the training precision (2 bytes in bf16 / fp16), no gradients and
  no optimizer state for it; the adapters in float32 with gradients and AdamW: 16 bytes an adapter parameter;
- the frozen parts (VAE, the text encoder(s)) in the training precision (the VAE in float32 where it must be
  upcast: fp16 with a VAE that asks for it).

Activations come on top and depend on the batch, the resolution and gradient checkpointing: ``tcompose bench
--sections train,sdxl`` measures the peak on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

GB = 1e9


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_parameters(family: str) -> dict[str, int]:
    """Parameter counts of the UNet, VAE and text encoder(s) of ``family`` (``sd14`` or ``sdxl``), from configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..testing.tiny_sd import SD_TEXT, SD_VAE, SDXL_SIZES, SDXL_TEXT_2, UNET_SIZES

    vae_cfg = dict(in_channels=3, out_channels=3, latent_channels=4, **SD_VAE)
    with torch.device("meta"):
        counts = {"unet": _count(UNet2DConditionModel(**UNET_SIZES[family])), "vae": _count(AutoencoderKL(**vae_cfg)),
                  "text_encoder": _count(CLIPTextModel(CLIPTextConfig(vocab_size=49408, **SD_TEXT)))}
        if family in SDXL_SIZES:  # SDXL's layout: a second text encoder
            counts["text_encoder_2"] = _count(CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **SDXL_TEXT_2)))
    return counts


def training_memory(family: str, lora_rank: int | None = None, precision: str = "bf16") -> dict[str, Any]:
    """Bytes of weights, gradients and optimizer state of one configuration (see the module docstring)."""
    from ..models.lora import lora_parameter_count
    from ..testing.tiny_sd import UNET_SIZES

    half = {"bf16": 2, "fp16": 2, "fp32": 4}[precision]
    counts = model_parameters(family)
    unet = counts["unet"]
    frozen = sum(v for k, v in counts.items() if k != "unet") * half
    if lora_rank:
        trainable = lora_parameter_count(UNET_SIZES[family], lora_rank)
        weights = unet * half + trainable * 4
    else:
        trainable = unet
        weights = unet * 4
    grads, optimizer = trainable * 4, trainable * 8
    return {
        "family": family, "lora_rank": lora_rank, "precision": precision, "unet_parameters": unet,
        "trainable_parameters": trainable, "weights_gb": weights / GB, "gradients_gb": grads / GB,
        "optimizer_gb": optimizer / GB, "frozen_parts_gb": frozen / GB,
        "total_gb": (weights + grads + optimizer + frozen) / GB,
    }


def memory_table(configs=(("sd14", None), ("sd14", 64), ("sdxl", None), ("sdxl", 64)), precision: str = "bf16") -> list[dict]:
    """:func:`training_memory` of each ``(family, lora_rank)``."""
    return [training_memory(f, r, precision) for f, r in configs]


def markdown(rows: list[dict]) -> str:
    head = ("| configuration | UNet params | trained params | weights | gradients | AdamW state | frozen parts | "
            "total before activations |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        name = f"{'SD1.4' if r['family'] == 'sd14' else 'SDXL'} {'LoRA r' + str(r['lora_rank']) if r['lora_rank'] else 'full'} ({r['precision']})"
        lines.append(f"| {name} | {r['unet_parameters'] / 1e6:,.0f}M | {r['trainable_parameters'] / 1e6:,.1f}M | "
                     f"{r['weights_gb']:.2f} GB | {r['gradients_gb']:.2f} GB | {r['optimizer_gb']:.2f} GB | "
                     f"{r['frozen_parts_gb']:.2f} GB | {r['total_gb']:.2f} GB |")
    return "\n".join(lines)
