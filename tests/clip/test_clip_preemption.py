"""A preempted train-clip (SIGTERM) finishes its optimizer step, checkpoints it, prints the resume command, exits
143, and resuming gives the weights of a run never stopped (train-unet's: tests/train/test_preemption.py)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import tcompose.clip.loss as clip_loss
from tcompose.cli import main

from test_train_clip import SHAPES, weights, write_crops
from tcompose.testing.tiny_vision import write_tiny_clip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-preempt")
    return {"crops": write_crops(root / "crops", n_images=24),
            "base": write_tiny_clip(root / "base-clip", corpus=[f"a photo of a {n}" for n, _ in SHAPES.values()], seed=0)}


def args(setup, out, *extra) -> list[str]:
    return ["train-clip", "--data", str(setup["crops"]), "--model", str(setup["base"]), "--output", str(out),
            "--batch-size", "8", "--grad-accum", "2", "--max-steps", "4", "--warmup-steps", "1", "--lr", "5e-3",
            "--num-workers", "0", "--eval-fraction", "0", "--checkpoint-every", "0", *extra]


def test_sigterm_stops_train_clip_after_the_step_and_resumes_exactly(setup, tmp_path, monkeypatch, capsys):
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert main(args(setup, straight)) == 0
    real, calls = clip_loss.distributed_info_nce, [0]

    def loss(*a, **kw):
        calls[0] += 1
        if calls[0] == 3:  # the first micro-step of optimizer step 2 (grad-accum 2)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(clip_loss, "distributed_info_nce", loss)
    capsys.readouterr()
    assert main(args(setup, out)) == 143
    assert calls[0] == 4  # step 2 was finished: both its micro-steps ran
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"stopped by SIGTERM at step 2: checkpoint saved at {out / 'checkpoints' / 'step-000002'}")
    assert err.endswith("--resume latest") and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    monkeypatch.undo()
    assert main(args(setup, out, "--resume", "latest")) == 0
    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs"
