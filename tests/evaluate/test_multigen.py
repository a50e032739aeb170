"""MultiGen: the score against hand-computed numbers and the reference's arithmetic, the prompt sets (pinned
sha256, cache, offline), sampling, and a whole run with tiny models: resume after a kill, two processes,
--score-only."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tcompose.data.categories import ADE20K_150, ADE20K_OBJECTS, COCO_80, MULTIGEN_CATEGORIES
from tcompose.evaluate.multigen.prompts import (
    PROMPT_SETS,
    PromptSetError,
    fetch_prompt_set,
    prompt_text,
    read_prompt_file,
    resolve_prompts,
    sample_prompts,
)
from tcompose.evaluate.multigen.scoring import score
from tcompose.evaluate.settings import GenerationSettings

ABCDE, FGHIJ, ACEGI = list("abcde"), list("fghij"), list("acegi")


def rec(pid, k, categories, labels, scores):
    return {"prompt_id": pid, "image_index": k, "categories": categories, "labels": labels, "scores": scores}


# ------------------------------------------------------------------------------------------------------ score


def test_score_hand_computed():
    records = [
        # duplicate label (a twice), a label not in the prompt (z), c exactly at the threshold -> {a, b} = 2
        rec(0, 0, ABCDE, ["a", "a", "b", "z", "c"], [0.9, 0.95, 0.5, 0.99, 0.1]),
        # just above the threshold counts -> 5
        rec(0, 1, ABCDE, ["d", "e", "a", "b", "c"], [0.2, 0.1000001, 0.3, 0.4, 0.11]),
        rec(1, 0, FGHIJ, [], []),  # nothing detected -> 0
        rec(1, 1, FGHIJ, ["f", "g", "h", "x", "x"], [0.05, 0.5, 0.5, 0.9, 0.9]),  # -> {g, h} = 2
        rec(2, 0, ACEGI, ["a", "c", "e", "g"], [0.6, 0.6, 0.6, 0.0999]),  # tied scores -> 3
        rec(2, 1, ACEGI, None, None),  # missing image: excluded, counted
    ]
    got = score(records, threshold=0.1)
    # counts: index 0 -> [2, 0, 3], index 1 -> [5, 2]; 5 images
    expected = {
        "MG1": (80.0, 50 / 3),  # 4/5; per index 2/3 and 2/2 -> |100 - 66.67| / 2
        "MG2": (80.0, 50 / 3),
        "MG3": (40.0, 25 / 3),  # 2/5; per index 1/3 and 1/2
        "MG4": (20.0, 25.0),  # 1/5; per index 0/3 and 1/2
        "MG5": (20.0, 25.0),
    }
    for k, (mean, std) in expected.items():
        assert got[k][0] == pytest.approx(mean, abs=1e-9) and got[k][1] == pytest.approx(std, abs=1e-9), k
    assert (got["images"], got["missing"], got["prompts"]) == (5, 1, 3)
    # threshold edges are compared in float32, as the reference's torch post-processing compares them
    assert score([rec(0, 0, ABCDE, ["a"], [float(np.float32(0.1))])])["MG1"][0] == 0.0
    up = float(np.nextafter(np.float32(0.1), np.float32(1)))
    assert score([rec(0, 0, ABCDE, ["a"], [up])])["MG1"][0] == 100.0
    assert score(records, threshold=0.55)["MG1"][0] == pytest.approx(40.0)  # only (0, 0) and (2, 0) keep a box


def _reference_get_multigen(per_image: dict, categories: dict, threshold: float, n_ins: int, ipp: int):
    """A float64 transcription of TokenCompose's gen_multigen_scores.get_multigen (complete grids only)."""
    mg_n = [0] * n_ins
    mg_std = np.zeros((ipp, n_ins))
    for (pid, k), (labels, scores) in per_image.items():
        detected = [labels[i] for i in range(len(scores)) if scores[i] > threshold]
        for j in range(len(set(detected) & set(categories[pid]))):
            mg_n[j] += 1
            mg_std[k][j] += 1
    mg_std = np.std(100 * mg_std / (len(per_image) / ipp), axis=0)
    return [100 * m / len(per_image) for m in mg_n], mg_std


def test_score_is_the_reference_arithmetic():
    rng = np.random.default_rng(0)
    categories = {pid: list(rng.choice(COCO_80, 5, replace=False)) for pid in range(40)}
    per_image, records = {}, []
    for pid, cats in categories.items():
        for k in range(4):
            n = int(rng.integers(0, 12))
            labels = [str(x) for x in rng.choice(cats + ["zebra", "tie"], n)]
            scores = [float(np.float32(s)) for s in rng.random(n) * 0.4]
            per_image[(pid, k)] = (labels, scores)
            records.append(rec(pid, k, cats, labels, scores))
    for threshold in (0.1, 0.25):
        means, stds = _reference_get_multigen(per_image, categories, threshold, 5, 4)
        got = score(records, threshold)
        np.testing.assert_allclose([got[f"MG{k}"][0] for k in range(1, 6)], means, atol=1e-9)
        np.testing.assert_allclose([got[f"MG{k}"][1] for k in range(1, 6)], stds, atol=1e-9)
        assert got["images"] == 160 and got["missing"] == 0


def test_score_rejects_bad_records():
    with pytest.raises(ValueError, match="two records for prompt 0 image 1"):
        score([rec(0, 1, ABCDE, [], []), rec(0, 1, ABCDE, [], [])])
    with pytest.raises(ValueError, match="every record is missing"):
        score([rec(0, 0, ABCDE, None, None)])
    with pytest.raises(ValueError, match="2 labels but 1 scores"):
        score([rec(0, 0, ABCDE, ["a", "b"], [0.5])])


# ---------------------------------------------------------------------------------------------------- prompts


def test_paper_prompt_sets_read_and_checked(test_data, tmp_path):
    for dataset, names in (("coco", COCO_80), ("ade20k", ADE20K_OBJECTS)):
        ps = PROMPT_SETS[dataset]
        prompts = read_prompt_file(test_data / "multigen" / ps.filename, ps.sha256)
        assert len(prompts) == 1000 and [p.prompt_id for p in prompts] == list(range(1000))
        assert all(len(set(p.categories)) == 5 and p.text == prompt_text(p.categories) for p in prompts)
        assert {c for p in prompts for c in p.categories} == set(names) == set(MULTIGEN_CATEGORIES[dataset])
    coco = read_prompt_file(test_data / "multigen" / PROMPT_SETS["coco"].filename)
    assert coco[0].categories == ("book", "cup", "kite", "mouse", "surfboard")
    assert coco[0].text == "a photo of a book, a cup, a kite, a mouse, and a surfboard."
    assert set(ADE20K_OBJECTS) < set(ADE20K_150)
    ade_file = test_data / "multigen" / PROMPT_SETS["ade20k"].filename
    with pytest.raises(PromptSetError, match="is the paper's ade20k prompt set: pass --dataset ade20k"):
        resolve_prompts("coco", prompt_file=ade_file)
    with pytest.raises(PromptSetError, match="holds only 1000 prompts"):
        resolve_prompts("ade20k", prompt_file=ade_file, limit=1001)

    tampered = tmp_path / PROMPT_SETS["coco"].filename
    data = bytearray((test_data / "multigen" / tampered.name).read_bytes())
    data[data.index(b"kite")] = ord("K")
    tampered.write_bytes(bytes(data))
    with pytest.raises(PromptSetError, match="sha256 .* differs from the pinned"):
        read_prompt_file(tampered, PROMPT_SETS["coco"].sha256)
    with pytest.raises(PromptSetError, match="sha256"):
        resolve_prompts("coco", prompt_file=tampered)
    prompts, source = resolve_prompts("coco", prompt_file=tampered, limit=3, custom=True)  # own prompts: allowed
    assert prompts[0].categories[2] == "Kite" and source["kind"] == "custom" and len(prompts) == 3


def test_fetch_checks_caches_and_works_offline(test_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cache = tmp_path / "hf" / "tcompose" / "multigen"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PromptSetError, match=r"not in the cache .*tcompose download.*--prompt-file"):
        fetch_prompt_set("ade20k")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copy(test_data / "multigen" / "ade20k_obj_comp_5_1k.json", mirror)
    (mirror / "coco_obj_comp_5_1k.json").write_text("[]")  # a mirror serving the wrong bytes
    with pytest.raises(PromptSetError, match="differs from the pinned"):
        fetch_prompt_set("coco", base_url=mirror.as_uri())
    assert not (cache / "coco_obj_comp_5_1k.json").exists()
    path = fetch_prompt_set("ade20k", base_url=mirror.as_uri())
    assert path == cache / "ade20k_obj_comp_5_1k.json" and path.is_file()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompts, source = resolve_prompts("ade20k", limit=50)  # offline: served from the cache
    assert len(prompts) == 50 and source["sha256"] == PROMPT_SETS["ade20k"].sha256
    assert source["commit"] == "5633f816116fdf7de74d9055ff9666c5222416e2"
    with pytest.raises(PromptSetError, match="unknown --dataset"):
        resolve_prompts("lvis")


def test_sampled_prompts():
    a = sample_prompts(COCO_80, 50, seed=3)
    assert a == sample_prompts(COCO_80, 50, seed=3) and a[:10] == sample_prompts(COCO_80, 10, seed=3)
    assert a != sample_prompts(COCO_80, 50, seed=4)
    assert all(len(set(p.categories)) == 5 and set(p.categories) <= set(COCO_80) for p in a)
    assert a[0].text == prompt_text(a[0].categories) and [p.prompt_id for p in a] == list(range(50))
    prompts, source = resolve_prompts("ade20k", limit=20, sample_seed=1)
    assert len(prompts) == 20 and {c for p in prompts for c in p.categories} <= set(ADE20K_OBJECTS)
    assert source == {**source, "kind": "sampled", "sample_seed": 1}
    assert prompt_text(["cat", "dog"]) == "a photo of a cat, and a dog."


# ------------------------------------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tcompose.testing.tiny_sd import write_tiny_pipeline
    from tcompose.testing.tiny_detectors import write_tiny_owlv2

    root = tmp_path_factory.mktemp("mg")
    corpus = [p.text for p in sample_prompts(COCO_80, 20, seed=0)]
    return {"sd": write_tiny_pipeline(root / "sd", corpus=corpus), "owl": write_tiny_owlv2(root / "owl")}


def _config(tiny, out, models=("A", "B"), **kw):
    from tcompose.evaluate.multigen.stage import MultigenConfig

    base = dict(models=[f"{m}={tiny['sd']}" for m in models], output=out, sample_seed=0, prompts=3, images=2,
                settings=GenerationSettings(steps=2, height=32, width=32, device="cpu"), detector=str(tiny["owl"]),
                part_size=2, detector_batch_size=2, store_threshold=0.01, threshold=0.1)
    return MultigenConfig(**{**base, **kw})


def _rows(out, name):
    from tcompose.evaluate.detection_store import read_records

    rows = read_records(out / "detections" / name)
    return {k: (r["labels"], r["scores"], r["boxes"]) for k, r in sorted(rows.items())}


def _same_rows(a: dict, b: dict) -> bool:
    """Equal keys and labels; scores and boxes equal up to the float rounding of other batch compositions."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0], k
        np.testing.assert_allclose(a[k][1], b[k][1], atol=1e-4)
        np.testing.assert_allclose(np.array(a[k][2]).reshape(-1, 4), np.array(b[k][2]).reshape(-1, 4), atol=1e-2)
    return True


@pytest.mark.slow
def test_multigen_resume_after_kill_processes_and_score_only(tiny, tmp_path, monkeypatch):
    from tcompose.cli import main
    from tcompose.evaluate import detection_store
    from tcompose.evaluate.multigen.stage import rescore, run

    ref = run(_config(tiny, tmp_path / "ref"), progress=False)
    assert set(ref["models"]) == {"A", "B"} and ref["models"]["A"] == ref["models"]["B"]  # same seeds, same model
    assert ref["models"]["A"]["images"] == 6 and ref["timing"]["detected"] == 12
    expected = _rows(tmp_path / "ref", "A")
    assert len(expected) == 6 and sum(len(v[0]) for v in expected.values()) > 0
    run_json = json.loads((tmp_path / "ref" / "run.json").read_text())
    settings = run_json["models"]["A"]
    assert {"scheduler", "steps", "guidance", "dtype", "safety_checker", "seed", "revision"} <= set(settings)
    assert run_json["detection"]["store_threshold"] == 0.01 and run_json["threshold"] == 0.1
    assert run_json["hub_commits"] == {"A": None, "B": None, "detector": None}  # local folders
    assert run_json["prompt_source"]["kind"] == "sampled" and run_json["images_per_prompt"] == 2
    assert (tmp_path / "ref" / "grid_A.png").is_file() and "(paper)" in (tmp_path / "ref" / "summary.md").read_text()

    # killed after the first detections part: the rerun keeps it and writes only the rest
    real_write = detection_store.write_part
    calls = []

    def write_then_die(folder, rows, rank):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(len(rows))
        return real_write(folder, rows, rank)

    monkeypatch.setattr(detection_store, "write_part", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(_config(tiny, tmp_path / "out", models=("A",)), progress=False)
    assert len(list((tmp_path / "out" / "detections" / "A").glob("part-*.parquet"))) == 1
    assert not (tmp_path / "out" / "summary.json").exists()
    written = []
    def write_and_count(folder, rows, rank):
        written.append(len(rows))
        return real_write(folder, rows, rank)

    monkeypatch.setattr(detection_store, "write_part", write_and_count)
    again = run(_config(tiny, tmp_path / "out", models=("A",)), progress=False)
    assert sum(written) == 4 and again["generation"]["A"]["generated"] == 0  # images were kept too
    assert _same_rows(_rows(tmp_path / "out", "A"), expected) and again["models"]["A"] == ref["models"]["A"]

    # two processes (run one after the other here): the same rows and scores
    two = tmp_path / "two"
    mine = run(_config(tiny, two, models=("A",)), rank=1, world_size=2, progress=False)
    assert mine["rank"] == 1 and mine["timing"]["detected"] == 3 and not (two / "summary.json").exists()
    both = run(_config(tiny, two, models=("A",)), rank=0, world_size=2, progress=False)
    assert _same_rows(_rows(two, "A"), expected) and both["models"]["A"] == ref["models"]["A"]

    # other detection settings are refused; --score-only rescoring at another threshold
    with pytest.raises(ValueError, match="other detection"):
        run(_config(tiny, two, models=("A",), store_threshold=0.05), progress=False)
    rescored = rescore(tmp_path / "ref", 0.5, progress=False)
    records = [{"prompt_id": k[0], "image_index": k[1], "categories": None, "labels": v[0], "scores": v[1]}
               for k, v in expected.items()]
    prompts = {p.prompt_id: p.categories for p in sample_prompts(COCO_80, 3, seed=0)}
    for r in records:
        r["categories"] = prompts[r["prompt_id"]]
    assert rescored["models"]["A"] == score(records, 0.5)
    assert (tmp_path / "ref" / "summary_threshold-0.5.json").is_file()
    with pytest.raises(ValueError, match="below the stored detections' threshold"):
        rescore(tmp_path / "ref", 0.001, progress=False)
    assert main(["multigen", "--score-only", str(tmp_path / "ref"), "--threshold", "0.3"]) == 0
    at_03 = json.loads((tmp_path / "ref" / "summary_threshold-0.3.json").read_text())["models"]["A"]
    assert at_03["MG1"] == list(score(records, 0.3)["MG1"])


def test_cli_errors_are_one_line(tmp_path, capsys):
    from tcompose.cli import main

    assert main(["multigen", "--output", str(tmp_path)]) == 2  # no --model
    assert main(["multigen", "--score-only", str(tmp_path / "nothing")]) == 2
    assert main(["multigen", "--model", f"A={tmp_path}", "-o", str(tmp_path / "o"), "--dataset", "lvis"]) == 2
    err = capsys.readouterr().err
    assert "pass --model" in err and "--score-only takes" in err and "unknown --dataset 'lvis'" in err
    assert not (tmp_path / "o").exists()


def test_a_model_that_is_no_detector_fails_before_any_image_is_made(tiny, tmp_path, capsys):
    from tcompose.cli import main

    out = tmp_path / "mg"
    args = ["multigen", "--model", f"A={tiny['sd']}", "-o", str(out), "--sample-seed", "0", "--prompts", "1",
            "--images", "1", "--steps", "2", "--height", "32", "--width", "32"]
    assert main([*args, "--detector", str(tiny["sd"])]) == 2  # a pipeline folder: no OWLv2 config
    assert main([*args, "--detector", str(tiny["sd"] / "unet")]) == 2  # a config, but no OWLv2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("--detector" in line and "OWLv2" in line for line in err), err
    assert not out.exists()  # nothing generated, no empty folder left


def test_attend_excite_models_join_the_plain_ones_in_one_folder(tiny, tmp_path):
    """--attend-excite excites each prompt's categories; its settings are the model's own in run.json, so plain
    and excited models share a folder (and its scores) under their names, and their images differ."""
    from tcompose.cli import main

    out = tmp_path / "mg"
    args = ["multigen", "-o", str(out), "--sample-seed", "0", "--prompts", "2", "--images", "1", "--steps", "2",
            "--height", "32", "--width", "32", "--detector", str(tiny["owl"])]
    assert main([*args, "--model", f"A={tiny['sd']}"]) == 0
    assert main([*args, "--model", f"A+AttendExcite={tiny['sd']}", "--attend-excite", "--excite-res", "8"]) == 0
    models = json.loads((out / "run.json").read_text())["models"]
    assert "attend_excite" not in models["A"]
    assert models["A+AttendExcite"]["attend_excite"]["resolution"] == 8
    summary = json.loads((out / "summary.json").read_text())
    assert {"A", "A+AttendExcite"} <= set(json.dumps(summary).replace('"', " ").split())
    plain = sorted((out / "models" / "A" / "images").glob("*.png"))
    excited = sorted((out / "models" / "A+AttendExcite" / "images").glob("*.png"))
    assert [p.name for p in plain] == [p.name for p in excited] and len(plain) == 2
    from PIL import Image

    assert any(np.asarray(Image.open(a)).tolist() != np.asarray(Image.open(b)).tolist() for a, b in zip(plain, excited))


@pytest.mark.slow
def test_a_rerun_of_a_finished_multigen_keeps_the_recorded_timing(tiny, tmp_path):
    from tcompose.evaluate.multigen.stage import run

    out = tmp_path / "m"
    first = run(_config(tiny, out, models=("A",), grid=0), progress=False)
    assert first["timing"]["detected"] == 6 and first["timing"]["generation_s"] > 0
    again = run(_config(tiny, out, models=("A",), grid=0), progress=False)  # nothing left to generate or detect
    assert again["timing"] == first["timing"] and again["generation"] == first["generation"]
    assert json.loads((out / "run.json").read_text())["timing"] == first["timing"]
    assert json.loads((out / "summary.json").read_text())["timing"] == first["timing"]


@pytest.mark.parametrize("extra,named", [(["--model", "A=x"], "--model"), (["--images", "5"], "--images"),
                                         (["--steps", "3", "--grid", "0"], "--steps, --grid"),
                                         (["--detector-batch-size", "2"], "--detector-batch-size"),
                                         (["--output", "o"], "--output")])
def test_score_only_refuses_options_it_cannot_honour(tmp_path, capsys, extra, named):
    from tcompose.cli import main

    assert main(["multigen", "--score-only", str(tmp_path), *extra, "--threshold", "0.2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"does not take {named};" in err and "without --score-only" in err
