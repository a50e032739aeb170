"""``--model NAME=ID_OR_PATH[,unet=PATH][,text_encoder=PATH][,revision=REV]``: a named model, parsed.

    parse_model_spec("TokenCompose=runs/tc")                       # name TokenCompose, model runs/tc
    parse_model_spec("SD=CompVis/stable-diffusion-v1-4")
    parse_model_spec("mine=CompVis/stable-diffusion-v1-4,unet=runs/tc/unet,text_encoder=runs/clip")
    parse_model_spec("CompVis/stable-diffusion-v1-4")              # name: the last path part

The name labels the model in tables and figures: letters, digits and ``_ . + -``. The text before the
first ``=`` is the name only when it is such a word; otherwise (no ``=``, or a path with ``=`` in it) the
whole head is the model and the name is its last path part. Options after the first ``,`` are ``key=value``
with keys ``unet``, ``text_encoder`` (or ``text-encoder``) and ``revision``. Paths containing ``,`` cannot
be given this way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Iterable

__all__ = ["ModelSpec", "parse_model_spec", "parse_model_specs"]

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_KEYS = {"unet": "unet", "text_encoder": "text_encoder", "text-encoder": "text_encoder", "revision": "revision"}


@dataclass(frozen=True)
class ModelSpec:
    """A model to generate with: label, base model (hub id or folder), optional UNet / text encoder swaps."""

    name: str
    model: str
    unet: str | None = None
    text_encoder: str | None = None
    revision: str | None = None


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
        raise ValueError(f"--model {spec!r}: no model after the name; write NAME=ID_OR_PATH, e.g. "
                         "SD=CompVis/stable-diffusion-v1-4")
    extra: dict[str, str] = {}
    for option in options:
        option = option.strip()
        if not option:
            continue
        key, sep, value = option.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in _KEYS:
            raise ValueError(f"--model {spec!r}: unknown option {option!r}; options are unet=PATH, "
                             "text_encoder=PATH, revision=REV")
        field = _KEYS[key]
        if not value:
            raise ValueError(f"--model {spec!r}: option {key} has no value")
        if field in extra:
            raise ValueError(f"--model {spec!r}: option {key} given twice")
        extra[field] = value
    return ModelSpec(name=name or _default_name(head), model=head, **extra)


def parse_model_specs(specs: Iterable[str]) -> list[ModelSpec]:
    """Several ``--model`` values; their names must differ (they label rows, columns and files)."""
    out = [parse_model_spec(s) for s in specs]
    seen: set[str] = set()
    for s in out:
        if s.name in seen:
            raise ValueError(f"two --model values are named {s.name!r}; give each a NAME= prefix of its own")
        seen.add(s.name)
    return out
