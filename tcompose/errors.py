"""Errors that say "your input was refused", as against a bug in tcompose.

The ground floor of the package: it imports nothing from tcompose, and every area may raise these.

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
           "system_error"]


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
