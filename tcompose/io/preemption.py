"""Stopping a trainer cleanly on SIGTERM, SIGUSR1 or Ctrl-C (SIGINT): finish the optimizer step, checkpoint it,
say how to resume, exit with ``128 + signal number``.

SLURM and cloud schedulers preempt a job with SIGTERM (SLURM's ``--signal=USR1@120`` sends SIGUSR1 some time
before the limit). A trainer runs its loop inside :class:`StopSignals`, which only records the signal, and asks
:meth:`StopSignals.agreed` at every optimizer-step boundary whether any process got one: all processes call it at
the same step (a tiny ``gather``), so all take the same decision and none waits for another in a collective that
never comes. When it names a signal, the loop saves that step's checkpoint (the main process writes, everyone
waits) and raises :meth:`StopSignals.stopped`: a :class:`~tcompose.io.runs.Interrupted` whose ``exit_code`` the
CLI exits with (SIGTERM 143, SIGUSR1 138, SIGINT 130), after one line with the resume command.

A second Ctrl-C stops at once (``KeyboardInterrupt`` as before: the last periodic checkpoint is kept).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from .runs import Interrupted

#: The signals a trainer stops cleanly on.
STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGUSR1", "SIGINT")) if s is not None)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Stopped(Interrupted):
    """A trainer stopped on a signal after checkpointing the step it finished; the CLI exits with ``exit_code``."""

    def __init__(self, note: str, signum: int, step: int, resume_flag: str | None = "--resume latest"):
        super().__init__(note, resume_flag)
        self.signum, self.step, self.exit_code = signum, step, 128 + signum


class StopSignals:
    """While entered (main thread only; elsewhere it does nothing), SIGTERM, SIGUSR1 and SIGINT are recorded in
    ``signum`` instead of ending the process; the previous handlers come back on exit. A second SIGINT raises
    ``KeyboardInterrupt`` at once."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def agreed(self, accelerator=None) -> int | None:
        """The signal to stop on, the same on every process: called by all processes at the same optimizer-step
        boundary (one small gather when there are several; none for one process). The lowest rank's wins."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.signum
        import torch

        mine = torch.tensor([self.signum or 0], dtype=torch.long, device=accelerator.device)
        got = [s for s in accelerator.gather(mine).tolist() if s]
        if got and self.signum is None:
            self.signum = got[0]
        return got[0] if got else None

    @staticmethod
    def stopped(signum: int, step: int, checkpoint: Path) -> Stopped:
        """The error a trainer raises after saving ``checkpoint`` of ``step`` on ``signum``."""
        return Stopped(f"stopped by {signal_name(signum)} at step {step}: checkpoint saved at {checkpoint}", signum, step)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the workers ignore SIGTERM, SIGUSR1 and SIGINT, which a scheduler or a
    terminal sends to every process, so that they keep loading until the trainer has finished its step and saved
    (a worker ended by the signal would fail the trainer's next batch). The trainer ends them as always."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
