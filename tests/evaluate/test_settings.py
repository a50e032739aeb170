"""GenerationSettings: one set of generation settings for every generating stage, its checks, and the one set of
command-line options every generating command takes from it."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest

from tcompose.evaluate.settings import STAGE_DEFAULTS, GenerationSettings

GENERATING = ["generate", "multigen", "visor", "fid", "latency", "attnviz"]
# every generating command has these options, with these defaults ...
OPTIONS = {"--seed": 0, "--steps": None, "--guidance": None, "--scheduler": None, "--dtype": "auto", "--batch-size": 4,
           "--height": None, "--width": None, "--safety-checker": "off"}
# ... but the ones its stage does not read (latency times batch 1 without the checker; attnviz draws one image)
NOT_TAKEN = {"latency": {"--batch-size", "--safety-checker"}, "attnviz": {"--batch-size", "--safety-checker"}}
# the least each command needs to reach its stage
REQUIRED = {"generate": ["--model", "m", "--prompt", "a cat", "-o", "out"],
            "multigen": ["--model", "A=m", "-o", "out"],
            "visor": ["--model", "A=m", "-o", "out"], "fid": ["--model", "A=m", "-o", "out", "--coco", "coco"],
            "latency": ["--model", "A=m", "-o", "out"], "attnviz": ["--prompt", "a cat", "--model", "A=m", "-o", "f.png"]}
# the module holding the `run` each command calls
STAGE_MODULES = {"generate": "tcompose.evaluate.generate", "multigen": "tcompose.evaluate.multigen.stage",
                 "visor": "tcompose.evaluate.visor.stage", "fid": "tcompose.evaluate.fid.stage",
                 "latency": "tcompose.evaluate.latency", "attnviz": "tcompose.evaluate.attnviz"}


# ------------------------------------------------------------------------------------------------ the values


def test_defaults_are_the_papers_and_a_stage_keeps_its_own():
    s = GenerationSettings()
    assert (s.steps, s.guidance, s.scheduler, s.dtype, s.batch_size, s.height, s.width, s.safety_checker, s.seed,
            s.device) == (None, None, None, "auto", 4, None, None, False, 0, None)  # steps, guidance: the model's
    assert s.resolved((50, 7.5)) == s.replace(steps=50, guidance=7.5)  # SD1.4's card: the paper's 50 and 7.5
    assert s.replace(steps=3, guidance=0.0).resolved((28, 7.0)) == s.replace(steps=3, guidance=0.0)
    assert GenerationSettings.for_stage("latency") == s.replace(batch_size=1) and STAGE_DEFAULTS == {
        "latency": {"batch_size": 1}}  # (geneval's guidance 9 is per model family: GenevalConfig.settings_for)
    assert all(GenerationSettings.for_stage(st) == s for st in GENERATING if st != "latency")
    assert GenerationSettings.for_stage("latency", steps=3) == s.replace(batch_size=1, steps=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 3  # a value: shared safely between configs
    assert GenerationSettings.taken_by("generate") == tuple(f.name for f in dataclasses.fields(GenerationSettings))
    assert set(GenerationSettings.taken_by("attnviz")) == set(GenerationSettings.taken_by("generate")) - {
        "batch_size", "safety_checker"}


@pytest.mark.parametrize("changes, flag", [
    ({"steps": 0}, "--steps"), ({"batch_size": 0}, "--batch-size"), ({"height": 50}, "--height"),
    ({"width": 4}, "--width"), ({"height": 0}, "--height"), ({"dtype": "fp8"}, "--dtype"),
    ({"scheduler": "heun"}, "--scheduler 'heun'"), ({"guidance": math.nan}, "--guidance"),
    ({"guidance": math.inf}, "--guidance"),
])
def test_validate_refuses_a_bad_value_naming_its_option(changes, flag):
    with pytest.raises(ValueError) as err:
        GenerationSettings(**changes).validate()
    message = str(err.value)
    assert flag in message and len(message.splitlines()) == 1, message


def test_validate_takes_every_good_value():
    GenerationSettings().validate()
    for dtype in ("auto", "fp16", "bf16", "fp32"):
        GenerationSettings(dtype=dtype).validate()
    from tcompose.models.sampling import SCHEDULERS

    for name in SCHEDULERS:
        GenerationSettings(scheduler=name, height=64, width=48, steps=1, batch_size=1, guidance=1.0).validate()


def test_the_settings_module_needs_no_torch():
    """The CLI's --help reads it: importing and checking default settings loads no heavy library."""
    code = ("import sys; from tcompose.evaluate.settings import GenerationSettings; GenerationSettings().validate(); "
            "print(','.join(m for m in ('torch', 'numpy', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"tcompose.evaluate.settings loads {out}"


# ------------------------------------------------------------------------------------------------ the options


def _params(command: str) -> dict:
    from typer.main import get_command

    from tcompose.cli import app

    return {opt: p for p in get_command(app).commands[command].params for opt in p.opts if opt.startswith("--")}


@pytest.mark.parametrize("command", GENERATING)
def test_every_generating_command_has_the_same_generation_options(command):
    params = _params(command)
    expected = {flag: default for flag, default in OPTIONS.items() if flag not in NOT_TAKEN.get(command, set())}
    assert {f: params[f].default for f in expected if f in params} == expected, f"{command} lost an option"
    assert not (NOT_TAKEN.get(command, set()) & set(params))
    # help texts are shared, but for the seed (each command says what it seeds) and latency's --steps
    generate = _params("generate")
    for flag in set(expected) - {"--seed", "--steps"}:
        assert params[flag].help == generate[flag].help, flag


@pytest.mark.parametrize("command", GENERATING)
def test_the_options_become_the_stages_settings(command, monkeypatch, tmp_path):
    import importlib

    from tcompose.cli import main

    seen = []
    monkeypatch.setattr(importlib.import_module(STAGE_MODULES[command]), "run",
                        lambda cfg, *a, **kw: seen.append(cfg.settings))
    monkeypatch.chdir(tmp_path)
    assert main([command, *REQUIRED[command]]) == 0
    assert main([command, *REQUIRED[command], "--steps", "3", "--guidance", "2.5", "--scheduler", "ddim", "--dtype",
                 "fp32", "--height", "48", "--width", "64", "--seed", "7"]) == 0
    default, given = seen
    device = None if command == "attnviz" else default.device  # attnviz leaves the device to the pipeline
    assert default == GenerationSettings.for_stage(command, device=device)
    assert given == default.replace(steps=3, guidance=2.5, scheduler="ddim", dtype="fp32", height=48, width=64, seed=7)
    if command not in NOT_TAKEN:
        assert main([command, *REQUIRED[command], "--batch-size", "2", "--safety-checker", "on"]) == 0
        assert seen[-1] == default.replace(batch_size=2, safety_checker=True)


@pytest.mark.parametrize("command", GENERATING)
def test_bad_generation_options_are_one_line_naming_the_option(command, capsys, tmp_path, monkeypatch):
    from tcompose.cli import main

    monkeypatch.chdir(tmp_path)
    cases = [(["--guidance", "nan"], "--guidance nan")]
    if command not in NOT_TAKEN:
        cases.append((["--safety-checker", "maybe"], "--safety-checker 'maybe'"))
    for args, message in cases:
        capsys.readouterr()
        assert main([command, *REQUIRED[command], *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
