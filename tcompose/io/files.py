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


# ----------------------------------------------------------------------------------------------------------
# Outputs checked before any work


def _probe_writable(folder: Path) -> str | None:
    """Why no file can be created in the existing folder ``folder`` (None: one can). A real file is made and
    removed again: ``os.access`` says yes to root even where the file system refuses (``/proc``, a read-only
    mount)."""
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".tcompose-probe-", dir=folder)
    except OSError as err:
        return err.strerror or str(err)
    os.close(fd)
    os.unlink(name)
    return None


def _creatable_under(path: Path, flag: str, what: str) -> None:
    """``path`` (absent) can be created: its nearest existing parent is a folder files can be written in."""
    from .errors import NotAFolderError, UserError

    parent = next((p for p in path.parents if p.exists() or p.is_symlink()), None)
    if parent is None:  # not even the root exists: nothing to check against
        return
    if not parent.is_dir():
        raise NotAFolderError(f"{flag} {path}: {parent} is a file, so no {what} can be made under it; "
                              f"pass a {flag} outside it (or move the file away)")
    why = _probe_writable(parent)
    if why is not None:
        raise UserError(f"{flag} {path}: cannot create the {what} under {parent} ({why}); pass a {flag} in a "
                        "folder you can write to")


def check_output_folder(path: str | os.PathLike, flag: str = "--output", inside: tuple[str, ...] = ()) -> Path:
    """Refuse, before any work, an output folder that cannot be used: a file of that name, a file where a folder
    above it should be, a folder (or the place it would be made) that cannot be written. ``inside``: entries the
    stage writes as folders in it, which must not be files either. Creates nothing; returns ``path``."""
    from .errors import NotAFolderError, UserError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotAFolderError(f"{flag} {path} is a file; pass a folder (an existing one, or one to create)")
    if not path.exists():
        _creatable_under(path, flag, "folder")
        return path
    for name in inside:
        if (path / name).exists() and not (path / name).is_dir():
            raise NotAFolderError(f"{flag} {path}: {path / name} is a file where the output folder {name}/ goes; "
                                  "move it away or pass another " + flag)
    why = _probe_writable(path)
    if why is not None:
        raise UserError(f"{flag} {path}: cannot write in this folder ({why}); pass a {flag} you can write to")
    return path


def check_output_file(path: str | os.PathLike, flag: str = "--output") -> Path:
    """Refuse, before any work, an output file that cannot be written: a folder of that name, a file where a
    folder above it should be, a folder it cannot be created in, an existing file that cannot be replaced.
    Creates nothing; returns ``path``."""
    from .errors import UserError

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; pass a file name")
    if path.parent.exists() and path.parent.is_dir():
        why = _probe_writable(path.parent)  # the file is written beside itself and renamed into place
        if why is not None:
            raise UserError(f"{flag} {path}: cannot write in {path.parent} ({why}); pass a {flag} in a folder "
                            "you can write to")
    else:
        _creatable_under(path, flag, "file")
    return path
