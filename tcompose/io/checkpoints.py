"""Training checkpoints as safetensors + JSON (no pickle): model, optimizer, lr scheduler, EMA, scaler, step.

Layout of ``OUT/checkpoints/step-000300/``:

    model.safetensors       the model's weights (only its trainable ones for LoRA: the adapters)
    optimizer.safetensors   optimizer tensors (Adam moments, step counts), keyed state.<param>.<name>
    ema.safetensors         EMA shadow weights (with --use-ema)
    state.json              step, optimizer param groups, lr scheduler, EMA and grad scaler scalars

A checkpoint is written to a temporary folder and renamed, so a kill leaves either the whole checkpoint or
none; ``--resume latest`` picks the highest complete step.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import MissingPathError, UserError
from .files import match_umask

PREFIX = "step-"


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if _is_plain(v)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item()
    return obj


def _is_plain(v) -> bool:
    if isinstance(v, (dict, list, tuple)):
        return True
    if isinstance(v, torch.Tensor):
        return v.numel() == 1
    return v is None or isinstance(v, (int, float, str, bool))


def _trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _flatten_optimizer_state(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict[str, int | float]]:
    """An optimizer's per-parameter state as (tensors for safetensors, Python scalars for state.json), keyed
    ``state.{param}.{name}``; a nested dict (bitsandbytes' 8-bit state under ``__bnb_optimizer_quant_state__``)
    adds ``/{key}`` per level. Scalars keep their type (bitsandbytes counts ``step`` as a Python int)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, int | float] = {}
    seen: set[int] = set()

    def put(key: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                put(f"{key}/{k}", v)
        elif isinstance(value, torch.Tensor):  # safetensors refuses shared storage (bitsandbytes shares qmaps)
            tensors[key] = value.clone() if value.untyped_storage().data_ptr() in seen else value
            seen.add(value.untyped_storage().data_ptr())
        elif isinstance(value, (bool, int, float)):
            scalars[key] = value
        else:
            raise TypeError(f"optimizer state {key}: cannot checkpoint a {type(value).__name__}")

    for pid, st in opt_state.items():
        for name, value in st.items():
            put(f"state.{pid}.{name}", value)
    return tensors, scalars


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], scalars: dict[str, int | float]) -> dict:
    """The inverse of :func:`_flatten_optimizer_state`."""
    opt_state: dict = {}
    for key, value in [*tensors.items(), *scalars.items()]:
        _, pid, name = key.split(".", 2)
        *parents, leaf = name.split("/")
        node = opt_state.setdefault(int(pid), {})
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return opt_state


def save_checkpoint(root: Path, step: int, model, optimizer, lr_scheduler, ema=None, scaler=None, limit: int | None = None,
                    extra: dict | None = None, only_trainable: bool = False) -> Path:
    """Save everything needed to continue training exactly; keep at most ``limit`` checkpoints.
    ``only_trainable``: the model's trainable parameters only (LoRA adapters: the frozen base is not copied)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    weights = model.state_dict()
    if only_trainable:
        keep = _trainable_names(model)
        weights = {k: v for k, v in weights.items() if k in keep}
    save_file(_contiguous(weights), tmp / "model.safetensors")
    opt = optimizer.state_dict()
    tensors, scalars = _flatten_optimizer_state(opt["state"])
    save_file(_contiguous(tensors), tmp / "optimizer.safetensors")
    state = {"step": step, "param_groups": _jsonable(opt["param_groups"]), "lr_scheduler": _jsonable(lr_scheduler.state_dict()),
             "only_trainable": only_trainable, "extra": extra or {}}
    if scalars:
        state["optimizer_scalars"] = scalars
    if ema is not None:
        ema_state = ema.state_dict()
        save_file(_contiguous({str(i): p for i, p in enumerate(ema_state.pop("shadow_params"))}), tmp / "ema.safetensors")
        state["ema"] = _jsonable(ema_state)
    if scaler is not None:
        state["scaler"] = _jsonable(scaler.state_dict())
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    match_umask(tmp)  # safetensors writes its files 0600
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)

    if limit is not None and limit > 0:
        for old in list_checkpoints(root)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    """``latest`` -> the newest checkpoint under ``root`` (None if there is none); a path -> that checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").exists():
        raise MissingPathError(f"--resume {resume}: not a checkpoint folder (no state.json); use 'latest' or a {root}/{PREFIX}NNNNNN folder")
    return path


def load_checkpoint(path: Path, model, optimizer, lr_scheduler, ema=None, scaler=None) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns the state (with ``step``)."""
    state = json.loads((path / "state.json").read_text())
    missing, unexpected = model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    if state.get("only_trainable"):  # the frozen weights are the base model's own
        missing = [k for k in missing if k in _trainable_names(model)]
    if missing or unexpected:
        raise UserError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    opt_state = _unflatten_optimizer_state(load_file(path / "optimizer.safetensors"), state.get("optimizer_scalars", {}))
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if ema is not None:
        if "ema" not in state:
            raise UserError(f"{path} has no EMA weights: resume without --use-ema, or start a new run")
        shadow = load_file(path / "ema.safetensors")
        ema.load_state_dict({**state["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return state
