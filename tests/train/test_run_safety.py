"""train-unet never trains silently wrong and never loses a finished run: non-finite numbers, a folder that
holds a run, a resume with other settings, --layers the UNet does not have, Ctrl-C, and the defaults."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tcompose.cli import main
from tcompose.io.errors import UserError
from tcompose.io.runs import NonFiniteLossError
from tcompose.masks.config import MasksConfig
from tcompose.masks.stage import run as make_masks
from tcompose.train.config import TrainUnetConfig
from tcompose.train.loop import run as train

from helpers import make_training_setup, tiny_train_config

RES = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    setup = make_training_setup(tmp_path_factory.mktemp("safety"), n_images=16, seed=3)
    make_masks(MasksConfig(coco_dir=setup["scenes"], output=setup["root"] / "masks-first", split="train2017"),
               progress=False)
    return setup | {"masks_first": setup["root"] / "masks-first"}


def small(setup, output, **kw) -> TrainUnetConfig:
    # no held-out score; the grounding-score settings stay train-unet's defaults, as the CLI runs here have them
    return tiny_train_config(setup, output, **({"checkpoint_every": 2, "eval_fraction": 0.0,
                                                "eval_max_examples": TrainUnetConfig.eval_max_examples,
                                                "eval_timesteps": TrainUnetConfig.eval_timesteps} | kw))


def cli_args(setup, output, *extra) -> list[str]:
    return ["train-unet", "--data", str(setup["masks"]), "--model", str(setup["base"]), "--output", str(output),
            "--resolution", str(RES), "--batch-size", "2", "--grad-accum", "1", "--max-steps", "2", "--num-workers", "0",
            "--eval-fraction", "0", *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------ non-finite numbers


@pytest.mark.parametrize("flag,value", [("--lambda", "nan"), ("--gamma", "inf"), ("--lr", "nan"), ("--lr", "-inf"),
                                        ("--max-grad-norm", "nan")])
def test_non_finite_options_are_refused_before_anything_loads(setup, tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    assert main(cli_args(setup, out, flag, value)) == 2
    assert f"{flag} {value}: not a finite number" in one_error_line(capsys)
    assert not out.exists()


def test_non_finite_config_is_refused_in_the_library_too(setup, tmp_path):
    with pytest.raises(ValueError, match="--lambda nan: not a finite number"):
        small(setup, tmp_path / "run", lambda_token=float("nan")).validate()


def _nan_from(monkeypatch, call: int, term: str = "token"):
    """The objective returns a NaN ``term`` from its ``call``-th micro-step on (a diverging run, on cue)."""
    import tcompose.grounding.objective as objective

    real, calls = objective.tokencompose_losses, [0]

    def losses(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] >= call:
            out = dict(out, **{term: out[term] * float("nan")})
        return out

    monkeypatch.setattr(objective, "tokencompose_losses", losses)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    _nan_from(monkeypatch, call=3)  # step 3 (batch 2, grad-accum 1: one call per step)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"step 3 \(token is NaN or inf\).*step-000002"):
        train(small(setup, out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    weights = load_file(out / "checkpoints" / "step-000002" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()
    assert not (out / "training_summary.json").exists()


def test_a_non_finite_loss_is_caught_before_a_checkpoint_even_between_log_steps(setup, tmp_path, monkeypatch):
    _nan_from(monkeypatch, call=3, term="ldm")
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"step 3 \(ldm"):
        train(small(setup, out, checkpoint_every=4, max_steps=6, log_every=100))
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


# ------------------------------------------------------------------------------------- a folder with a run


def test_a_folder_holding_a_run_is_refused_without_resume_and_cleared_with_overwrite(setup, tmp_path, capsys):
    out = tmp_path / "run"
    train(small(setup, out, max_steps=4, checkpoint_every=2))
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"step-000002", "step-000004"}
    before = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main(cli_args(setup, out)) == 2
    err = one_error_line(capsys)
    assert "already holds a train-unet run" in err and "--resume latest" in err and "--overwrite" in err
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before  # untouched
    assert main(cli_args(setup, out, "--overwrite", "--checkpoint-every", "1")) == 0
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"step-000001", "step-000002"}  # the old ones are gone
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 2
    assert main(cli_args(setup, out, "--overwrite", "--resume", "latest")) == 2
    assert "exclude each other" in one_error_line(capsys)


# -------------------------------------------------------------------------------- a resume with other settings


@pytest.mark.parametrize("change,expect", [
    (dict(lr=2e-3), "--lr 0.001 -> 0.002"),
    (dict(lambda_token=0.5), "--lambda 1.0 -> 0.5"),
    (dict(gamma_pixel=0.2), "--gamma 0.1 -> 0.2"),
    (dict(resolution=48), "--resolution 32 -> 48"),
    (dict(layers=("up",)), "--layers mid,up -> up"),
    (dict(mixed_precision="bf16"), "--mixed-precision no -> bf16"),
    (dict(batch_size=1), "--batch-size x processes 2 -> 1"),
    (dict(seed=1), "--seed 0 -> 1"),
    (dict(data="masks_first"), "--data "),
])
def test_a_resume_with_other_settings_is_refused_listing_them(setup, tmp_path, change, expect):
    out = tmp_path / "run"
    train(small(setup, out, max_steps=2))
    if change.get("data") == "masks_first":
        change = dict(data=setup["masks_first"])
    with pytest.raises(ValueError, match="would not continue the same run") as err:
        train(small(setup, out, max_steps=3, resume="latest", **change))
    assert expect in str(err.value)


def test_a_resume_may_change_what_does_not_change_the_result(setup, tmp_path):
    out = tmp_path / "run"
    train(small(setup, out, max_steps=2))
    summary = train(small(setup, out, max_steps=3, resume="latest", log_every=3, checkpoint_every=0, progress=True))
    assert summary["steps"] == 3 and summary["steps_this_run"] == 1  # a flat schedule may run longer


def test_a_resume_may_not_lengthen_a_decaying_schedule(setup, tmp_path):
    out = tmp_path / "run"
    train(small(setup, out, max_steps=2, lr_scheduler="cosine"))
    with pytest.raises(ValueError, match="--max-steps 2 -> 3"):
        train(small(setup, out, max_steps=3, lr_scheduler="cosine", resume="latest"))


def test_the_summary_of_a_resumed_run_keeps_the_first_runs_before_score(setup, tmp_path):
    out = tmp_path / "run"
    first = train(small(setup, out, max_steps=2, eval_fraction=0.2, eval_max_examples=2, eval_timesteps=(500,)))
    resumed = train(small(setup, out, max_steps=3, eval_fraction=0.2, eval_max_examples=2, eval_timesteps=(500,),
                          resume="latest"))
    assert resumed["grounding_before"] == first["grounding_before"]
    with pytest.raises(ValueError, match="--eval-timesteps 500 -> 700"):
        train(small(setup, out, max_steps=4, eval_fraction=0.2, eval_max_examples=2, eval_timesteps=(700,),
                    resume="latest"))


# ----------------------------------------------------------------------------------------------- --layers


def test_layers_the_unet_does_not_have_are_an_error_listing_its_groups(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli_args(setup, out, "--layers", "up_8,up_64")) == 2
    err = one_error_line(capsys)
    assert "--layers up_64: this UNet has no such cross-attention group at 16x16 latents (32 px)" in err
    assert "mid_8 (1 map), up_8 (2 maps), up_16 (2 maps)" in err
    assert not out.exists()  # checked before anything was written


def test_the_supervised_groups_are_logged_and_recorded(setup, tmp_path, capsys):
    summary = train(small(setup, tmp_path / "run", max_steps=1, checkpoint_every=0, layers=("mid", "up_16")))
    assert summary["supervised_groups"] == {"mid_8": 1, "up_16": 2}
    assert "supervised cross-attention: mid_8 (1 map), up_16 (2 maps)" in capsys.readouterr().out
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000001" / "state.json").read_text())
    assert state["extra"]["supervised_groups"] == {"mid_8": 1, "up_16": 2}


# ------------------------------------------------------------------------------------------------ defaults


def test_resolution_defaults_to_the_models_own(setup, tmp_path, capsys):
    """The tiny UNet's sample size 32 x the VAE's factor 2: 64 px, said in the log; an explicit value wins."""
    summary = train(small(setup, tmp_path / "run", resolution=None, max_steps=1, checkpoint_every=0))
    assert summary["resolution"] == 64
    assert "resolution: 64 px (the model's own: sample size 32 x 2)" in capsys.readouterr().out


def test_checkpoints_are_limited_by_default(setup, tmp_path):
    assert TrainUnetConfig(data=setup["masks"], output=tmp_path).checkpoints_limit == 3
    train(small(setup, tmp_path / "run", max_steps=5, checkpoint_every=1, checkpoints_limit=3))
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())] == [
        "step-000003", "step-000004", "step-000005"]


def test_checkpoint_and_pipeline_files_follow_the_umask(setup, tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        train(small(setup, out, max_steps=2, checkpoint_every=1))
    finally:
        os.umask(old)
    for f in [*(out / "checkpoints").rglob("*.safetensors"), *(out / "unet").glob("*.safetensors")]:
        assert f.stat().st_mode & 0o777 == 0o644, f


# ------------------------------------------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_saves_the_step_and_says_how_to_resume(setup, tmp_path, signum, code):
    """A real process, a real signal: the step is finished and checkpointed (tests/train/test_preemption.py
    has the exact resume, with one process and two)."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "tcompose", *cli_args(setup, out)[:-6], "--max-steps", "400", "--checkpoint-every",
            "1", "--num-workers", "0", "--eval-fraction", "0", "--log-every", "1"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-000002" / "state.json").exists():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-2000:]
    lines = [line for line in err.strip().splitlines() if "stopped" in line or "resume with" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    m = re.match(rf"stopped by {signum.name} at step (\d+): checkpoint saved at (\S+step-(\d+));", lines[0])
    assert m and int(m[1]) == int(m[3]) >= 2 and (Path(m[2]) / "state.json").is_file(), lines[0]
    assert lines[0].rstrip().endswith("--resume latest") and "tcompose train-unet --data" in lines[0]


# ------------------------------------------------------------------------------------- a rerun of a finished run


def _snapshot(folder) -> dict:
    """Every file under ``folder`` (but checkpoints/ and logs/): its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] not in ("checkpoints", "logs")}


def test_a_rerun_of_a_finished_run_with_resume_latest_is_a_no_op_that_says_so(setup, tmp_path, capsys):
    out = tmp_path / "run"
    first = train(small(setup, out, max_steps=2, lora_rank=2, fuse=True))
    assert (out / "fused").is_dir() and (out / "README.md").is_file()
    before = _snapshot(out)
    capsys.readouterr()
    again = train(small(setup, out, max_steps=2, lora_rank=2, fuse=True, resume="latest"))
    assert again == json.loads((out / "training_summary.json").read_text()) and again["steps"] == first["steps"] == 2
    assert _snapshot(out) == before  # the summary, the model card and fused/ stay as they were
    err = capsys.readouterr().err
    assert "already finished" in err and "nothing to do" in err and "--max-steps" in err


def test_a_rerun_with_max_steps_below_the_checkpoints_step_is_refused(setup, tmp_path, capsys):
    out = tmp_path / "run"
    train(small(setup, out, max_steps=3, checkpoint_every=0))
    before = _snapshot(out)
    with pytest.raises(UserError) as refused:  # a flat schedule: --max-steps may differ, but not fall below
        train(small(setup, out, max_steps=2, checkpoint_every=0, resume="latest"))
    err = str(refused.value)
    assert "--max-steps 2" in err and "step 3" in err and "--max-steps 3" in err and "--output" in err
    assert _snapshot(out) == before
