"""Files written the way every other output is: readable as the umask allows, and folders complete or absent.

safetensors' ``save_file`` (and so ``save_pretrained`` of diffusers and transformers) writes through a private
temporary file, which leaves the weights at mode 0600 whatever the umask: another user of a shared GPU box
could not read a checkpoint or a trained pipeline. :func:`match_umask` gives such files the mode a plain
``open()`` would have given them.

:func:`atomic_folder`: a folder written under a temporary name and renamed into place, so a kill or an error
leaves no half-written folder under its name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


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


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, merge: bool = False) -> Iterator[Path]:
    """A temporary folder to write ``out``'s content into, renamed into place when the block ends without an
    error and removed either way: an error or a kill while writing leaves ``out`` as it was, and a half-written
    folder is never seen under ``out``'s name. (A kill in the moment of the swap itself, between removing an old
    ``out`` and the rename, can leave ``out`` absent, never partial.)

    Without ``merge`` the temporary folder stands beside ``out`` and takes its place as a whole. With ``merge`` it
    stands inside ``out`` and each of its entries takes the place of ``out``'s entry of that name (one rename
    each); what else ``out`` holds stays.
    """
    out = Path(out)
    home = out if merge else out.parent
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        moves = [(entry, out / entry.name) for entry in sorted(tmp.iterdir())] if merge else [(tmp, out)]
        for source, dest in moves:
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(source, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
