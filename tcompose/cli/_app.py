"""The Typer app and the helpers every command module shares."""

from __future__ import annotations

import functools
import os

import typer

app = typer.Typer(
    name="tcompose",
    help="TokenCompose: train Stable Diffusion to draw every object a prompt names.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _friendly(fn):
    """Bad input ends in one red line and exit code 2 (TCOMPOSE_DEBUG=1 shows the traceback instead)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError, OSError) as err:
            if os.environ.get("TCOMPOSE_DEBUG"):
                raise
            from rich.console import Console

            Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2)

    return wrapper


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
