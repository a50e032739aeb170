"""The `tcompose` command line: one thin command per stage (options -> the stage's config -> stage.run).

Heavy libraries (torch, diffusers, transformers) are imported inside the commands, so `tcompose --help`
answers at once. Every command runs the same under `accelerate launch -m tcompose <command> ...`.

Commands live by area: ``data`` (masks, crops), ``train`` (train-unet, train-clip), ``evaluate`` (generate,
multigen, visor, fid, latency, table, attnviz), ``tools`` (demo). Importing a module registers its commands on
:data:`app`. ``option_groups``: options several commands share, declared once (the generation options of every
generating command, the detection options of multigen and visor).
"""

from __future__ import annotations

import sys

from . import _app, data, evaluate, tools, train  # noqa: F401  (registers the commands)
from ._app import app

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``main(["train-unet", ...])`` runs a command in-process and returns its exit code."""
    args = list(argv) if argv is not None else sys.argv[1:]
    _app.ARGV[:] = args
    _quiet_kernel_hub()
    try:
        app(args=args, prog_name="tcompose", standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        _leave_process_group()
    return 0


def _quiet_kernel_hub() -> None:
    """bitsandbytes (``--optimizer adamw8bit``) tries, when diffusers imports it, to fetch a CPU 4-bit kernel from
    the Hub and warns twice on every command where it cannot (offline, or no CUDA). tcompose uses none of its 4-bit
    kernels on a CPU: those two lines would only hide the command's own output."""
    import logging

    for name in ("kernels", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _leave_process_group() -> None:
    """Under ``accelerate launch``, leave the process group cleanly (a gloo group left open can hang the exit)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
