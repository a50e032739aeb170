"""Errors as the user meets them: refused input is one red line and exit code 2; a bug or a system error shows
its traceback, says so, and exits with 1 (tcompose.io.errors, tcompose.cli._app._friendly)."""

from __future__ import annotations

import errno

import pytest
from typer.testing import CliRunner

from tcompose.cli import app
from tcompose.io.errors import MissingPathError, NotAFolderError, PathExistsError, UnavailableError, UserError


def _invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def _stderr(result) -> str:
    return result.stderr if result.stderr_bytes is not None else result.output


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _table_raises(monkeypatch, err: BaseException) -> None:
    """``tcompose table`` whose stage raises ``err`` (the command imports ``run`` when it runs)."""
    import tcompose.evaluate.table as table

    def run(*_args, **_kwargs):
        raise err

    monkeypatch.setattr(table, "run", run)


def test_refused_input_is_one_line_and_exit_2():
    result = _invoke("table")  # no run folder: the stage refuses (a UserError)
    assert result.exit_code == 2, result.output
    err = _stderr(result)
    assert _lines(err) == ["error: pass at least one run folder: --multigen-coco, --multigen-ade20k, --visor, --fid, "
                           "--latency or --geneval"], err
    assert "Traceback" not in result.output


def test_a_non_finite_float_option_is_refused_input(tmp_path):
    result = _invoke("train-clip", "--data", str(tmp_path), "--output", str(tmp_path / "out"), "--lr", "nan")
    assert result.exit_code == 2, result.output
    assert _lines(_stderr(result)) == ["error: --lr nan: not a finite number"]


def test_a_user_error_raised_by_a_stage_is_one_line(monkeypatch):
    _table_raises(monkeypatch, UserError("--visor runs/x: that run used 3 prompts; pass the whole set"))
    result = _invoke("table")
    assert result.exit_code == 2
    assert _lines(_stderr(result)) == ["error: --visor runs/x: that run used 3 prompts; pass the whole set"]


def test_brackets_in_a_message_are_printed_as_written(monkeypatch):
    _table_raises(monkeypatch, UserError("bbox [x, y, w, h] must be finite; [bold]not markup[/bold]"))
    result = _invoke("table")
    assert _lines(_stderr(result)) == ["error: bbox [x, y, w, h] must be finite; [bold]not markup[/bold]"]


def test_a_plain_value_error_is_a_bug_with_its_traceback(monkeypatch):
    _table_raises(monkeypatch, ValueError("group up_16: 255 positions is not 16x16"))
    result = _invoke("table")
    assert result.exit_code == 1
    err = _stderr(result)
    assert "Traceback (most recent call last)" in err and "ValueError: group up_16" in err
    last = _lines(err)[-1]
    assert "looks like a bug in tcompose" in last and "report it" in last and "traceback" in last, last
    assert not any(line.startswith("error:") for line in _lines(err))


def test_a_runtime_error_is_a_bug_too(monkeypatch):
    _table_raises(monkeypatch, RuntimeError("CUDA error: an illegal memory access was encountered"))
    result = _invoke("table")
    assert result.exit_code == 1
    assert "Traceback" in _stderr(result) and "looks like a bug in tcompose" in _lines(_stderr(result))[-1]


def test_a_full_disk_on_a_file_the_user_did_not_name_is_a_system_error(monkeypatch, tmp_path):
    cache = tmp_path / "cache" / "shard-00001.parquet"
    _table_raises(monkeypatch, OSError(errno.ENOSPC, "No space left on device", str(cache)))
    result = _invoke("table", "--visor", str(tmp_path / "visor"), "--output", str(tmp_path / "table.md"))
    assert result.exit_code == 1
    err = _stderr(result)
    assert "Traceback" in err and "No space left on device" in err
    last = _lines(err)[-1]
    assert last.startswith("system error:") and "not your input" in last, last


def test_an_os_error_on_the_path_the_user_named_is_one_line(monkeypatch, tmp_path):
    out = tmp_path / "table.md"
    _table_raises(monkeypatch, PermissionError(errno.EACCES, "Permission denied", str(out)))
    result = _invoke("table", "--output", str(out))
    assert result.exit_code == 2
    assert _lines(_stderr(result)) == [f"error: {out}: Permission denied; pass a path you may read and write, or "
                                       "change its permissions"]  # the path and the fix, no raw [Errno 13]


def test_a_full_disk_is_the_systems_even_on_the_path_the_user_named(monkeypatch, tmp_path):
    out = tmp_path / "table.md"
    _table_raises(monkeypatch, OSError(errno.ENOSPC, "No space left on device", str(out)))
    result = _invoke("table", "--output", str(out))
    assert result.exit_code == 1
    err = _stderr(result)
    assert "Traceback" in err and _lines(err)[-1].startswith("system error:")


def test_a_missing_file_inside_a_folder_the_user_gave_is_one_line(monkeypatch, tmp_path):
    visor = tmp_path / "visor"
    _table_raises(monkeypatch, FileNotFoundError(errno.ENOENT, "No such file or directory", str(visor / "run.json")))
    result = _invoke("table", "--visor", str(visor))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert _lines(_stderr(result)) == [f"error: {visor / 'run.json'}: No such file or directory; check the path (or "
                                       "create what it names)"]


def test_a_missing_file_the_user_never_named_is_not_their_mistake(monkeypatch, tmp_path):
    _table_raises(monkeypatch, FileNotFoundError(errno.ENOENT, "No such file or directory", "/opt/tcompose/x.json"))
    result = _invoke("table", "--visor", str(tmp_path / "visor"))
    assert result.exit_code == 1 and "Traceback" in _stderr(result)


def test_a_relative_path_matches_the_same_path_resolved(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _table_raises(monkeypatch, PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out" / "table.md")))
    result = _invoke("table", "--output", "out/table.md")
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_the_working_directory_is_not_a_folder_the_user_chose(monkeypatch, tmp_path):
    """``--visor .`` names the working directory, not everything under it."""
    monkeypatch.chdir(tmp_path)
    _table_raises(monkeypatch, FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "x" / "y")))
    result = _invoke("table", "--visor", ".")
    assert result.exit_code == 1


def test_tcompose_debug_raises_everything(monkeypatch):
    _table_raises(monkeypatch, UserError("refused"))
    result = _invoke("table", env={"TCOMPOSE_DEBUG": "1"})
    assert isinstance(result.exception, UserError)
    _table_raises(monkeypatch, ValueError("a bug"))
    result = _invoke("table", env={"TCOMPOSE_DEBUG": "1"})
    assert type(result.exception) is ValueError


def test_ctrl_c_still_exits_130(monkeypatch):
    _table_raises(monkeypatch, KeyboardInterrupt())
    result = _invoke("table")
    assert result.exit_code == 130 and "Traceback" not in result.output


def test_the_kinds_keep_the_bases_callers_catch():
    assert issubclass(UserError, ValueError)
    for kind, base in ((MissingPathError, FileNotFoundError), (NotAFolderError, NotADirectoryError),
                       (PathExistsError, FileExistsError), (UnavailableError, OSError)):
        err = kind("x: not there")
        assert isinstance(err, UserError) and isinstance(err, base) and str(err) == "x: not there"


def test_the_user_facing_error_classes_are_user_errors():
    from tcompose.data.coco import CocoError, ImageReadError
    from tcompose.download import DownloadError
    from tcompose.evaluate.multigen.prompts import PromptSetError
    from tcompose.io.datasets import DatasetError
    from tcompose.io.runs import NonFiniteLossError
    from tcompose.models import ModelFolderError, TextEncoderMismatchError

    for cls in (CocoError, ImageReadError, DownloadError, PromptSetError, DatasetError, NonFiniteLossError,
                ModelFolderError, TextEncoderMismatchError):
        assert issubclass(cls, UserError), cls


def test_a_hub_error_without_errno_becomes_the_users_with_its_hint():
    from tcompose.models.loading import hub_hint

    with pytest.raises(UnavailableError) as err:
        with hub_hint("org/no-such-model", True):
            raise OSError("org/no-such-model is not a local folder and is not a valid model identifier")
    assert isinstance(err.value, OSError) and "tcompose download org/no-such-model" in str(err.value)
    assert any("HF_HUB_OFFLINE" in note for note in err.value.__notes__)
    with pytest.raises(OSError) as err:  # a disk error while loading stays the system's
        with hub_hint("org/model", True):
            raise OSError(errno.ENOSPC, "No space left on device", "/cache/x")
    assert not isinstance(err.value, UserError)


@pytest.mark.parametrize("args, flag", [
    (["train-unet", "--data", "d", "--output", "o", "--eval-timesteps", "100,x"], "--eval-timesteps"),
    (["bench", "--batch-sizes", "1,two"], "--batch-sizes"),
])
def test_a_bad_integer_list_is_refused_input(args, flag):
    result = _invoke(*args)
    assert result.exit_code == 2, result.output
    assert _lines(_stderr(result))[0].startswith(f"error: {flag} takes comma-separated integers")


def test_an_incomplete_model_folder_is_one_line(tmp_path):
    """A pipeline folder whose UNet weights are missing (or only .bin): the loaders' OSError names no file the
    user typed, yet the folder is the user's: one line naming it, exit 2."""
    from tcompose.testing.tiny_sd import write_tiny_pipeline

    model = write_tiny_pipeline(tmp_path / "sd", corpus=["a red ball"])
    for weights in (model / "unet").glob("*.safetensors"):
        weights.unlink()
    result = _invoke("generate", "--model", str(model), "--prompt", "a red ball", "--output", str(tmp_path / "g"),
                     "--steps", "1")
    assert result.exit_code == 2, result.output
    lines = _lines(_stderr(result))
    assert len(lines) == 1 and lines[0].startswith(f"error: {model}: cannot load the model from it"), lines
    assert not (tmp_path / "g" / "generations.parquet").exists()


def test_a_value_error_of_tcompose_inside_a_loader_block_stays_a_bug(monkeypatch):
    """Only the loaders' own errors become the user's: a ValueError raised by tcompose's code inside the hub
    context is still a bug."""
    from tcompose.models.loading import raised_by_loader

    try:
        raise ValueError("an invariant broke")
    except ValueError as err:
        assert not raised_by_loader(err)
