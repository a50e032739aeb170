"""What both trainers (train-unet, train-clip) do around their loop so that a long run never goes silently wrong
(what they train under, their Accelerator, trackers and optimizer: :mod:`.trainer`).

- :func:`prepare_run_folder`: a folder that already holds a run is never trained into by accident. Without
  ``--resume`` the run is refused with the two ways on (``--resume latest`` or ``--overwrite``); ``--overwrite``
  first removes the old run's checkpoints, logs, outputs and summary.
- :func:`check_resume`: a checkpoint records every setting that changes what is trained (and a fingerprint of
  the data); a resume with other settings is refused, listing the differences. :func:`resume_point` finds the
  checkpoint ``--resume`` names and checks it; its :meth:`ResumePoint.load` restores it (or says the run starts
  at step 0).
- :class:`FiniteGuard`: records, on the device and without a host sync per step, the first step at which a
  loss term became NaN or inf; :meth:`FiniteGuard.check` (at logging and before every checkpoint) stops the
  run with :class:`NonFiniteLossError`, so no checkpoint and no model is written from diverged weights
  (:meth:`FiniteGuard.check_training` adds which checkpoint is kept and how to go on).
- :class:`Interrupted`: Ctrl-C during training, carrying one line for the CLI: what was kept and how to resume
  (:meth:`Interrupted.in_training`; a trainer stopped on a signal: :mod:`tcompose.io.preemption`);
  :func:`kept_on_interrupt`: Ctrl-C in a stage that writes whole files says how many were kept.
- :func:`output_guard`: an output folder that a failed stage created and left empty is removed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from .errors import UserError
from .checkpoints import PREFIX, list_checkpoints, load_checkpoint, resolve_resume
from .datasets import MANIFEST

RUN_FILES = ("checkpoints", "logs", "training_summary.json")  # what every trainer writes into its folder


class NonFiniteLossError(UserError):
    """A loss term became NaN or inf during training; the run stopped before writing anything from it."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in a stage; ``note`` says what was kept, ``resume_flag`` what to add to the command to continue."""

    def __init__(self, note: str, resume_flag: str | None = None):
        super().__init__(note)
        self.note, self.resume_flag = note, resume_flag

    @classmethod
    def in_training(cls, ckpt_root: Path, step: int) -> Interrupted:
        """Ctrl-C in a trainer's loop at ``step``: which checkpoint under ``ckpt_root`` was kept, and
        ``--resume latest`` to continue from it."""
        return cls(interrupted_note(ckpt_root, step), "--resume latest")


def finite_or_raise(values: dict[str, float | None]) -> None:
    """ValueError naming the first option whose value is NaN or infinite (``{"--lr": 5e-6, ...}``)."""
    for flag, value in values.items():
        if value is not None and not math.isfinite(value):
            raise UserError(f"{flag} {value}: not a finite number")


# ----------------------------------------------------------------------------------------------------------
# The run folder


def run_markers(out: Path, outputs: Sequence[str]) -> list[str]:
    """What in ``out`` shows that a run was trained there: checkpoints, logs, a summary, or its outputs."""
    found = []
    for name in (*RUN_FILES, *outputs):
        p = out / name
        if p.is_dir() and any(p.iterdir()) or p.is_file():
            found.append(name + ("/" if p.is_dir() else ""))
    return found


def prepare_run_folder(out: Path, resume: str | None, overwrite: bool, outputs: Sequence[str], command: str,
                       clear: bool = True) -> None:
    """Refuse to train into a folder holding another run unless resuming; ``overwrite`` clears that run first.

    ``outputs``: the entries the trainer writes besides checkpoints/logs/summary (a pipeline's subfolders, ...).
    Every process calls it before any model is loaded (so all refuse alike); only the one with ``clear``
    (the main process) deletes.
    """
    if resume is not None and overwrite:
        raise UserError("--resume and --overwrite exclude each other: --resume continues the run in --output, "
                        "--overwrite deletes it and starts again")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; pass a folder for the run")
    from .files import check_output_folder

    check_output_folder(out, "--output")  # a file above it, a folder no file can be made in: before any work
    if resume is not None:
        return
    found = run_markers(out, outputs) if out.is_dir() else []
    if found == ["logs/"]:  # only the logs of a run that was refused or diverged before its first checkpoint:
        if clear:           # nothing to resume from, so they do not block the corrected command
            shutil.rmtree(out / "logs", ignore_errors=True)
        return
    if not found:
        return
    if not overwrite:
        steps = [p.name for p in list_checkpoints(out / "checkpoints")]
        last = f", last checkpoint {steps[-1]}" if steps else ""
        raise UserError(
            f"{out} already holds a {command} run ({', '.join(found)}{last}): continue it with --resume latest, "
            f"start it again with --overwrite (deletes that run's checkpoints, logs and outputs), or pick a new --output"
        )
    if not clear:
        return
    for name in (*RUN_FILES, *outputs):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# ----------------------------------------------------------------------------------------------------------
# Settings a resume must keep


def dataset_fingerprint(data_dir: str | os.PathLike) -> str:
    """A short hash of a dataset folder's content as its manifest describes it (settings, shards, row counts,
    statistics), not of its path: a copied or moved dataset keeps its fingerprint, another dataset does not."""
    manifest = json.loads((Path(data_dir) / MANIFEST).read_text())
    keep = {k: manifest.get(k) for k in ("kind", "fingerprint", "config", "num_rows", "shards", "stats")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_id(name: str | os.PathLike | None) -> str | None:
    """A model as a resume compares it: a local folder by its absolute path, a hub id as written."""
    if name is None:
        return None
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else str(name)


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


def settings_differences(saved: dict, now: dict, ignore: Iterable[str] = (), absent: dict | None = None) -> list[str]:
    """``"--lr 1e-05 -> 0.0001"`` for every setting whose value differs (keys are the options' flags), but those
    in ``ignore``. ``absent``: the value a setting that one side does not record stands for (settings added
    later are recorded only when set, so a missing one is its default)."""
    out, skip, absent = [], set(ignore), absent or {}
    for key in sorted((set(saved) | set(now)) - skip):
        missing = absent.get(key, "(not recorded)")
        a, b = saved.get(key, missing), now.get(key, missing)
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{key} {_show(a)} -> {_show(b)}")
    return out


#: What a resume may change to continue a run that diverged (the advice of :class:`NonFiniteLossError`): a lower
#: --lr, another --max-grad-norm (clipping: a lower value clips harder, 0 turns it off). The checkpoint the resume
#: writes next records the new values.
STEADIER_ON_RESUME = ("--lr", "--max-grad-norm")


def steadier_on_resume(saved: dict, now: dict) -> list[str]:
    """The flags of :data:`STEADIER_ON_RESUME` that this resume changes as allowed: --lr only lowered, and
    --max-grad-norm to any value."""
    out = []
    for flag in STEADIER_ON_RESUME:
        a, b = saved.get(flag), now.get(flag)
        if not (isinstance(a, (int, float)) and isinstance(b, (int, float))) or a == b:
            continue
        if flag != "--lr" or b < a:
            out.append(flag)
    return out


def check_resume(saved: dict | None, now: dict, path: Path, may_differ: Iterable[str] = (),
                 absent: dict | None = None) -> None:
    """Refuse a resume from ``path`` whose recorded settings differ from this run's (``may_differ``: flags that
    are allowed to change here; ``absent``: see :func:`settings_differences`). Checkpoints older than this check
    record none: nothing to compare."""
    if saved is None:
        return
    diffs = settings_differences(saved, now, ignore=(*may_differ, *steadier_on_resume(saved, now)), absent=absent)
    if diffs:
        raise UserError(
            f"{path} was trained with other settings, so this run would not continue the same run: "
            f"{'; '.join(diffs)}. "
            "Resume with the checkpoint's settings (processes may change if --batch-size x processes stays equal), "
            "or train into a new --output"
        )


@dataclass(frozen=True)
class ResumePoint:
    """Where a run starts: the checkpoint ``path`` that ``--resume`` (``resume``) names under ``ckpt_root``, or
    None for step 0."""

    path: Path | None
    resume: str | None
    ckpt_root: Path
    changed: tuple[str, ...] = ()
    """``"--lr 0.001 -> 0.0001"`` for each :data:`STEADIER_ON_RESUME` setting this resume changes."""
    lr: tuple[float, float] | None = None
    """(the checkpoint's --lr, this run's) when the resume lowers it."""

    def load(self, log: Callable[[str], object], model, optimizer, lr_scheduler, ema=None, scaler=None) -> tuple[int, dict]:
        """Restore the checkpoint into the training state and say so with ``log``: (its step, the ``extra`` it
        recorded); (0, {}) when the run starts afresh."""
        if self.path is None:
            if self.resume == "latest":
                log(f"no checkpoint under {self.ckpt_root}: starting from step 0")
            return 0, {}
        state = load_checkpoint(self.path, model, optimizer, lr_scheduler, ema, scaler)
        if self.lr is not None:  # the restored optimizer and schedule carry the old rate: scale them to the new one
            old, new = self.lr
            lr_scheduler.base_lrs = [b * new / old for b in lr_scheduler.base_lrs]
            for group in optimizer.param_groups:
                group["lr"] *= new / old
                if "initial_lr" in group:
                    group["initial_lr"] *= new / old
            if hasattr(lr_scheduler, "_last_lr"):
                lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        changed = f" with {'; '.join(self.changed)}" if self.changed else ""
        log(f"resumed from {self.path} at step {state['step']}{changed}")
        return state["step"], state["extra"]


def resume_point(resume: str | None, ckpt_root: Path, settings: dict, may_differ: Iterable[str] = (),
                 absent: dict | None = None) -> ResumePoint:
    """The checkpoint ``--resume`` names (``latest``: the newest under ``ckpt_root``), refused by
    :func:`check_resume` when it was trained with other ``settings``. Every process calls it before any weights
    are loaded, so all refuse alike."""
    path = resolve_resume(resume, ckpt_root)
    changed, lr = [], None
    if path is not None:
        saved = json.loads((path / "state.json").read_text()).get("extra", {}).get("settings")
        check_resume(saved, settings, path, may_differ, absent)
        steadier = steadier_on_resume(saved or {}, settings)
        changed = [f"{flag} {saved[flag]} -> {settings[flag]}" for flag in steadier]
        if "--lr" in steadier:
            lr = (float(saved["--lr"]), float(settings["--lr"]))
    return ResumePoint(path, resume, ckpt_root, tuple(changed), lr)


# ----------------------------------------------------------------------------------------------------------
# Non-finite losses


class FiniteGuard:
    """First optimizer step at which each loss term was NaN or inf, kept on the device (no sync per step).

    ``update(step, {"ldm": t, ...})`` after each micro-step; ``check(gather)`` syncs (all processes together:
    ``gather`` stacks every process's record, the earliest step wins) and raises :class:`NonFiniteLossError`
    naming the step and the term.
    """

    NEVER = 2**62

    def __init__(self, terms: Sequence[str], device):
        import torch

        self.terms = list(terms)
        self.first = torch.full((len(self.terms),), self.NEVER, dtype=torch.long, device=device)

    def update(self, step: int, losses: dict) -> None:
        import torch

        bad = torch.stack([~torch.isfinite(losses[t].detach()).all() for t in self.terms])
        self.first = torch.where(bad & (self.first == self.NEVER), torch.full_like(self.first, step), self.first)

    def check(self, gather=None, context: str = "") -> None:
        first = self.first
        if gather is not None:  # every process must take the same decision: the earliest step over processes
            first = gather(first[None]).min(dim=0).values
        values = first.tolist()
        bad = [(s, t) for s, t in zip(values, self.terms) if s != self.NEVER]
        if bad:
            step = min(s for s, _ in bad)
            terms = ", ".join(t for s, t in bad if s == step)
            raise NonFiniteLossError(f"the loss became non-finite at step {step} ({terms} is NaN or inf){context}")

    def check_training(self, gather, ckpt_root: Path, written: str, lower: str = "--lr",
                       restart: str | None = None) -> None:
        """:meth:`check` in a trainer's loop (a sync: at logging steps, before every checkpoint and at the end);
        the error says that no ``written`` (model, pipeline) was written, which checkpoint under ``ckpt_root`` is
        kept, and how to go on: from it with a lower ``lower`` or another --max-grad-norm and ``--resume latest``
        (what :func:`check_resume` allows, :data:`STEADIER_ON_RESUME`), or, to change ``restart`` (options a
        resume may not change), again with ``--overwrite``. Without a checkpoint: run again (its logs/ do not
        block the rerun, :func:`prepare_run_folder`)."""
        try:
            self.check(gather)
        except NonFiniteLossError as err:
            steadier = f"a lower {lower} (or another --max-grad-norm)"
            if list_checkpoints(ckpt_root):
                how = (f"{kept_checkpoint_note(ckpt_root)}: check the data, then continue from it with {steadier} "
                       "and --resume latest" + (f", or start again with other {restart} and --overwrite"
                                                if restart else ""))
            else:
                how = (f"no checkpoint was written under {ckpt_root}: check the data, then run the command again "
                       f"with {steadier}" + (f" or other {restart}" if restart else ""))
            raise NonFiniteLossError(f"{err}: training stopped and no {written} was written; {how}") from None


def kept_checkpoint_note(ckpt_root: Path) -> str:
    """'the last good checkpoint is .../step-000300' or 'no checkpoint was written'."""
    found = list_checkpoints(ckpt_root)
    return f"the last good checkpoint is {found[-1]}" if found else f"no checkpoint was written under {ckpt_root}"


@contextlib.contextmanager
def kept_on_interrupt(kept: Callable[[], str]) -> Iterator[None]:
    """Ctrl-C inside a stage that writes its results whole (images, shards) and skips them on a rerun: the
    ``KeyboardInterrupt`` becomes :class:`Interrupted` saying ``"interrupted: " + kept()`` (``"3 of 8 images kept
    in OUT/images"``); the CLI adds the same command as the one that continues."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        try:
            what = kept()
        except Exception:  # noqa: BLE001  (counting must not hide the interruption: the CLI's general line)
            what = None
        if what is None:
            raise
        raise Interrupted(f"interrupted: {what}") from None


def files_kept(paths: Sequence[Path], noun: str, where: Path) -> str:
    """``"3 of 8 images kept in OUT/images"``: how many of ``paths`` exist."""
    return f"{sum(Path(p).exists() for p in paths)} of {len(paths)} {noun} kept in {where}"


def shards_kept(writer, n_items: int) -> str:
    """``"2 of 5 shards kept in OUT"``: the finished shards of a :class:`~tcompose.io.datasets.ShardedWriter`
    over ``n_items`` inputs (every process's)."""
    return files_kept([writer.shard_path(s.index) for s in writer.plan(n_items)], "shards", writer.out_dir)


def interrupted_note(ckpt_root: Path, step: int) -> str:
    found = list_checkpoints(ckpt_root)
    if not found:
        return f"interrupted at step {step}: no checkpoint was written yet (--checkpoint-every)"
    last = int(found[-1].name[len(PREFIX):])
    lost = f"; steps {last + 1}-{step} are lost" if step > last else ""
    return f"interrupted at step {step}: kept {found[-1]}{lost}"


# ----------------------------------------------------------------------------------------------------------
# Output folders


def _only_empty_dirs(path: Path) -> bool:
    return all(p.is_dir() for p in path.rglob("*"))


@contextlib.contextmanager
def output_guard(*paths: str | os.PathLike) -> Iterator[None]:
    """On an exception, remove each of ``paths`` that did not exist before and holds no file yet (a failed model
    load leaves nothing behind); anything already written stays, for a rerun to resume from."""
    new = [Path(p) for p in paths if not Path(p).exists()]
    try:
        yield
    except BaseException:
        for p in new:
            if p.is_dir() and _only_empty_dirs(p):
                shutil.rmtree(p, ignore_errors=True)
        raise
