"""Refusals come before the work and leave nothing behind: an output path that cannot be written (a file where a
folder goes, a folder no file can be made in) and inputs checked up front (a batch larger than the data, a panel
of 0, a demo with 0 steps or too few images) are refused in one line naming the option the user typed, before any
model loads or any image is generated; a refused or diverged train-unet leaves no logs/ that blocks the corrected
command, and the divergence advice (a lower --lr, another --max-grad-norm, --resume latest) works."""

from __future__ import annotations

import json

import pytest

import tcompose.evaluate.generate  # noqa: F401  (bound to the real load_pipeline before any test patches it)
import tcompose.evaluate.sampling as sampling
import tcompose.models.families as families
from tcompose.cli import main

UNWRITABLE = "/proc/tcompose-test"  # a folder no file can be made in, even for root


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: a refusal must come before it."""
    import tcompose.evaluate.generate as generate  # imported first: it binds sampling's load_pipeline at import

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(sampling, "load_pipeline", refuse)
    monkeypatch.setattr(families, "load_components", refuse)
    monkeypatch.setattr(generate, "load_pipeline", refuse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tcompose.testing.tiny_sd import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("refuse") / "sd", corpus=["a photo of a cat and a dog"], seed=0)


# ------------------------------------------------------------------------------------------------ the helpers


def test_output_checks_create_nothing_and_name_the_option(tmp_path):
    from tcompose.io.files import check_output_file, check_output_folder

    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"^--out-dir .*f\.txt is a file"):
        check_output_folder(tmp_path / "f.txt", "--out-dir")
    with pytest.raises(NotADirectoryError, match=r"f\.txt is a file"):
        check_output_folder(tmp_path / "f.txt" / "sub", "--output")
    with pytest.raises(ValueError, match=r"^--output /proc/.*cannot create"):
        check_output_folder(UNWRITABLE + "/run")
    with pytest.raises(ValueError, match=r"^--output .* is a folder"):
        check_output_file(tmp_path)
    with pytest.raises(ValueError, match=r"^--output /proc/.*cannot write"):
        check_output_file(UNWRITABLE + ".png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "images").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"images is a file where the output folder images/ goes"):
        check_output_folder(tmp_path / "out", inside=("images",))
    assert check_output_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    check_output_file(tmp_path / "c" / "fig.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "out"]  # nothing made, no probe left
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["images"]


# ----------------------------------------------------------------------------------------------------- latency


def test_latency_refuses_a_file_as_output_before_timing_any_model(tiny, tmp_path, capsys, no_loading):
    existing = tmp_path / "existing.txt"
    existing.write_text("keep")
    assert main(["latency", "--model", f"A={tiny}", "--images", "1", "--steps", "2", "-o", str(existing)]) == 2
    err = one_line(capsys)
    assert "--output" in err and str(existing) in err and "is a file" in err and "Errno" not in err
    assert existing.read_text() == "keep"


def test_latency_refuses_a_latency_json_that_is_not_one_before_timing(tiny, tmp_path, capsys, no_loading):
    out = tmp_path / "lat"
    out.mkdir()
    (out / "latency.json").write_text("{not json")
    assert main(["latency", "--model", f"A={tiny}", "--images", "1", "--steps", "2", "-o", str(out)]) == 2
    err = one_line(capsys)
    assert "--output" in err and "latency.json" in err and "not a latency.json" in err
    assert (out / "latency.json").read_text() == "{not json"


# ---------------------------------------------------------------------------------------------------- generate


def test_generate_refuses_a_file_as_output_before_the_model_loads(tiny, tmp_path, capsys, no_loading):
    existing = tmp_path / "existing.txt"
    existing.write_text("keep")
    assert main(["generate", "--model", str(tiny), "--prompt", "a cat", "--steps", "2", "-o", str(existing)]) == 2
    err = one_line(capsys)
    assert err.startswith(f"error: --output {existing} is a file") and "Errno" not in err
    assert existing.read_text() == "keep"


def test_generate_refuses_an_output_no_file_can_be_made_in(tiny, tmp_path, capsys, no_loading):
    assert main(["generate", "--model", str(tiny), "--prompt", "a cat", "--steps", "2", "-o", UNWRITABLE]) == 2
    err = one_line(capsys)
    assert "--output /proc" in err and "cannot create" in err


# ----------------------------------------------------------------------------------------------------- attnviz


def test_attnviz_refuses_panel_0_before_generating(tiny, tmp_path, capsys, no_loading):
    fig = tmp_path / "new" / "fig.png"
    assert main(["attnviz", "--prompt", "a cat", "--model", f"A={tiny}", "--steps", "2", "--panel", "0",
                 "--output", str(fig)]) == 2
    assert "--panel 0" in one_line(capsys)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_attnviz_refuses_an_unwritable_output_before_generating(tiny, tmp_path, capsys, no_loading, where):
    (tmp_path / "f.txt").write_text("x")
    fig = UNWRITABLE + ".png" if where == "proc" else str(tmp_path / "f.txt" / "fig.png")
    assert main(["attnviz", "--prompt", "a cat", "--model", f"A={tiny}", "--steps", "2", "--output", fig]) == 2
    err = one_line(capsys)
    assert f"--output {fig}" in err and "Errno" not in err


# -------------------------------------------------------------------------------------------------------- demo


@pytest.mark.parametrize("args,flag,never", [
    (["--steps", "0"], "--steps 0", "--max-steps"),
    (["--images", "2"], "--images 2", "--batch-size"),
    (["--images", "0"], "--images 0", "lists no images"),
])
def test_demo_refuses_its_own_options_before_writing_anything(tmp_path, capsys, args, flag, never):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), *args]) == 2
    err = one_line(capsys)
    assert flag in err and never not in err
    assert not out.exists()


def test_demo_refuses_a_file_as_output(tmp_path, capsys):
    existing = tmp_path / "existing.txt"
    existing.write_text("keep")
    assert main(["demo", "-o", str(existing)]) == 2
    err = one_line(capsys)
    assert f"--output {existing} is a file" in err and "Errno" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.txt"]


# -------------------------------------------------------------------------------------------------- train-unet


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from helpers import make_training_setup

    return make_training_setup(tmp_path_factory.mktemp("refuse-train"), n_images=8, seed=3)


def _train_args(setup, out, *extra, lr: str = "1e-3") -> list[str]:
    return ["train-unet", "--data", str(setup["masks"]), "--model", str(setup["base"]), "--output", str(out),
            "--resolution", "32", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "2", "--num-workers", "0",
            "--eval-fraction", "0", "--lr", lr, *extra]


def test_train_unet_refuses_a_batch_larger_than_the_data_before_loading_and_leaves_nothing(setup, tmp_path, capsys,
                                                                                         monkeypatch):
    out = tmp_path / "run"

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(families, "load_components", refuse)
    args = _train_args(setup, out, "--batch-size", "500")
    assert main(args) == 2
    err = one_line(capsys)
    assert "--batch-size 500" in err and "training examples" in err
    assert not out.exists()  # no logs/ that would block the corrected command


def test_a_folder_holding_only_logs_does_not_block_the_corrected_command(setup, tmp_path):
    from tcompose.train.loop import run as train
    from helpers import tiny_train_config

    out = tmp_path / "run"
    (out / "logs" / "train_unet").mkdir(parents=True)
    (out / "logs" / "train_unet" / "events.out.tfevents.1").write_bytes(b"old")
    summary = train(tiny_train_config(setup, out, max_steps=1, eval_fraction=0.0))
    assert summary["steps"] == 1
    assert not (out / "logs" / "train_unet" / "events.out.tfevents.1").exists()  # the stale logs were cleared


def _nan_from(monkeypatch, call: int):
    import tcompose.grounding.objective as objective

    real, calls = objective.tokencompose_losses, [0]

    def losses(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] >= call:
            out = dict(out, token=out["token"] * float("nan"))
        return out

    monkeypatch.setattr(objective, "tokencompose_losses", losses)
    return lambda: monkeypatch.setattr(objective, "tokencompose_losses", real)


def test_the_divergence_advice_works_a_lower_lr_resumes_and_is_recorded(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    heal = _nan_from(monkeypatch, call=3)
    assert main(_train_args(setup, out, "--max-steps", "4", "--checkpoint-every", "2")) == 2
    err = one_line(capsys)
    assert "step-000002" in err and "lower --lr" in err and "--max-grad-norm" in err and "--resume latest" in err
    heal()
    # the advice: the same command with a lower --lr (and another --max-grad-norm) and --resume latest
    args = _train_args(setup, out, "--max-steps", "4", "--checkpoint-every", "2", "--resume", "latest",
                       "--max-grad-norm", "0.5", lr="5e-4")
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    said = capsys.readouterr()
    assert "resumed from" in said.out + said.err and "--lr 0.001 -> 0.0005" in said.out + said.err
    state = json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["extra"]["settings"]["--lr"] == 5e-4 and state["extra"]["settings"]["--max-grad-norm"] == 0.5
    assert state["lr_scheduler"]["base_lrs"] == [pytest.approx(5e-4)]  # the optimizer trained at the new rate
    assert all(g["lr"] == pytest.approx(5e-4) for g in state["param_groups"])


def test_a_resume_may_not_raise_the_lr(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(setup, out, "--checkpoint-every", "2")) == 0
    capsys.readouterr()
    assert main(_train_args(setup, out, "--checkpoint-every", "2", "--max-steps", "3", "--resume", "latest",
                            lr="2e-3")) == 2
    assert "--lr 0.001 -> 0.002" in one_line(capsys)


def test_a_divergence_without_a_checkpoint_leaves_nothing_that_blocks_the_rerun(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    heal = _nan_from(monkeypatch, call=1)
    assert main(_train_args(setup, out)) == 2
    err = one_line(capsys)
    assert "no checkpoint was written" in err and "run the command again" in err and "lower --lr" in err
    heal()
    assert main(_train_args(setup, out, lr="5e-4")) == 0, capsys.readouterr().err[-2000:]


def test_train_unet_refuses_an_output_no_file_can_be_made_in_before_loading(setup, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(families, "load_components", refuse)
    assert main(_train_args(setup, UNWRITABLE + "/run")) == 2
    err = one_line(capsys)
    assert "--output /proc/" in err and "cannot create" in err
