"""Errors that say "your input was refused", as against a bug in tcompose.

It imports nothing from tcompose (and ``tcompose.io`` re-exports lazily, so the CLI imports it without torch):
every area may raise these.

The rule: tcompose raises :class:`UserError` (or one of its kinds below) where it refuses something the user
can fix: a bad option value, a file or folder that is missing, not a folder, or not what it should be, a
resume that does not match the run it continues. The command line shows its message as one line and exits with
code 2. Everything else -- a plain ``ValueError`` or ``RuntimeError`` that signals a broken invariant, an
``OSError`` (a full disk, a network failure) on a path the user did not name -- is shown with its traceback as
a bug or a system error, exit code 1.

``UserError`` subclasses ``ValueError``, and each path kind also subclasses the matching ``OSError``, so code
(and tests) that catch ``ValueError`` or ``FileNotFoundError`` keep working.
"""

from __future__ import annotations

import errno

__all__ = ["UserError", "MissingPathError", "NotAFolderError", "PathExistsError", "UnavailableError",
           "system_error", "describe_os_error"]


class UserError(ValueError):
    """Input the user can fix was refused; the message says what was wrong and how to fix it."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder the user named (or one that a folder the user named must hold) is not there."""


class NotAFolderError(UserError, NotADirectoryError):
    """A path the user named should be a folder and is not."""


class PathExistsError(UserError, FileExistsError):
    """A path the user named already holds something that tcompose will not overwrite."""


class UnavailableError(UserError, OSError):
    """A model or file fetched by a name the user gave (a hub id, a download) cannot be had as asked: no such id,
    not in the offline cache, no network. The message names the fix (another id, ``tcompose download``, a local
    folder). Not for an ``OSError`` that :func:`system_error` calls the system's (a full disk, an I/O error)."""


#: errnos that say the machine failed, not the input: a full disk or quota, an I/O error, a read-only file
#: system, no memory, a stale or broken network file system.
SYSTEM_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EIO", "EROFS", "ENOMEM", "ESTALE",
                                                             "EREMOTEIO", "ENOLINK") if hasattr(errno, name))


def system_error(err: BaseException) -> bool:
    """Whether ``err`` is an ``OSError`` of the machine (:data:`SYSTEM_ERRNOS`), which no other input fixes."""
    return isinstance(err, OSError) and err.errno in SYSTEM_ERRNOS


#: The fix for each kind of path error, after the path and what the system said.
_PATH_FIXES = (
    (FileNotFoundError, "check the path (or create what it names)"),
    (NotADirectoryError, "a part of the path that should be a folder is a file: move that file away or pass "
                         "another path"),
    (IsADirectoryError, "it is a folder where a file should be: pass a file's path"),
    (FileExistsError, "something already has that name: move it away or pass another path"),
    (PermissionError, "pass a path you may read and write, or change its permissions"),
)


def describe_os_error(err: OSError) -> str:
    """An ``OSError`` on a path the user gave, for one line: the path, what the system said, and the fix
    (``/x/out: Permission denied; pass a path you may ...``) instead of Python's ``[Errno 13] ...``."""
    path = err.filename if err.filename is not None else err.filename2
    what = err.strerror or str(err)
    fix = next((f for kind, f in _PATH_FIXES if isinstance(err, kind)), None)
    head = f"{path}: {what}" if path is not None else what
    if err.filename is not None and err.filename2 is not None:
        head += f" (-> {err.filename2})"
    return f"{head}; {fix}" if fix else head
