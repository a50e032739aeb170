"""``--model NAME=ID_OR_PATH[,unet=PATH][,text_encoder=PATH][,lora=DIR][,lora_scale=S][,revision=REV]``, parsed.

    parse_model_spec("TokenCompose=runs/tc")                       # name TokenCompose, model runs/tc
    parse_model_spec("SD=CompVis/stable-diffusion-v1-4")
    parse_model_spec("mine=CompVis/stable-diffusion-v1-4,unet=runs/tc/unet,text_encoder=runs/clip")
    parse_model_spec("xl=stabilityai/stable-diffusion-xl-base-1.0,lora=runs/tc-xl-lora,lora_scale=0.8")
    parse_model_spec("CompVis/stable-diffusion-v1-4")              # name: the last path part

The name labels the model in tables and figures: letters, digits and ``_ . + -``. The text before the
first ``=`` is the name only when it is such a word; otherwise (no ``=``, or a path with ``=`` in it) the
whole head is the model and the name is its last path part. Options after the first ``,`` are ``key=value``
with keys ``unet``, ``text_encoder`` (or ``text-encoder``), ``lora`` (the --output of a train-unet
--lora-rank run, merged into the model's UNet), ``lora_scale`` (default 1) and ``revision``. Paths containing ``,`` cannot
be given this way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Iterable

from ..io.errors import UserError

__all__ = ["ModelSpec", "parse_model_spec", "parse_model_specs"]

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_KEYS = {"unet": "unet", "text_encoder": "text_encoder", "text-encoder": "text_encoder", "revision": "revision",
         "lora": "lora", "lora_scale": "lora_scale", "lora-scale": "lora_scale"}


@dataclass(frozen=True)
class ModelSpec:
    """A model to generate with: label, base model (hub id or folder), optional UNet / text encoder swaps."""

    name: str
    model: str
    unet: str | None = None
    text_encoder: str | None = None
    revision: str | None = None
    lora: str | None = None
    lora_scale: float = 1.0


def _default_name(model: str) -> str:
    name = PurePath(model.rstrip("/\\")).name or model
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def parse_model_spec(spec: str) -> ModelSpec:
    """``NAME=ID_OR_PATH[,key=value...]`` -> ModelSpec; ValueError naming the problem otherwise."""
    text = spec.strip()
    head, *options = text.split(",")
    head = head.strip()
    name = None
    if "=" in head:
        left, right = head.split("=", 1)
        if _NAME.match(left.strip()):
            name, head = left.strip(), right.strip()
    if not head:
        raise UserError(f"--model {spec!r}: no model after the name; write NAME=ID_OR_PATH, e.g. "
                        "SD=CompVis/stable-diffusion-v1-4")
    extra: dict[str, str] = {}
    for option in options:
        option = option.strip()
        if not option:
            continue
        key, sep, value = option.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in _KEYS:
            raise UserError(f"--model {spec!r}: unknown option {option!r}; options are unet=PATH, "
                            "text_encoder=PATH, lora=DIR, lora_scale=S, revision=REV")
        field = _KEYS[key]
        if not value:
            raise UserError(f"--model {spec!r}: option {key} has no value")
        if field in extra:
            raise UserError(f"--model {spec!r}: option {key} given twice")
        extra[field] = value
    if "lora_scale" in extra:
        try:
            scale = float(extra["lora_scale"])
        except ValueError:
            raise UserError(f"--model {spec!r}: lora_scale={extra['lora_scale']!r} is not a number") from None
        if not math.isfinite(scale):
            raise UserError(f"--model {spec!r}: lora_scale must be a finite number")
        if "lora" not in extra:
            raise UserError(f"--model {spec!r}: lora_scale goes with lora=DIR")
        extra["lora_scale"] = scale
    return ModelSpec(name=name or _default_name(head), model=head, **extra)


def parse_model_specs(specs: Iterable[str]) -> list[ModelSpec]:
    """Several ``--model`` values; their names must differ (they label rows, columns and files)."""
    out = [parse_model_spec(s) for s in specs]
    seen: set[str] = set()
    for s in out:
        if s.name in seen:
            raise UserError(f"two --model values are named {s.name!r}; give each a NAME= prefix of its own")
        seen.add(s.name)
    return out
