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

import functools
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


# ------------------------------------------------------------------------------------- diffusion transformers
#
# SD3.5 / FLUX.1, counted layer by layer on the meta device (FLUX.1-dev's 12B parameters are never materialised):
#
# - the transformer's parameters and floating buffers (SD3.5's positional-embedding table: 226M values) in the
#   training precision for a LoRA run's frozen base (``cast_base``), float32 master weights for full finetuning;
# - ``--quantize-base nf4`` (bitsandbytes ``Params4bit``, blocks of 64, double quantization as its default
#   ``compress_statistics``): per block linear of n weights ``n/2`` packed bytes + ``n/64`` uint8 block scales +
#   a float32 scale per 256 of those + a float32 offset; ``int8`` (``Int8Params``): ``n`` bytes + a float32 scale
#   per output row; their biases and every other parameter in the training precision (shared lookup tables of a
#   few KiB left out);
# - the adapters ``rank x (in + out)`` per targeted linear (the family's ``lora_targets``), float32, with float32
#   gradients; AdamW's two float32 moments (8 bytes a parameter), or bitsandbytes' ``AdamW8bit``: two uint8 moments
#   and a float32 scale per 256 values each, for tensors of at least 4,096 values (smaller ones keep float32 moments);
# - the frozen text encoders and VAE in the training precision (SD3.5: CLIP-L and OpenCLIP bigG with projections
#   and T5-XXL's encoder; FLUX.1: CLIP-L and T5-XXL; both a 16-channel VAE). With ``--cache-text`` (train-unet's
#   default for these families) the encoders are on the device only while they encode the captions, before the
#   transformer is moved there, and are freed before training: the VAE alone stays beside the transformer, and the
#   run's peak before activations is the larger of the two phases. ``--no-cache-text`` keeps them all loaded.

#: The bench's transformers: name -> (family, transformer config).
def dit_sizes() -> dict[str, tuple[str, dict]]:
    from ..testing.tiny_dit import FLUX_DEV, SD35_MEDIUM, TINY_FLUX, TINY_SD35

    return {"sd35-medium": ("sd3", SD35_MEDIUM), "flux-dev": ("flux", FLUX_DEV), "tiny-sd35": ("sd3", TINY_SD35),
            "tiny-flux": ("flux", TINY_FLUX)}


DIT_LABELS = {"sd35-medium": "SD3.5-medium", "flux-dev": "FLUX.1-dev", "tiny-sd35": "tiny SD3.5", "tiny-flux": "tiny FLUX.1"}
#: The memory goals (issue: "FLUX.1-dev LoRA r16 at 1024 px in 24 GB; SD3.5-medium LoRA at 1024 px in 16 GB"),
#: taken as the cards' memory: 24 GiB and 16 GiB.
DIT_GOALS_GIB = {"flux-dev": 24, "sd35-medium": 16}
BASES = ("bf16", "fp16", "fp32", "nf4", "int8")  # the first three: unquantized, in the training precision
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")


def build_transformer(family: str, config: dict):
    """The diffusers transformer class of ``family`` (``sd3`` / ``flux``) built from ``config`` on the current
    device (``with torch.device("meta")``: no memory)."""
    import diffusers

    from ..models.families import family_named

    return getattr(diffusers, family_named(family).denoiser_class_name)(**config)


def nf4_bytes(n: int) -> int:
    """Bytes of ``n`` weights in bitsandbytes NF4 with double quantization (see the section comment)."""
    blocks = -(-n // 64)
    return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4


def adam8bit_bytes(n: int) -> int:
    """Bytes of bitsandbytes ``AdamW8bit``'s state of a tensor of ``n`` values (float32 below 4,096 values)."""
    return 8 * n if n < 4096 else 2 * n + 2 * 4 * -(-n // 256)


def lora_shapes(model, rank: int, targets) -> list[tuple[int, int]]:
    """``(rank, in)`` and ``(out, rank)``: the shapes of the adapters :func:`tcompose.models.lora.add_lora` adds."""
    targets = tuple(targets)
    return [shape for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in targets)
            for shape in ((rank, m.in_features), (m.out_features, rank))]


@functools.lru_cache(maxsize=None)
def dit_frozen_parameters(family: str) -> dict[str, int]:
    """Parameters of the text encoders and the VAE that train-unet keeps loaded beside an SD3.5 / FLUX.1 transformer."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from ..testing.tiny_sd import SD_TEXT, SD_VAE, SDXL_TEXT_2

    with torch.device("meta"):
        counts = {"vae": _count(AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, use_quant_conv=False,
                                              use_post_quant_conv=False, **SD_VAE)),
                  "t5": _count(T5EncoderModel(T5Config(**T5_XXL)))}
        if family == "sd3":
            clip_l = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, projection_dim=768, **SD_TEXT))
            counts["clip_g"] = _count(CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **SDXL_TEXT_2)))
        else:
            clip_l = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **SD_TEXT))
        counts["clip_l"] = _count(clip_l)
    return counts


@functools.lru_cache(maxsize=None)
def _dit_layout(size: str) -> dict[str, Any]:
    """What the byte counts need of a transformer, read once off a meta-device build."""
    from ..models.families import family_named
    from ..models.quantize import BLOCKS

    family, config = dit_sizes()[size]
    with torch.device("meta"):
        model = build_transformer(family, config)
    return {"family": family, "parameters": _count(model),
            "buffers": sum(b.numel() for b in model.buffers() if b.is_floating_point()),
            "tensors": tuple(p.numel() for p in model.parameters()),
            "adapted": tuple(shape for shape in lora_shapes(model, 1, family_named(family).lora_targets)),
            "block_linears": tuple((m.weight.numel(), m.out_features) for name, m in model.named_modules()
                                   if type(m) is torch.nn.Linear and any(b in name for b in BLOCKS))}


def largest_block_linear(size: str) -> int:
    """Weights of the largest linear layer that ``--quantize-base`` quantizes: what the device holds unquantized
    at once while the base is quantized layer by layer."""
    return max(n for n, _ in _dit_layout(size)["block_linears"])


def transformer_memory(size: str, lora_rank: int | None = None, base: str = "bf16", optimizer: str = "adamw",
                       precision: str = "bf16", frozen_parts: bool = True, cache_text: bool = True) -> dict[str, Any]:
    """Bytes of one SD3.5 / FLUX.1 training configuration before activations (see the section comment): ``size``
    a name of :func:`dit_sizes`; ``base`` the frozen base of a LoRA run (``nf4``, ``int8``, else unquantized in
    the training ``precision``);
    ``optimizer`` ``adamw`` or ``adamw8bit``; ``frozen_parts``: count the text encoders and VAE (real sizes);
    ``cache_text``: train-unet's ``--cache-text`` (the encoders freed before training; see the section comment)."""
    if base not in BASES:
        raise ValueError(f"base {base!r}: choose one of {', '.join(BASES)}")
    layout = _dit_layout(size)
    half = {"bf16": 2, "fp16": 2, "fp32": 4}[precision]
    params, buffers = layout["parameters"], layout["buffers"]
    if lora_rank:  # lora_shapes at rank 1: (1, in), (out, 1) per adapted linear
        sizes = [a * b * lora_rank for a, b in layout["adapted"]]
        trainable = sum(sizes)
        base_bytes = (params + buffers) * half
        if base in ("nf4", "int8"):
            base_bytes += sum((nf4_bytes(n) if base == "nf4" else n + 4 * out) - n * half
                              for n, out in layout["block_linears"])
        weights = base_bytes + trainable * 4
    else:
        sizes, trainable, base_bytes = list(layout["tensors"]), params, 0
        weights = (params + buffers) * 4
    state = sum(map(adam8bit_bytes, sizes)) if optimizer == "adamw8bit" else 8 * trainable
    frozen = dit_frozen_parameters(layout["family"]) if frozen_parts else {}
    out = {"size": size, "family": layout["family"], "lora_rank": lora_rank, "base": base if lora_rank else None,
           "optimizer": optimizer, "precision": precision, "transformer_parameters": params,
           "transformer_buffers": buffers, "trainable_parameters": trainable, "base_bytes": base_bytes,
           "weights_bytes": weights, "gradients_bytes": trainable * 4, "optimizer_bytes": state,
           "frozen_parts_parameters": frozen, "cache_text": cache_text}
    vae, text = frozen.get("vae", 0) * half, (sum(frozen.values()) - frozen.get("vae", 0)) * half
    out["vae_bytes"], out["text_encoders_bytes"] = vae, text
    out["frozen_parts_bytes"] = vae + (0 if cache_text else text)  # what stays beside the transformer in training
    out["caching_bytes"] = vae + text if cache_text else 0  # the device while the captions are encoded
    out["transformer_bytes"] = weights + trainable * 4 + state  # what the bench's step holds before activations
    out["training_bytes"] = out["transformer_bytes"] + out["frozen_parts_bytes"]
    out["total_bytes"] = max(out["training_bytes"], out["caching_bytes"])
    goal = DIT_GOALS_GIB.get(size)
    if goal and lora_rank:
        out["goal_gib"] = goal
        # activations come in training only (the caching phase's are a batch of text encoder states)
        out["left_for_activations_gb"] = round((goal * 2**30 - out["training_bytes"]) / GB, 2)
    return out


#: The configurations of the byte-count table (benchmarks/README.md, ``tcompose bench`` sd3 / flux sections).
DIT_CONFIGS = (
    ("sd35-medium", 16, "bf16", "adamw8bit"), ("sd35-medium", 16, "int8", "adamw8bit"),
    ("sd35-medium", 16, "nf4", "adamw8bit"), ("sd35-medium", None, "bf16", "adamw"),
    ("flux-dev", 16, "nf4", "adamw8bit"), ("flux-dev", 16, "nf4", "adamw"), ("flux-dev", 16, "int8", "adamw8bit"),
    ("flux-dev", 16, "bf16", "adamw8bit"), ("flux-dev", None, "bf16", "adamw"),
)


def dit_memory_table(configs=DIT_CONFIGS, precision: str = "bf16") -> list[dict]:
    """:func:`transformer_memory` of each ``(size, lora_rank, base, optimizer)``."""
    return [transformer_memory(s, r, b, o, precision) for s, r, b, o in configs]


def dit_label(row: dict) -> str:
    what = f"LoRA r{row['lora_rank']}, {row['base']} base" if row["lora_rank"] else "full"
    return f"{DIT_LABELS[row['size']]} {what}, {row['optimizer']}"


def dit_markdown(rows: list[dict]) -> str:
    head = ("| configuration | transformer params | trained params | frozen transformer | trained weights + grads + "
            "optimizer | VAE | in training | text encoders + VAE, while caching | peak before activations | "
            "goal: left for activations |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        trained = r["weights_bytes"] - r["base_bytes"] + r["gradients_bytes"] + r["optimizer_bytes"]
        frozen = f"{r['base_bytes'] / GB:.2f} GB" if r["lora_rank"] else "-"
        goal = f"{r['goal_gib']} GiB: {r['left_for_activations_gb']:.1f} GB" if "goal_gib" in r else "-"
        lines.append(f"| {dit_label(r)} | {r['transformer_parameters'] / 1e6:,.0f}M | "
                     f"{r['trainable_parameters'] / 1e6:,.1f}M | {frozen} | {trained / GB:.2f} GB | "
                     f"{r['frozen_parts_bytes'] / GB:.2f} GB | {r['training_bytes'] / GB:.2f} GB | "
                     f"{r['caching_bytes'] / GB:.2f} GB | {r['total_bytes'] / GB:.2f} GB | {goal} |")
    return "\n".join(lines)
