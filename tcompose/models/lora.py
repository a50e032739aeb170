"""LoRA adapters on a diffusers UNet (peft), in diffusers' LoRA format: train-unet --lora-rank, and loading for
generation (``--model NAME=BASE,lora=DIR[,lora_scale=S]``).

    names = add_lora(unet, rank=64, alpha=64, targets=DEFAULT_TARGETS)      # base frozen, adapters float32
    save_lora(out, unet, {"base_model": "stabilityai/stable-diffusion-xl-base-1.0", "rank": 64, ...}, pipeline_class)
    pipe.load_lora_weights(out)                                              # diffusers loads it as any LoRA

The adapters wrap the UNet's attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` by default,
self- and cross-attention alike) with ``W x + (alpha / r) B A x``; ``A`` starts Gaussian and ``B`` at zero, so
training starts from the base model exactly (peft's ``init_lora_weights="gaussian"``, as diffusers'
train_text_to_image_lora.py). The grounding losses need nothing else: the captured cross-attention
probabilities are computed through the adapted ``to_q`` / ``to_k``, so their gradients reach the adapters.

OUT holds ``pytorch_lora_weights.safetensors`` (diffusers' format) and ``tcompose_lora.json`` (the base model,
its revision and VAE, rank, alpha, targets), so ``--model OUT`` alone is enough to generate with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from ..io.errors import MissingPathError, UserError

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
WEIGHTS = "pytorch_lora_weights.safetensors"
META = "tcompose_lora.json"
ADAPTER = "tcompose"


def add_lora(unet, rank: int, alpha: float | None = None, targets: Iterable[str] = DEFAULT_TARGETS,
             seed: int = 0) -> list[str]:
    """Freeze ``unet`` and add LoRA adapters of ``rank`` (scale ``alpha / rank``; alpha defaults to the rank) to
    the ``targets`` modules; the adapters are float32 and the only trainable parameters. Returns their names.
    ``seed`` fixes the Gaussian initialisation (the global RNG is left as it was)."""
    from peft import LoraConfig

    targets = tuple(targets)
    if rank < 1:
        raise UserError(f"--lora-rank must be >= 1, got {rank}")
    modules = [n for n, _ in unet.named_modules()]
    missing = [t for t in targets if not any(n.endswith("." + t) for n in modules)]
    if missing or not targets:
        raise UserError(f"--lora-targets {','.join(missing or targets)}: no such module in this denoiser (a UNet's "
                         f"attention projections are {', '.join(DEFAULT_TARGETS)}; a transformer's also add_q_proj, "
                         "add_k_proj, add_v_proj, to_add_out)")
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                        target_modules=list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=ADAPTER)
    trainable = []
    for name, p in unet.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            trainable.append(name)
    return trainable


def cast_base(unet, dtype: torch.dtype) -> None:
    """Cast the UNet's weights in place to ``dtype`` (the frozen base of a LoRA run, held in the training
    precision), before the adapters are added in float32 (diffusers' ``.to(dtype)`` warns about exactly this)."""
    for t in (*unet.parameters(), *unet.buffers()):
        if t.is_floating_point():
            t.data = t.data.to(dtype)


def lora_parameter_count(unet_config, rank: int, targets: Iterable[str] = DEFAULT_TARGETS) -> int:
    """Adapter parameters that :func:`add_lora` adds: ``rank x (in + out)`` for every targeted linear layer,
    counted on a meta-device copy of the UNet built from ``unet_config`` (no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    config = getattr(unet_config, "config", unet_config)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    targets = tuple(targets)
    return sum(rank * (m.in_features + m.out_features) for n, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in targets))


def lora_state_dict(unet, denoiser: str = "unet") -> dict[str, torch.Tensor]:
    """The adapters in diffusers' LoRA key format (what ``save_lora_weights`` writes and ``load_lora_weights``
    reads): a UNet's converted to diffusers' names, as diffusers' UNet trainers save them; a transformer's in peft's
    names, as its SD3 / FLUX trainers save them."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    if denoiser == "unet":
        state = convert_state_dict_to_diffusers(state)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_lora(out: str | os.PathLike, unet, meta: dict[str, Any], pipeline) -> Path:
    """Write ``OUT/pytorch_lora_weights.safetensors`` (diffusers' format, through ``pipeline``: the model family's
    pipeline class, whose ``save_lora_weights`` names its denoiser ``unet`` or ``transformer``) and
    ``OUT/tcompose_lora.json``."""
    import inspect

    from ..io.files import match_umask

    takes = inspect.signature(pipeline.save_lora_weights).parameters
    denoiser = "unet" if "unet_lora_layers" in takes else "transformer"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # the adapter's config (its alpha above all) goes into the file's metadata, as diffusers' trainers write it:
    # without it, load_lora_weights would take alpha = rank
    config = unet.peft_config[ADAPTER].to_dict()
    pipeline.save_lora_weights(out, safe_serialization=True, **{f"{denoiser}_lora_layers": lora_state_dict(unet, denoiser),
                                                                f"{denoiser}_lora_adapter_metadata": config})
    (out / META).write_text(json.dumps({**meta, "format": "diffusers", "weights": WEIGHTS}, indent=2) + "\n")
    match_umask(out / WEIGHTS)
    return out / WEIGHTS


def read_lora_meta(folder: str | os.PathLike) -> dict | None:
    """What :func:`save_lora` recorded beside the adapters (base model, rank, ...), or None for another folder."""
    path = Path(folder).expanduser() / META
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def apply_lora(pipe, folder: str | os.PathLike, scale: float = 1.0) -> None:
    """Load the adapters of ``folder`` into ``pipe``'s UNet and merge them at ``scale`` (plain weights after). A
    run trained with ``--prediction-type`` recorded it beside the adapters: the pipeline's scheduler takes it."""
    folder = Path(folder).expanduser()
    if not (folder / WEIGHTS).is_file():
        raise MissingPathError(f"lora={folder}: no {WEIGHTS} there; pass the --output of a train-unet --lora-rank run "
                                "(or any folder holding diffusers LoRA weights under that name)")
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder": there are none, by design
    try:
        from .families import family_of_pipeline

        pipe.load_lora_weights(str(folder), weight_name=WEIGHTS, adapter_name=ADAPTER)
        pipe.fuse_lora(components=[family_of_pipeline(pipe).denoiser_subfolder], lora_scale=scale,
                       adapter_names=[ADAPTER])
        pipe.unload_lora_weights()
    finally:
        diffusers_logging.set_verbosity(level)
    prediction_type = (read_lora_meta(folder) or {}).get("prediction_type")
    if prediction_type:
        pipe.scheduler.register_to_config(prediction_type=prediction_type)


def check_lora(model: str | os.PathLike, lora: str | os.PathLike, revision: str | None = None,
               text_encoder: str | None = None) -> str | None:
    """Before anything loads: refuse adapters that record another model family than ``model``'s, and return the
    text encoder to generate with (``text_encoder`` as given, else the one the LoRA run trained with, recorded
    beside its adapters; refused when that one is no longer there)."""
    meta = read_lora_meta(lora)
    if meta is None:
        return text_encoder
    recorded = meta.get("family")
    if recorded:
        from .families import family_named, family_of_model

        theirs, base = family_named(str(recorded)), family_of_model(model, revision)
        if theirs is not base:
            raise UserError(f"LoRA {lora} (--lora, or lora= in --model): {theirs.label} adapters (trained on "
                            f"{meta.get('base_model')}), but {model} is {base.label}; pass a base model of the "
                            f"family the adapters were trained on, or adapters trained on {model}")
    trained = meta.get("text_encoder")
    if text_encoder is not None or not trained:
        return text_encoder
    trained = str(trained)
    if Path(trained).is_absolute() and not Path(trained).exists():
        raise UserError(f"LoRA {lora}: these adapters were trained with --text-encoder {trained} (recorded in "
                        f"{META}), which is not there any more; pass that text encoder with --text-encoder PATH "
                        "(text_encoder=PATH in --model)")
    return trained


def resolve_lora_model(model: str | os.PathLike, lora: str | os.PathLike | None = None,
                       revision: str | None = None) -> tuple[str, str | None, str | None, str | None]:
    """``(base model, lora folder, revision, vae)`` to load: a LoRA run's OUT given as the model stands for its
    recorded base model with its adapters (and the VAE it trained with); anything else is returned as given."""
    if lora is None:
        meta = read_lora_meta(model)
        if meta is not None and not (Path(model).expanduser() / "model_index.json").is_file():
            return str(meta["base_model"]), str(model), meta.get("revision") or revision, meta.get("vae")
    return str(model), (str(lora) if lora is not None else None), revision, None
