"""A preempted train-unet (SIGTERM, SIGUSR1, Ctrl-C) finishes its optimizer step, checkpoints it, prints the resume
command and exits with 128 + the signal; resuming gives the weights of a run never stopped, with one process and
with two (a signal to one rank stops both at the same step, without a hang)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tcompose.grounding.objective as objective
from tcompose.cli import main
from tcompose.io.preemption import StopSignals

from helpers import make_training_setup

RES = 32
WORKER = Path(__file__).with_name("preempt_worker.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_training_setup(tmp_path_factory.mktemp("preempt"), n_images=16, seed=3)


def cli_args(setup, output, *extra, steps: int = 5, batch: int = 2) -> list[str]:
    return ["train-unet", "--data", str(setup["masks"]), "--model", str(setup["base"]), "--output", str(output),
            "--resolution", str(RES), "--batch-size", str(batch), "--grad-accum", "1", "--max-steps", str(steps),
            "--lr", "1e-3", "--lambda", "1.0", "--gamma", "0.1", "--num-workers", "0", "--checkpoint-every", "0",
            "--eval-fraction", "0", "--log-every", "1", *extra]


def signal_at(monkeypatch, call: int, *signums: int) -> None:
    """The objective sends this process ``signums`` during its ``call``-th micro-step (= optimizer step here)."""
    real, calls = objective.tokencompose_losses, [0]

    def losses(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == call:
            for s in signums:
                os.kill(os.getpid(), s)
        return out

    monkeypatch.setattr(objective, "tokencompose_losses", losses)


def unet(run: Path) -> dict:
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stop_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if "resume with" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """The uninterrupted run of 5 steps, one process."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(cli_args(setup, out)) == 0
    return out


def test_sigterm_finishes_the_step_saves_it_and_resuming_gives_the_uninterrupted_weights(setup, straight, tmp_path,
                                                                                         monkeypatch, capsys):
    out = tmp_path / "run"
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    signal_at(monkeypatch, 3, signal.SIGTERM)
    assert main(cli_args(setup, out)) == 143
    line = stop_line(capsys.readouterr().err)
    assert line.startswith(f"stopped by SIGTERM at step 3: checkpoint saved at {out / 'checkpoints' / 'step-000003'}")
    assert line.rstrip().endswith("--resume latest") and "tcompose train-unet --data" in line
    assert checkpoints(out) == ["step-000003"]  # the step it finished, though --checkpoint-every is 0
    assert not (out / "unet").exists() and not (out / "training_summary.json").exists()
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are given back
    monkeypatch.undo()
    assert main(cli_args(setup, out, "--resume", "latest")) == 0
    assert json.loads((out / "training_summary.json").read_text())["steps_this_run"] == 2
    assert same_weights(unet(straight), unet(out)), "the resumed run differs from the uninterrupted one"


def test_sigusr1_exits_138_with_one_checkpoint_at_a_periodic_step(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    signal_at(monkeypatch, 2, signal.SIGUSR1)
    assert main(cli_args(setup, out, "--checkpoint-every", "2")) == 138
    assert stop_line(capsys.readouterr().err).startswith("stopped by SIGUSR1 at step 2: checkpoint saved at")
    assert checkpoints(out) == ["step-000002"]


def test_ctrl_c_finishes_the_step_and_twice_stops_at_once(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "once"
    signal_at(monkeypatch, 2, signal.SIGINT)
    assert main(cli_args(setup, out)) == 130
    assert stop_line(capsys.readouterr().err).startswith("stopped by SIGINT at step 2: checkpoint saved at")
    assert checkpoints(out) == ["step-000002"]
    out = tmp_path / "twice"
    signal_at(monkeypatch, 2, signal.SIGINT, signal.SIGINT)  # the old way: only the periodic checkpoints are kept
    assert main(cli_args(setup, out, "--checkpoint-every", "1")) == 130
    line = stop_line(capsys.readouterr().err)
    assert line.startswith("interrupted at step 1: kept") and "step-000001" in line


def test_stop_signals_are_only_recorded_and_agreed_alone_without_a_gather():
    with StopSignals() as signals:
        assert signals.agreed() is None
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.signum == signal.SIGTERM and signals.agreed() == signal.SIGTERM  # the first one counts
    err = signals.stopped(signal.SIGTERM, 7, Path("ck/step-000007"))
    assert err.exit_code == 143 and isinstance(err, KeyboardInterrupt)
    assert err.note == "stopped by SIGTERM at step 7: checkpoint saved at ck/step-000007"


# ------------------------------------------------------------------------------------------ two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers_of(report: Path) -> list[int]:
    """The worker processes of one launch: those whose environment names its report folder."""
    mark = f"PREEMPT_REPORT={report}".encode()
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark in env.read_bytes().split(b"\0"):
                found.append(int(env.parent.name))
        except OSError:
            continue
    return found


def launch(args: list[str], report: Path, rank: int = 0, call: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    """``accelerate launch --num_processes 2 preempt_worker.py ARGS`` (gloo on CPU); rank ``rank`` sends itself
    SIGTERM in its ``call``-th micro-step (0: never)."""
    report.mkdir(parents=True, exist_ok=True)
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(WORKER), *args]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                        "PREEMPT_RANK": str(rank), "PREEMPT_CALL": str(call), "PREEMPT_REPORT": str(report)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # a hang fails below, and no process is left behind
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in _workers_of(report):  # torchrun starts each worker in its own session
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"accelerate launch hung for {timeout} s; reports: "
                    f"{[p.read_text() for p in sorted(report.glob('rank-*.json'))]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step_and_resumes_exactly(setup, tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "run"
    proc = launch(cli_args(setup, straight, steps=4, batch=1), tmp_path / "r0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = launch(cli_args(setup, out, steps=4, batch=1), tmp_path / "r1", rank=1, call=2)
    ranks = [json.loads((tmp_path / "r1" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"code": 143, "calls": 2}] * 2, (ranks, proc.stderr[-3000:])  # both stopped after step 2
    assert proc.returncode != 0  # the launcher reports its workers' exit code 143 as a failure
    assert "stopped by SIGTERM at step 2: checkpoint saved at" in proc.stderr  # the main process's line
    assert checkpoints(out) == ["step-000002"]
    proc = launch(cli_args(setup, out, "--resume", "latest", steps=4, batch=1), tmp_path / "r2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "training_summary.json").read_text())["steps_this_run"] == 2
    assert same_weights(unet(straight), unet(out)), "the resumed two-process run differs from the uninterrupted one"
