"""The Typer app and the helpers every command module shares."""

from __future__ import annotations

import functools
import inspect
import math
import os
import sys
from pathlib import Path

import click
import typer

from ..io.errors import UserError, describe_os_error, system_error

app = typer.Typer(
    name="tcompose",
    help="TokenCompose: train Stable Diffusion to draw every object a prompt names.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: it wraps long option names and help texts at any width (80 columns included), where
    # rich's boxed layout cut them ("--detector-revisi...")
    rich_markup_mode=None,
)


def _flag(fn, name: str) -> str:
    """The option's flag as the user typed it (``--lambda`` for ``lambda_token``)."""
    default = inspect.signature(fn).parameters[name].default
    decls = [d for d in getattr(default, "param_decls", ()) if d.startswith("--")]
    return decls[0] if decls else "--" + name.replace("_", "-")


def _refuse_non_finite(fn, kwargs: dict) -> None:
    """NaN and inf pass click's float parsing, and every ``x < 0`` check: refuse them for every float option."""
    for name, value in kwargs.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{_flag(fn, name)} {value}: not a finite number")


def _friendly(fn):
    """Refused input ends in one red line and exit code 2; anything else shows its traceback and exit code 1.

    The user's mistake is a :class:`~tcompose.io.errors.UserError`, or an ``OSError`` on a path the user gave
    (:func:`_users_os_error`). Anything else -- a plain ``ValueError`` or ``RuntimeError`` from a broken
    invariant, an ``OSError`` of the machine (a full disk, an I/O error: :func:`tcompose.io.errors.system_error`), even
    on a file the user named -- prints its traceback and a line saying it looks like a bug (or a system error) and
    what to report. TCOMPOSE_DEBUG=1 raises every
    error as is. A non-finite float option (nan, inf) is refused input for every command.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _refuse_non_finite(fn, kwargs)
            return fn(*args, **kwargs)
        except KeyboardInterrupt as err:
            if os.environ.get("TCOMPOSE_DEBUG"):
                raise
            _say_interrupted(err)
            # 128 + the signal: a trainer stopped by SIGTERM exits 143, by SIGUSR1 138 (tcompose.io.preemption)
            raise typer.Exit(code=getattr(err, "exit_code", 130))
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as err:  # noqa: BLE001  (sorted below: the user's mistake, or a bug with its traceback)
            if os.environ.get("TCOMPOSE_DEBUG"):
                raise
            from rich.console import Console
            from rich.markup import escape

            console = Console(stderr=True)
            users = _users_os_error(err, (*args, *kwargs.values())) and not system_error(err)
            if isinstance(err, UserError) or users:
                said = str(err) if isinstance(err, UserError) else describe_os_error(err)  # path and fix, no [Errno N]
                console.print(f"[bold red]error:[/] {escape(said)}", highlight=False, soft_wrap=True)
                raise typer.Exit(code=2)
            _report_bug(err, console)
            raise typer.Exit(code=1)

    return wrapper


#: OSError kinds that say "this path is wrong": also the user's when raised for a file inside a folder they gave.
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


def _resolved(value) -> Path | None:
    try:
        return Path(os.fsdecode(value)).expanduser().resolve()
    except (TypeError, ValueError, OSError, RuntimeError):
        return None


def _user_paths(values) -> tuple[set[Path], set[Path]]:
    """(every path-like argument, resolved; the ``Path`` arguments among them that may hold the error's file).

    A ``str`` argument counts as a path only as a whole (or one comma-separated part), never as a folder:
    ``"."`` or a prompt is not a place the user chose. The working directory and the folders above it never
    count as folders either."""
    exact: set[Path] = set()
    folders: set[Path] = set()
    stack = list(values)
    while stack:
        v = stack.pop()
        if isinstance(v, (list, tuple, set, frozenset)):
            stack.extend(v)
        elif isinstance(v, os.PathLike):
            p = _resolved(v)
            if p is not None:
                exact.add(p)
                folders.add(p)
        elif isinstance(v, str) and v.strip():
            for part in {v, *v.split(",")}:
                p = _resolved(part.strip()) if part.strip() else None
                if p is not None:
                    exact.add(p)
    cwd = Path.cwd().resolve()
    return exact, {f for f in folders if f != cwd and f not in cwd.parents}


def _users_os_error(err: BaseException, values) -> bool:
    """An ``OSError`` about a path the user gave: its ``filename`` (or ``filename2``) is one of the command's
    path arguments, or (not found, not a folder, a folder, no permission, exists) lies inside a folder argument."""
    if not isinstance(err, OSError):
        return False
    names = [p for p in (_resolved(n) for n in (err.filename, err.filename2) if n is not None) if p is not None]
    if not names:
        return False
    exact, folders = _user_paths(values)
    if any(n in exact for n in names):
        return True
    return isinstance(err, _PATH_ERRORS) and any(f in n.parents for n in names for f in folders)


def _report_bug(err: BaseException, console) -> None:
    """The full traceback, then one line: a system error (:func:`tcompose.io.errors.system_error`: a full disk, an
    I/O error) or a bug in tcompose, and what to put in the report."""
    import shlex
    import traceback

    from rich.markup import escape

    traceback.print_exception(err, file=sys.stderr)
    command = "tcompose " + shlex.join(ARGV) if ARGV else "the tcompose command line"
    report = escape(f"report it with the command ({command}), the traceback above and the output of "
                    "`pip freeze | grep -iE 'tcompose|torch|diffusers|transformers|accelerate'`")
    if system_error(err):
        console.print(f"[bold red]system error:[/] {escape(str(err))}: this is the system (disk, network, "
                      f"permissions), not your input; if it is none of these, {report}", highlight=False,
                      soft_wrap=True)
    else:
        console.print(f"[bold red]this looks like a bug in tcompose[/] ({type(err).__name__}: {escape(str(err))}); "
                      f"{report}", highlight=False, soft_wrap=True)


#: The command line being run (``main`` sets it), for the resume hint after Ctrl-C.
ARGV: list[str] = []


def _say_interrupted(err: KeyboardInterrupt) -> None:
    """Ctrl-C: one line saying what was kept and the command that continues (main process only)."""
    if os.environ.get("RANK", "0") != "0":
        return
    import shlex

    from rich.console import Console

    note = getattr(err, "note", None) or "interrupted: what was finished is kept (shards, images and checkpoints are written whole)"
    args = list(ARGV)
    flag = getattr(err, "resume_flag", None)
    if flag and flag.split()[0] not in args:
        args = [a for a in args if a != "--overwrite"] + flag.split()
    Console(stderr=True).print(f"{note}; resume with: tcompose {shlex.join(args)}", highlight=False, soft_wrap=True)


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _ints(value: str, flag: str) -> tuple[int, ...]:
    """``"1,2,8"`` -> (1, 2, 8); anything else is refused input naming ``flag``."""
    try:
        return tuple(int(v) for v in _split(value))
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got {value!r}") from None


def tf32_option():
    """``--tf32/--no-tf32``: one option, one default and one help text for train-unet, train-clip and bench."""
    from ..models.precision import TF32_DEFAULT, TF32_HELP

    return typer.Option(TF32_DEFAULT, "--tf32/--no-tf32", help=TF32_HELP)


def process_state():
    """This process's rank, world size and device under ``accelerate launch`` (or a single process).

    ``cpu=True`` where no GPU exists, so that several CPU processes (``accelerate launch --multi_gpu
    --num_processes 2`` on a CPU machine) form a gloo group instead of running as independent copies.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def run_sharded(run, cfg, state=None) -> None:
    """``run(cfg)`` as this process's share of a sharded stage: its rank and the number of processes
    (``state``, :func:`process_state` by default); the main process shows the progress bar."""
    if state is None:
        state = process_state()
    run(cfg, rank=state.process_index, world_size=state.num_processes, progress=state.is_main_process)
