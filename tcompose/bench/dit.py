"""The TokenCompose training step of a diffusion transformer (SD3.5, FLUX.1): ``tcompose bench --sections sd3,flux``.

    rows = bench_dit("flux-dev", latent_size=128, text_len=512, dtype="bf16", checkpointing=(False, True),
                     lora_rank=16, base="nf4", optimizer="adamw8bit", device=..., mem=mem)

The same measurement as the UNets' (:mod:`.train`: the step ``tokencompose_losses(..., objective=...)`` + the
optimizer, "plain" with lambda = gamma = 0 against "tc" in alternating rounds, peak memory, FLOPs), on a random
transformer of the real shape (:data:`tcompose.testing.tiny_dit.SD35_MEDIUM`, ``FLUX_DEV``) or a tiny one
(``--quick``), with the family's flow-matching objective (FLUX: packed latents and the embedded guidance 3.5),
its default supervised blocks (SD3.5-medium joint 5,7,8,9,10; FLUX.1 double 11,12,14,17,18) and random
conditioning of the real text length (SD3: 77 CLIP + 256 T5 tokens; FLUX: 512 T5 tokens).

Precision as train-unet: LoRA keeps the frozen base in the training precision (built in it directly, so the 12B
FLUX base never exists in float32), or quantized by bitsandbytes (``base="nf4"`` / ``"int8"``), the adapters in
float32; full finetuning keeps float32 master weights, the forward under autocast. Before anything is built, the
row's bytes before activations (:func:`tcompose.bench.memory.transformer_memory`, the transformer alone: the
bench feeds random embeddings, not the text encoders) are compared with the device's free memory; a row that
cannot fit is returned as ``{"skipped": reason}`` instead (FLUX.1-dev full finetuning needs 190 GB).
"""

from __future__ import annotations

import gc
from pathlib import Path
import torch

from .memory import DIT_LABELS, GB, build_transformer, dit_sizes, largest_block_linear, transformer_memory
from ..models.quantize import KINDS as QUANTIZED
from .measure import PeakMemory
from .train import AMP_DTYPES, SEED, TC, TrainStep, plain_vs_tc, step_flops


def free_bytes(device: torch.device) -> int:
    """Memory a new model may take: CUDA's free memory, or the machine's MemAvailable on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62  # unknown: try


def build_dit(size: str, device: torch.device, weight_dtype: torch.dtype, seed: int = SEED):
    """A random transformer of ``size`` (:func:`tcompose.bench.memory.dit_sizes`), built on ``device`` directly in
    ``weight_dtype`` (global RNG and default dtype left as they were)."""
    family, config = dit_sizes()[size]
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(weight_dtype)
        try:
            return build_transformer(family, config)
        finally:
            torch.set_default_dtype(default)


def bench_dit(size: str, latent_size: int, text_len: int, dtype: str = "fp32", checkpointing=(False,),
              warmup: int = 2, steps: int = 3, rounds: int = 8, device: torch.device | None = None,
              mem: PeakMemory | None = None, flops: bool = False, lora_rank: int | None = None, base: str = "bf16",
              optimizer: str = "adamw", batch_size: int = 1) -> list[dict]:
    """Plain vs tc steps of a transformer of ``size``, one row per checkpointing mode (fields as
    :func:`tcompose.bench.train.bench_unet`'s, plus ``family``, ``base``, ``optimizer``, ``text_len``, ``layers``,
    ``token_loss`` / ``pixel_loss`` of the first tc step and ``bytes_before_activations``); or one
    ``{"skipped": ...}`` row when the device has too little free memory by byte count."""
    from ..models.families import family_named
    from ..models.lora import add_lora

    device = device or torch.device("cpu")
    mem = mem or PeakMemory(device)
    family_name, config = dit_sizes()[size]
    family = family_named(family_name)
    amp = AMP_DTYPES[dtype]
    precision = "fp32" if amp is None else dtype
    row = {"size": size, "family": family_name, "lora_rank": lora_rank, "base": base if lora_rank else None,
           "optimizer": optimizer, "batch_size": batch_size, "latent_size": latent_size, "text_len": text_len,
           "dtype": dtype, "compiled": False}
    counts = transformer_memory(size, lora_rank, base, optimizer, precision, frozen_parts=False)
    quantized = bool(lora_rank) and base in QUANTIZED
    half = 4 if precision == "fp32" else 2
    # a quantized base is built on the host in the training precision and quantized layer by layer onto the device
    # (as train-unet does): the device holds the quantized base and one layer unquantized at most
    need = counts["transformer_bytes"] + (largest_block_linear(size) * half if quantized else 0)
    if lora_rank and not quantized:
        row["base"] = precision  # unquantized: the training precision (fp32 in a CPU run)
    row["bytes_before_activations"] = counts["transformer_bytes"]
    what = f"LoRA r{lora_rank} ({row['base']} base)" if lora_rank else "full finetuning"
    host = counts["transformer_parameters"] * half if quantized and device.type != "cpu" else 0
    for where, bytes_needed, label in ((device, need, "before activations"), (torch.device("cpu"), host, "on the host")):
        free = free_bytes(where)
        if bytes_needed > free:
            return [{**row, "skipped": f"{DIT_LABELS[size]} {what} needs {bytes_needed / GB:.1f} GB {label} "
                                       f"(by byte count); {where.type} has {free / GB:.1f} GB free"}]
    weight_dtype = (amp or torch.float32) if lora_rank else torch.float32  # full: float32 master weights
    model = build_dit(size, torch.device("cpu") if quantized else device, weight_dtype)
    if lora_rank:
        if quantized:
            from ..models.quantize import quantize_linear_layers

            quantize_linear_layers(model, base, weight_dtype, device)
            model.to(device)  # what stays unquantized (embeddings, norms, the input / output layers)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()  # nothing of the unquantized base stays reserved for the timed steps
        add_lora(model, lora_rank, targets=family.lora_targets, seed=SEED)
    model.train()
    objective = family.configure_objective(dict(config), {})
    layers = objective.default_layers(dict(config))
    groups = objective.resolve_layers(layers, family.attention_groups(dict(config), (latent_size, latent_size)))
    step = TrainStep(model, batch_size, latent_size, dtype, device, layers=tuple(groups), family=family,
                     objective=objective, scheduler=flow_scheduler(family_name), text_len=text_len,
                     optimizer=optimizer)
    row.update(params_m=round(counts["transformer_parameters"] / 1e6, 3),  # a 4-bit weight's numel is packed
               trainable_params_m=round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 3),
               layers=list(groups))
    model.disable_gradient_checkpointing()
    first = step(TC)  # the grounding losses reach the captured maps
    row.update(token_loss=round(float(first["token"].detach()), 6), pixel_loss=round(float(first["pixel"].detach()), 6))
    counted = step_flops(step) if flops else {}
    rows = []
    for ckpt in checkpointing:
        if ckpt:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
        rows.append({**row, "gradient_checkpointing": ckpt,
                     **plain_vs_tc(step, batch_size, warmup, steps, rounds, device, mem), **counted})
    del step, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def flow_scheduler(family: str):
    """The training scheduler of the family's models (``scheduler/scheduler_config.json``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..testing.tiny_dit import FLUX_SCHEDULER, SD3_SCHEDULER

    return FlowMatchEulerDiscreteScheduler(**(SD3_SCHEDULER if family == "sd3" else FLUX_SCHEDULER))


#: The rows of each section: (LoRA rank or None for full finetuning, base, optimizer), as docs/training.md's
#: recipes run them (LoRA with 8-bit AdamW; FLUX.1-dev on a 4-bit base for 24 GB, and on a bf16 one).
SECTION_ROWS = {"sd3": (("lora", "bf16", "adamw8bit"), (None, "bf16", "adamw")),
                "flux": (("lora", "nf4", "adamw8bit"), ("lora", "bf16", "adamw8bit"), (None, "bf16", "adamw"))}


def section_rows(section: str, settings: dict, dtype: str, checkpointing, device: torch.device, mem: PeakMemory,
                 run_row) -> list[dict]:
    """Every row of ``section`` (``sd3`` / ``flux``) at the mode's ``settings`` (:data:`tcompose.bench.run.FULL` /
    ``QUICK``); ``run_row(name, fn)`` runs one (the bench's error capture) and returns its rows or ``{"error"}``."""
    size, rank = settings[section], settings["dit_lora_rank"]
    latent, text_len = settings["dit_resolution"] // 8, settings[f"{section}_text_len"]
    rows: list[dict] = []
    for lora, base, optimizer in SECTION_ROWS[section]:
        r = rank if lora else None
        name = f"{section}_" + (f"lora{r}_{base}" if r else "full")
        got = run_row(name, lambda r=r, base=base, optimizer=optimizer: bench_dit(
            size, latent, text_len, dtype, checkpointing, settings["warmup"], settings["steps"], settings["rounds"],
            device, mem, flops=True, lora_rank=r, base=base, optimizer=optimizer))
        rows += got if isinstance(got, list) else [{"size": size, "lora_rank": r, "base": base if r else None, **got}]
    return rows


def describe(section: str, settings: dict, dtype: str, checkpointing: str) -> str:
    """The progress line of a section."""
    size = settings[section]
    return (f"{section}: {DIT_LABELS[size]} transformer, batch 1, {settings['dit_resolution']} px, "
            f"{settings[section + '_text_len']} text tokens, {dtype}, checkpointing {checkpointing}; LoRA rank "
            f"{settings['dit_lora_rank']} and full finetuning")


__all__ = ["SECTION_ROWS", "bench_dit", "build_dit", "describe", "flow_scheduler", "free_bytes", "section_rows"]

