"""What the tiny-model builders share: a seeded build that leaves the global random state as it was, and a model
folder written whole (under a temporary name, then renamed) without per-file progress bars."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, TypeVar

import torch

from ..io.files import atomic_folder
from ..models.loading import no_hf_progress_bars

T = TypeVar("T")


def seeded(seed: int, build: Callable[[], T]) -> T:
    """``build()`` with torch's CPU generator seeded by ``seed``, the global random state untouched afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def write_folder(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a temporary folder that becomes ``out_dir`` whole when it returns."""
    with atomic_folder(out_dir) as tmp, no_hf_progress_bars():
        write(tmp)
    return Path(out_dir)
