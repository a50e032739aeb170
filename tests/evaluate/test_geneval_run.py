"""A whole ``tcompose geneval`` run on tiny random models (SD, Mask2Former, CLIP): its JSONL read by a
transcription of GenEval's summary_scores.py, its scores equal to ``score`` of the stored detections, resuming,
--score-only with other rules, ``tcompose table --geneval``, and a wrong detector refused before any image."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tcompose.evaluate.geneval import TASKS, score
from tcompose.evaluate.geneval.colors import color_prompts
from tcompose.evaluate.geneval.prompts import read_prompt_file


def genevals_summary(path) -> dict:
    """evaluation/summary_scores.py of djghosh13/geneval (af4902f), transcribed: pandas reads the JSONL, the
    task scores are the mean of ``correct`` per tag (first-appearance order), overall their mean."""
    import pandas as pd

    df = pd.read_json(path, orient="records", lines=True)
    task_scores, tasks = [], {}
    for tag, task_df in df.groupby("tag", sort=False):
        task_scores.append(task_df["correct"].mean())
        tasks[tag] = float(task_df["correct"].mean())
    return {"overall": float(np.mean(task_scores)), "tasks": tasks, "images": len(df),
            "prompts": len(df.groupby("metadata")), "correct_prompts": float(df.groupby("metadata")["correct"].any().mean())}


THRESHOLD, COUNTING = 0.0, 0.0085


def _labels_seen(folder) -> set[str]:
    """GenEval names of the (query, class) pairs the tiny detector scores highest on a grey image."""
    import torch
    from transformers import Mask2FormerForUniversalSegmentation

    from tcompose.evaluate.geneval.detector import geneval_label

    model = Mask2FormerForUniversalSegmentation.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(pixel_values=torch.zeros(1, 3, 64, 64)).class_queries_logits[0]
    top = logits.softmax(-1)[:, :-1].flatten().topk(40).indices % (logits.shape[-1] - 1)
    return {geneval_label(model.config.id2label[int(i)]) for i in top}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, test_data):
    from tcompose.testing.tiny_sd import write_tiny_pipeline
    from tcompose.testing.tiny_detectors import write_tiny_mask2former
    from tcompose.testing.tiny_vision import write_tiny_clip

    root = tmp_path_factory.mktemp("geneval")
    m2f = write_tiny_mask2former(root / "m2f")
    seen = _labels_seen(m2f)
    prompts = read_prompt_file(test_data / "geneval" / "evaluation_metadata.jsonl")
    # one prompt of each task, the first naming only classes the random detector tends to report (so that some
    # images are judged correct), else the task's first
    chosen = [next((p for p in prompts if p.tag == tag and set(p.categories) <= seen),
                   next(p for p in prompts if p.tag == tag)) for tag in TASKS]
    prompt_file = root / "six.jsonl"
    prompt_file.write_text("".join(json.dumps(p.metadata) + "\n" for p in chosen))
    names = {n for p in chosen for n in p.categories}
    corpus = [p.text for p in chosen] + [t for n in names for texts in color_prompts(n) for t in texts]
    return {"sd": write_tiny_pipeline(root / "sd", corpus=[p.text for p in chosen]),
            "m2f": m2f, "clip": write_tiny_clip(root / "clip", corpus=corpus),
            "prompts": prompt_file}


def _args(tiny, out, *extra):
    return ["geneval", "--model", f"A={tiny['sd']}", "-o", str(out), "--prompt-file", str(tiny["prompts"]),
            "--custom-prompts", "--images", "2", "--steps", "2", "--height", "32", "--width", "32",
            "--detector", str(tiny["m2f"]), "--clip-model", str(tiny["clip"]), "--detector-size", "64",
            "--store-threshold", "0", "--threshold", str(THRESHOLD), "--counting-threshold", str(COUNTING), "--grid", "1", *extra]


@pytest.mark.slow
def test_geneval_run_jsonl_rescoring_and_table(tiny, tmp_path, capsys):
    from tcompose.cli import main
    from tcompose.evaluate.detection_store import read_records
    from tcompose.evaluate.geneval.report import records_of
    from tcompose.evaluate.geneval.prompts import GenevalPrompt

    out = tmp_path / "ge"
    assert main(_args(tiny, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    measured = summary["models"]["A"]
    assert measured["images"] == 12 and set(measured["tasks"]) == set(TASKS)
    assert 0 < measured["correct_images"] < 1, measured  # some images right, some wrong: the rules had work
    assert "transformers Mask2Former" in summary["title"] and "not the mmdet checkpoint" in summary["detector_note"]
    assert "not the mmdet checkpoint" in (out / "summary.md").read_text()
    assert summary["rules"] == {"threshold": THRESHOLD, "counting_threshold": COUNTING, "max_objects": 16,
                                "max_overlap": 1.0, "position_threshold": 0.1}
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["detection"]["color_clip"] == str(tiny["clip"]) and run_json["detection"]["queries"] is None
    assert all((out / f"grid_A_{tag}.png").is_file() for tag in TASKS)

    # the JSONL: GenEval's own summary logic reads it and agrees with the summary
    jsonl = out / "results_A.jsonl"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert all((out / r["filename"]).is_file() for r in rows)
    theirs = genevals_summary(jsonl)
    assert theirs["tasks"] == pytest.approx(measured["tasks"]) and theirs["overall"] == pytest.approx(measured["overall"])
    assert (theirs["images"], theirs["prompts"]) == (12, 6)
    assert theirs["correct_prompts"] == pytest.approx(measured["correct_prompts"])

    # the stable score() of the stored detections gives the same numbers; colours stored for the prompt's classes
    stored = read_records(out / "detections" / "A")
    prompts = [GenevalPrompt.from_dict(d) for d in json.loads((out / "prompts.json").read_text())]
    records = records_of(stored, prompts, 2)
    assert {k: v for k, v in score(records, THRESHOLD, COUNTING).items()} == measured
    colored = [(d["label"], d["color"]) for r in records for d in r["detections"] if d["color"]]
    assert colored and all(lab in {n for p in prompts for n in p.categories} for lab, _ in colored)

    # a rerun does no work; --score-only with other rules writes beside, loading no model
    assert main(_args(tiny, out)) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["timing"] == summary["timing"] and again["models"] == summary["models"]  # the recorded timing kept
    assert main(["geneval", "--score-only", str(out), "--counting-threshold", "0.5", "--max-overlap", "0.5"]) == 0
    other = json.loads((out / "summary_counting-threshold-0.5_max-overlap-0.5.json").read_text())["models"]["A"]
    assert other == score(records, THRESHOLD, 0.5, max_overlap=0.5)
    assert (out / "results_A_counting-threshold-0.5_max-overlap-0.5.jsonl").is_file()
    assert main(["geneval", "--score-only", str(out), "--images", "3"]) == 2
    assert "does not take --images" in capsys.readouterr().err

    # tcompose table --geneval: the GenEval columns, GenEval's published rows marked as such
    capsys.readouterr()
    assert main(["table", "--geneval", str(out)]) == 0
    md = capsys.readouterr().out
    assert "GenEval overall" in md and "| SD1.5 (GenEval) |" in md and "0.43" in md and "published, not measured" in md
    row = next(line for line in md.splitlines() if line.startswith("| A |"))
    assert f"{measured['overall']:.2f}" in row and "GenEval: 6 prompts x 2 images" in md
    assert main(["table", "--geneval", str(tmp_path)]) == 2  # no summary there


def test_a_detector_that_is_no_mask2former_fails_before_any_image(tiny, tmp_path, capsys):
    from tcompose.cli import main

    out = tmp_path / "ge"
    assert main([*_args(tiny, out), "--detector", str(tiny["sd"] / "unet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--detector" in err[0] and "Mask2Former" in err[0]
    assert not out.exists()
    assert main(["geneval", "--output", str(out)]) == 2 and "pass --model" in capsys.readouterr().err


@pytest.mark.slow
def test_growing_a_folder_and_what_is_refused_in_it(tiny, tmp_path, capsys):
    """--prompts 2 then 3 extends the folder (no transformers bar shown); the summary names the detector used and
    marks the partial overall; another --steps or --detector-size is refused naming it; a model added at another
    --images is refused; ``table --geneval`` takes a --score-only summary file and writes ``tab.json``."""
    from tcompose.cli import main

    out = tmp_path / "ge"
    assert main([*_args(tiny, out), "--prompts", "2", "--grid", "0"]) == 0
    capsys.readouterr()
    assert main([*_args(tiny, out), "--prompts", "3", "--grid", "0"]) == 0  # the first 2 are a prefix: extended
    captured = capsys.readouterr()
    assert "Loading weights" not in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_prompts"] == 3 and summary["models"]["A"]["images"] == 6
    assert summary["partial"] == {"A": "3 of 6 tasks, 3 of 6 prompts"}
    assert str(tiny["m2f"]) in summary["detector_note"] and "Swin-S" not in summary["detector_note"]
    assert "partial: 3 of 6 tasks" in (out / "summary.md").read_text()

    assert main([*_args(tiny, out), "--prompts", "3", "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model 'A' was generated with other settings: --steps 2 -> 3;" in err[0]
    assert "{" not in err[0]  # the field, not the whole record
    assert main([*_args(tiny, out), "--prompts", "3", "--detector-size", "96"]) == 2
    err = capsys.readouterr().err
    assert "other detection: --detector-size 64 -> 96;" in err and "{" not in err

    b = [a if a != f"A={tiny['sd']}" else f"B={tiny['sd']}" for a in _args(tiny, out)]
    b[b.index("--images") + 1] = "1"
    assert main([*b, "--prompts", "3"]) == 2  # A has 2 images per prompt: B at 1 would rescore A on 1
    err = capsys.readouterr().err
    assert "--images 1" in err and "--images 2" in err and "A" in err
    assert json.loads((out / "summary.json").read_text())["models"]["A"]["images"] == 6  # A's summary untouched

    assert main(["geneval", "--score-only", str(out), "--max-overlap", "0.5"]) == 0
    rescored = out / "summary_max-overlap-0.5.json"
    capsys.readouterr()
    assert main(["table", "--geneval", str(rescored), "--output", str(tmp_path / "tab.md")]) == 0
    md = capsys.readouterr().out
    assert "max_overlap 0.5" in md and "(partial: 3 of 6 tasks, 3 of 6 prompts)" in md
    assert (tmp_path / "tab.json").is_file() and not (tmp_path / "table.json").exists()


def test_the_default_guidance_is_genevals_script_for_the_unets_and_the_card_for_flux(tiny, tmp_path):
    """What run.json records for each model when --guidance is not given (read from configs, nothing generated):
    GenEval's script's 9 for an SD1.x model, FLUX.1-dev's card's 3.5 for a FLUX model (9 is far outside the
    guidance it embeds); a given --guidance applies to both."""
    from tcompose.evaluate.benchmark import run_record
    from tcompose.evaluate.geneval.stage import GenevalConfig
    from tcompose.evaluate.settings import GenerationSettings
    from tcompose.models.spec import parse_model_specs
    from tcompose.testing.tiny_dit import write_tiny_flux_pipeline

    flux = write_tiny_flux_pipeline(tmp_path / "flux")
    specs = parse_model_specs([f"A={tiny['sd']}", f"F={flux}"])
    for given, expected in ((None, {"A": 9.0, "F": 3.5}), (5.0, {"A": 5.0, "F": 5.0})):
        settings = GenerationSettings.for_stage("geneval", guidance=given)
        cfg = GenevalConfig(models=[f"{s.name}={s.model}" for s in specs], output=tmp_path / "ge", settings=settings)
        models = run_record("geneval", cfg, specs, {})["models"]
        assert {name: m["guidance"] for name, m in models.items()} == expected
        assert models["A"]["steps"] == models["F"]["steps"] == 50  # both cards' steps
    # a folder made under the old default (9 for every model): the same command resumes it at 9, FLUX included
    out = tmp_path / "old"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"models": {"F": {"guidance": 9.0}}}))
    cfg = GenevalConfig(models=[f"F={flux}"], output=out, settings=GenerationSettings.for_stage("geneval"))
    assert run_record("geneval", cfg, specs[1:], {})["models"]["F"]["guidance"] == 9.0
