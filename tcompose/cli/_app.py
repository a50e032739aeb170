"""The Typer app and the helpers every command module shares."""

from __future__ import annotations

import functools
import inspect
import math
import os

import typer

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
            raise ValueError(f"{_flag(fn, name)} {value}: not a finite number")


def _friendly(fn):
    """Bad input ends in one red line and exit code 2 (TCOMPOSE_DEBUG=1 shows the traceback instead).
    A non-finite float option (nan, inf) is bad input for every command."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _refuse_non_finite(fn, kwargs)
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError, OSError) as err:
            if os.environ.get("TCOMPOSE_DEBUG"):
                raise
            from rich.console import Console

            Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2)
        except KeyboardInterrupt as err:
            if os.environ.get("TCOMPOSE_DEBUG"):
                raise
            _say_interrupted(err)
            raise typer.Exit(code=130)

    return wrapper


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


def process_state():
    """This process's rank, world size and device under ``accelerate launch`` (or a single process).

    ``cpu=True`` where no GPU exists, so that several CPU processes (``accelerate launch --multi_gpu
    --num_processes 2`` on a CPU machine) form a gloo group instead of running as independent copies.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
