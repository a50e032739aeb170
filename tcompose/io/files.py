"""Files written the way every other output is: readable as the umask allows.

safetensors' ``save_file`` (and so ``save_pretrained`` of diffusers and transformers) writes through a private
temporary file, which leaves the weights at mode 0600 whatever the umask: another user of a shared GPU box
could not read a checkpoint or a trained pipeline. :func:`match_umask` gives such files the mode a plain
``open()`` would have given them.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_file_mode() -> int:
    """The mode a new file gets from ``open()`` under the current umask (0o644 with the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def match_umask(*paths: str | os.PathLike) -> None:
    """Give every file under ``paths`` (files or folders) that is more private than the umask asks the umask's mode.
    Only the owner's own files are touched; wider modes stay as they are."""
    mode = default_file_mode()
    for root in map(Path, paths):
        files = [root] if root.is_file() else (p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        for f in files:
            current = f.stat().st_mode & 0o777
            if current & mode != mode and not f.is_symlink():
                os.chmod(f, current | mode)
