"""What both trainers (train-unet, train-clip) train under and report to: their Accelerator
(:func:`trainer_accelerator`: CPU or CUDA, gradient accumulation, mixed precision, the ``--report-to`` trackers
logging into the run folder), ``--report-to`` checked before any work (:func:`check_report_to`), images to every
tracker (:func:`log_validation_images`), ``--optimizer`` (:func:`adamw_class`), their progress bar and peak memory.
A run folder's safety (refusals, resuming, non-finite losses, interrupts) is :mod:`.runs`'.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError


def check_report_to(report_to: str) -> list[str]:
    """The accelerate trackers of ``--report-to`` (tensorboard, wandb, all: both, none: no tracker); a UserError
    naming the install when wandb is asked for and missing."""
    import importlib.util

    trackers = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"], "none": []}
    if report_to not in trackers:
        raise UserError(f"--report-to must be one of {', '.join(trackers)}, got {report_to!r}")
    if "wandb" in trackers[report_to] and importlib.util.find_spec("wandb") is None:
        raise UserError(f"--report-to {report_to} needs wandb, which is not installed: pip install wandb "
                        "(or pip install 'tcompose[wandb]'), or pass --report-to tensorboard")
    return trackers[report_to]


def adamw_class(optimizer: str):
    """``--optimizer``: torch's AdamW, or bitsandbytes' 8-bit AdamW (a UserError naming the extra when missing)."""
    import torch

    if optimizer == "adamw":
        return torch.optim.AdamW
    if optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--optimizer adamw8bit needs bitsandbytes, which is not installed: "
                            "pip install 'tcompose[bnb]' (or pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit
    raise UserError(f"--optimizer must be adamw or adamw8bit, got {optimizer!r}")


def log_validation_images(accelerator, grid, step: int, name: str = "validation") -> None:
    """An image (``[H, W, 3]`` uint8: a validation grid, an eval chart) to every tracker of the run, under ``name``."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: grid[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: [wandb.Image(grid)]}, step=step)
        else:
            tracker.log_images({name: grid[None]}, step=step)


def trainer_accelerator(out: Path, grad_accum: int, mixed_precision: str, report_to: str = "tensorboard"):
    """The Accelerator of both trainers: on the CPU where there is no CUDA, ``grad_accum`` micro-steps per
    optimizer step, ``mixed_precision`` (no, fp16, bf16), tensorboard logs under ``out/logs``. fp16 on the CPU
    trains in fp32 with a note, as ``--dtype fp16`` does elsewhere (no fast half-precision CPU kernels): the
    trainers take their precision from ``accelerator.mixed_precision``."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cpu = not torch.cuda.is_available()
    note = None
    if cpu and mixed_precision == "fp16":
        mixed_precision, note = "no", "--mixed-precision fp16 on CPU: training in fp32 instead (no fast half-precision CPU kernels)"
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=grad_accum,
        mixed_precision=mixed_precision,
        log_with=check_report_to(report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if note:
        accelerator.print(note)
    return accelerator


def peak_memory_mb(device) -> float:
    """Peak allocated CUDA memory of ``device``, or this process's peak resident set on CPU, in MiB."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def training_progress(name: str, enabled: bool):
    """The rich progress bar of a trainer: steps, elapsed, remaining, and a description for the losses."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.description}"), disable=not enabled, transient=False)
