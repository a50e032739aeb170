"""TF32 is one setting: train-unet, train-clip and bench share --tf32/--no-tf32 (same default, same help), the
configs agree with it, and set_tf32 is what every command calls (tcompose.models.precision)."""

from __future__ import annotations

import dataclasses

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from tcompose.cli import app
from tcompose.models.precision import TF32_DEFAULT, TF32_HELP, set_tf32

COMMANDS = ("train-unet", "train-clip", "bench")


def _tf32_param(command: str):
    params = [p for p in get_command(app).commands[command].params if "--tf32" in p.opts]
    assert len(params) == 1, f"{command}: no single --tf32 option"
    return params[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_the_same_option(command):
    param = _tf32_param(command)
    assert param.opts == ["--tf32"] and param.secondary_opts == ["--no-tf32"]
    assert param.default is TF32_DEFAULT is True
    assert param.help == TF32_HELP and "default on" in param.help


def test_the_configs_default_to_the_same_setting():
    from tcompose.bench.run import BenchConfig
    from tcompose.clip.config import TrainClipConfig
    from tcompose.train.config import TrainUnetConfig

    def default(cls, name):
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)

    assert default(TrainUnetConfig, "allow_tf32") is default(TrainClipConfig, "allow_tf32") is TF32_DEFAULT
    assert BenchConfig().tf32 is TF32_DEFAULT


@pytest.mark.parametrize("flag, want", [([], True), (["--no-tf32"], False), (["--tf32"], True)])
def test_the_option_reaches_each_config(monkeypatch, tmp_path, flag, want):
    import importlib

    report, bench, clip_loop, train_loop = (importlib.import_module(f"tcompose.{m}") for m in (
        "bench.report", "bench.run", "clip.loop", "train.loop"))  # bench's package exports a function `run`

    seen = {}
    monkeypatch.setattr(train_loop, "run", lambda cfg: seen.__setitem__("train-unet", cfg.allow_tf32))
    monkeypatch.setattr(clip_loop, "run", lambda cfg: seen.__setitem__("train-clip", cfg.allow_tf32))
    monkeypatch.setattr(bench, "run", lambda cfg: seen.__setitem__("bench", cfg.tf32) or {"errors": []})
    monkeypatch.setattr(report, "print_report", lambda _report: None)
    runner = CliRunner()
    for command in COMMANDS:
        args = [] if command == "bench" else ["--data", str(tmp_path), "--output", str(tmp_path / "out")]
        result = runner.invoke(app, [command, *args, *flag])
        assert result.exit_code == 0, result.output
    assert seen == {c: want for c in COMMANDS}


def test_set_tf32_sets_both_flags_on_cuda_only():
    import torch

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        assert set_tf32(not before[0], "cpu") is None
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
        assert set_tf32(True, torch.device("cuda")) == before  # flags only: no GPU needed to set them
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert set_tf32(False, "cuda:0") == (True, True)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
