"""``accelerate launch ... preempt_worker.py train-unet ARGS``: tcompose's CLI in each process, where the process of
rank $PREEMPT_RANK sends itself $PREEMPT_SIGNAL (default SIGTERM) during its $PREEMPT_CALL-th micro-step (0: never),
as a scheduler preempting one node would; each process writes {"code", "calls"} to $PREEMPT_REPORT/rank-R.json."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import tcompose.grounding.objective as objective
from tcompose.cli import main

rank = int(os.environ.get("RANK", "0"))
target, call = int(os.environ.get("PREEMPT_RANK", "0")), int(os.environ.get("PREEMPT_CALL", "0"))
signum = getattr(signal, os.environ.get("PREEMPT_SIGNAL", "SIGTERM"))
real, calls = objective.tokencompose_losses, [0]


def losses(*args, **kwargs):
    out = real(*args, **kwargs)
    calls[0] += 1
    if rank == target and calls[0] == call:
        os.kill(os.getpid(), signum)
    return out


objective.tokencompose_losses = losses
code = main(sys.argv[1:])
report = os.environ.get("PREEMPT_REPORT")
if report:
    (Path(report) / f"rank-{rank}.json").write_text(json.dumps({"code": code, "calls": calls[0]}))
sys.exit(code)
