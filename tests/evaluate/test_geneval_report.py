"""GenEval's reports: the terminal table reads at 80 columns, a partial run's overall is marked (summary, Markdown,
``tcompose table``), and the detector note names the detector used."""

from __future__ import annotations

import json

from tcompose.evaluate.geneval import TASKS
from tcompose.evaluate.geneval.report import coverage, detector_note, markdown, print_table

FULL = {"kind": "geneval", "file": "evaluation_metadata.jsonl", "file_prompts": 553}


def _result(tasks=TASKS, value=0.5) -> dict:
    return {"overall": value, "tasks": {t: value for t in tasks}, "images": 4 * len(tasks), "missing": 0}


def test_terminal_table_reads_at_80_columns(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    results = {"SD14": _result(), "TokenCompose": _result(value=0.25)}
    print_table(results, "GenEval (transformers Mask2Former): 553 prompts x 4 images", 553, FULL)
    err = capsys.readouterr().err
    assert max(len(line) for line in err.splitlines()) <= 80
    assert "…" not in err  # no header or cell cut short
    for word in ("SD14", "TokenCompose", "SD1.5", "IF-XL", "overall", "counting", "position", "published"):
        assert word in err, word


def test_a_partial_overall_is_marked_never_bare():
    assert coverage(_result(), 553, FULL) is None
    one = _result(tasks=("single_object",), value=0.0)
    assert coverage(one, 3, FULL) == "1 of 6 tasks, 3 of 553 prompts"
    assert coverage(_result(), 300, FULL) == "6 of 6 tasks, 300 of 553 prompts"  # all tasks, but not all prompts
    md = markdown({"A": one}, "t", 3, FULL)
    row = next(line for line in md.splitlines() if line.startswith("| A |"))
    assert "0.00 (partial: 1 of 6 tasks, 3 of 553 prompts)" in row
    assert "not comparable" in md


def test_detector_note_names_the_detector_used():
    assert "facebook/mask2former-swin-small-coco-instance" in detector_note()
    custom = detector_note("runs/my-mask2former")
    assert "runs/my-mask2former" in custom and "Swin-S" not in custom and "detectron2" not in custom


def test_table_marks_a_partial_geneval_overall(tmp_path, capsys):
    from tcompose.cli import main

    folder = tmp_path / "ge"
    folder.mkdir()
    summary = {"stage": "geneval", "prompt_source": FULL, "num_prompts": 3, "images_per_prompt": 2, "threshold": 0.3,
               "models": {"A": _result(tasks=("single_object",), value=0.0)}}
    (folder / "summary.json").write_text(json.dumps(summary))
    assert main(["table", "--geneval", str(folder)]) == 0
    md = capsys.readouterr().out
    row = next(line for line in md.splitlines() if line.startswith("| A |"))
    assert "0.00 (partial: 1 of 6 tasks, 3 of 553 prompts)" in row


def test_table_refuses_a_second_geneval_folder_in_one_line(tmp_path, capsys):
    from tcompose.cli import main

    for name in ("d1", "d2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(
            {"stage": "geneval", "prompt_source": FULL, "num_prompts": 553, "images_per_prompt": 4, "threshold": 0.3,
             "models": {name: _result()}}))
    assert main(["table", "--geneval", str(tmp_path / "d1"), "--geneval", str(tmp_path / "d2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--geneval given 2 times" in err[0]
    assert main(["table", "--visor", str(tmp_path / "d1"), "--visor", str(tmp_path / "d2")]) == 2  # every option alike
    assert "--visor given 2 times" in capsys.readouterr().err


def test_table_takes_a_summary_file_and_the_docs_name_its_json(tmp_path, capsys):
    from pathlib import Path

    from tcompose.cli import main

    (tmp_path / "summary_max-overlap-0.5.json").write_text(json.dumps(
        {"stage": "geneval", "prompt_source": FULL, "num_prompts": 553, "images_per_prompt": 4, "threshold": 0.3,
         "rules": {"threshold": 0.3, "max_overlap": 0.5}, "models": {"A": _result()}}))
    rescored = tmp_path / "summary_max-overlap-0.5.json"
    assert main(["table", "--geneval", str(rescored), "-o", str(tmp_path / "tab.md")]) == 0
    md = capsys.readouterr().out
    assert "| A |" in md and "max_overlap 0.5" in md and (tmp_path / "tab.json").is_file()
    docs = (Path(__file__).parents[2] / "docs" / "evaluation.md").read_text()
    assert "writes `tab.json`" in docs and "`table.json` beside it" not in docs
    assert "summary_max-overlap-0.5.json" in docs and "results_NAME_<rules>.jsonl" in docs
    assert main(["table", "--geneval", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_score_only_on_a_missing_folder_says_it_does_not_exist(tmp_path, capsys):
    from tcompose.cli import main

    assert main(["geneval", "--score-only", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "no run.json" not in err


def test_run_json_refusals_name_the_field_that_differs(tmp_path):
    import pytest

    from tcompose.evaluate.benchmark import merge_run_json

    path = tmp_path / "run.json"
    model = {"model": "m", "steps": 50, "guidance": 9.0, "seed": 0}
    old = {"prompt_source": {"kind": "geneval", "file": "a.jsonl", "sha256": "x"},
           "detection": {"detector": "d", "input_short_side": 800}, "models": {"A": model}}
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError) as err:
        merge_run_json(path, {**old, "models": {"A": {**model, "steps": 20}}})
    assert "model 'A' was generated with other settings: --steps 50 -> 20;" in str(err.value)
    assert "{" not in str(err.value)
    with pytest.raises(ValueError, match=r"other detection: --detector-size 800 -> 640;"):
        merge_run_json(path, {**old, "detection": {"detector": "d", "input_short_side": 640}})
    with pytest.raises(ValueError, match=r"other prompt source: --prompt-file a.jsonl -> b.jsonl, the prompt file's "
                                         r"sha256 x -> y;"):
        merge_run_json(path, {**old, "prompt_source": {"kind": "geneval", "file": "b.jsonl", "sha256": "y"}})
