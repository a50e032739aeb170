"""VISOR: the SR2D prompts against the original's facts, the scores by hand and against a transcription of
visor.py, and a whole run on tiny random models (generate -> OWL-ViT -> scores, resume, --score-only)."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from tcompose.data.categories import COCO_80
from tcompose.evaluate.settings import GenerationSettings
from tcompose.evaluate.visor import score, sr2d_prompts
from tcompose.evaluate.visor.prompts import RELATIONS, indefinite_article, is_spatial, spatial_prompts
from tcompose.evaluate.visor.scoring import judge, relation_holds

# ------------------------------------------------------------------------------------------------- prompts


def test_sr2d_prompts_are_visors():
    p = sr2d_prompts()
    assert len(p) == 31_680 and sum(is_spatial(r) for r in p) == 25_280
    assert [r["unique_id"] for r in p] == list(range(31_680))
    assert p[0] == {"unique_id": 0, "num_objects": 2, "obj_1_attributes": ["person"],
                    "obj_2_attributes": ["bicycle"], "rel_type": "to the left of",
                    "text": "a person to the left of a bicycle"}
    assert p[1]["text"] == "a bicycle to the left of a person" and p[1]["obj_1_attributes"] == ["bicycle"]
    assert [r["rel_type"] for r in p[:10]] == [r for rel in RELATIONS for r in (rel, rel)] + ["and", "and"]
    assert p[8]["text"] == "a person and a bicycle" and p[9]["text"] == "a bicycle and a person"
    assert p[10]["text"] == "a person to the left of a car"  # the second pair of itertools.combinations
    assert p[31_679] == {"unique_id": 31_679, "num_objects": 1, "obj_1_attributes": ["toothbrush"],
                         "obj_2_attributes": [None], "rel_type": "single", "text": "a toothbrush"}
    assert p[31_600]["text"] == "a person"  # singles follow all 3,160 pairs
    # every pair once, in combinations order
    pairs = [(r["obj_1_attributes"][0], r["obj_2_attributes"][0]) for r in p[:31_600:10]]
    assert pairs == list(itertools.combinations(COCO_80, 2))
    texts = {r["text"] for r in p}
    assert {"an airplane to the left of an umbrella", "a hair drier", "an orange and an apple"} <= texts


def test_indefinite_articles():
    an = sorted(n for n in COCO_80 if indefinite_article(n) == "an")
    assert an == ["airplane", "apple", "elephant", "orange", "oven", "umbrella"]
    assert indefinite_article("hair drier") == "a" and indefinite_article("tv") == "a"


def test_drawn_prompts_spread_over_the_set():
    a = spatial_prompts(200, seed=0)
    assert a == spatial_prompts(200, seed=0) and a != spatial_prompts(200, seed=1)
    ids = [q.prompt_id for q in a]
    assert ids == sorted(ids) and len(set(ids)) == 200
    every = sr2d_prompts()
    assert all(is_spatial(every[i]) for i in ids)
    assert len({q.categories[0] for q in a}) > 40  # not all "person" prompts, as the first 200 of the file are
    assert len(spatial_prompts()) == 25_280
    with pytest.raises(ValueError, match="between 1 and 25280"):
        spatial_prompts(0)


# -------------------------------------------------------------------------------------------------- scores


def test_relations_in_image_coordinates():
    assert relation_holds("to the left of", (1, 5), (2, 0)) and not relation_holds("to the left of", (2, 0), (1, 5))
    assert relation_holds("to the right of", (3, 0), (2, 0))
    assert relation_holds("above", (0, 1), (0, 9)) and relation_holds("below", (0, 9), (0, 1))  # y grows downwards
    with pytest.raises(ValueError, match="unknown relation"):
        relation_holds("near", (0, 0), (1, 1))


def _rec(uid, k, dets):
    return {"unique_id": uid, "image_index": k, "labels": [d[0] for d in dets], "scores": [d[1] for d in dets],
            "boxes": [d[2] for d in dets]}


def test_scores_by_hand():
    # prompt 0: "a person to the left of a bicycle"; prompt 2: "a person to the right of a bicycle"
    left, right = [0, 0, 10, 10], [20, 0, 30, 10]
    records = [
        _rec(0, 0, [("person", 0.9, left), ("bicycle", 0.8, right)]),  # both, right
        _rec(0, 1, [("person", 0.9, right), ("bicycle", 0.8, left)]),  # both, wrong
        _rec(0, 2, [("person", 0.9, right), ("person", 0.5, left), ("bicycle", 0.8, [12, 0, 18, 10])]),  # 2nd pair
        _rec(0, 3, [("person", 0.9, left), ("bicycle", 0.05, right)]),  # bicycle under the threshold
        _rec(2, 0, [("person", 0.9, right), ("bicycle", 0.2, left)]),  # both, right
        _rec(2, 1, []),
        {"unique_id": 2, "image_index": 2, "labels": None, "scores": None, "boxes": None},  # missing image
        _rec(2, 3, [("bicycle", 0.9, left)]),
        _rec(8, 0, [("person", 0.9, left), ("bicycle", 0.9, right)]),  # "a person and a bicycle": not scored
        _rec(31_600, 0, [("person", 0.9, left)]),  # a single-object prompt: not scored
    ]
    got = score(records, threshold=0.1)
    # 7 images (the missing one is left out); both: 0/0, 0/1, 0/2, 2/0 = 4; right: 0/0, 0/2, 2/0 = 3;
    # prompt 0 has 2 right images, prompt 2 has 1
    assert got["images"] == 7 and got["prompts"] == 2 and got["missing"] == 1
    assert got["OA"] == pytest.approx(400 / 7) and got["VISOR_cond"] == pytest.approx(75.0)
    assert got["VISOR_uncond"] == pytest.approx(300 / 7)
    assert (got["VISOR_1"], got["VISOR_2"], got["VISOR_3"], got["VISOR_4"]) == (100.0, 50.0, 0.0, 0.0)
    assert judge(records[2], "person", "bicycle", "to the left of", 0.1) == (True, True)
    none = score([_rec(0, 0, [("person", 0.9, left)])])
    assert none["OA"] == 0 and none["VISOR_cond"] is None and none["VISOR_uncond"] == 0
    with pytest.raises(ValueError, match="appears twice"):
        score([_rec(0, 0, []), _rec(0, 0, [])])
    with pytest.raises(ValueError, match="no image of a two-object spatial prompt"):
        score([_rec(8, 0, [])])


def _visor_py(results: dict, text_data: list) -> tuple:
    """A transcription of VISOR's visor.py (get_visor_spatial, get_visor_n and the table's uncond), float64."""
    objacc_both = visor_cond = both_count = count = 0
    by_uid: dict = {}
    for img_id, rr in results.items():
        uid = int(img_id.split("_")[0])
        ann = text_data[uid]
        obj1, obj2, rel, n = ann["obj_1_attributes"][0], ann["obj_2_attributes"][0], ann["rel_type"], ann["num_objects"]
        if rel == "and" or n != 2:
            continue
        detected = rr["classes"]
        det_both = int(obj1 in detected and obj2 in detected)
        objacc_both += det_both
        visor_cond += det_both * rr["sra"]
        both_count += det_both
        count += 1
        by_uid.setdefault(uid, []).append(det_both * rr["sra"])
    visor_cond = 100 * visor_cond / both_count
    visor_n = [100 * sum(sum(s) >= k for s in by_uid.values()) / len(by_uid) for k in (1, 2, 3, 4)]
    oa = 100 * objacc_both / count
    return oa, visor_cond, 0.01 * visor_cond * oa, visor_n


# VISOR's spatial relation of two boxes [x0, y0, x1, y1]: object 1's centroid against object 2's, in image
# coordinates (y grows downwards); written out here, not taken from tcompose, so the reference stays independent
_CENTRE = {"x": lambda b: (b[0] + b[2]) / 2, "y": lambda b: (b[1] + b[3]) / 2}
_VISOR_RELATION = {
    "to the left of": lambda b1, b2: _CENTRE["x"](b1) < _CENTRE["x"](b2),
    "to the right of": lambda b1, b2: _CENTRE["x"](b1) > _CENTRE["x"](b2),
    "above": lambda b1, b2: _CENTRE["y"](b1) < _CENTRE["y"](b2),
    "below": lambda b1, b2: _CENTRE["y"](b1) > _CENTRE["y"](b2),
}


def test_scores_equal_a_transcription_of_visor_py():
    text_data = sr2d_prompts()
    rng = random.Random(0)
    uids = rng.sample(range(31_680), 300)  # spatial, "and" and single prompts alike
    records, results = [], {}
    for uid in uids:
        p = text_data[uid]
        names = [p["obj_1_attributes"][0], p["obj_2_attributes"][0] or "cat"]
        for k in range(4):
            dets = [(rng.choice(names), rng.random(), [x := rng.uniform(0, 400), y := rng.uniform(0, 400),
                                                        x + rng.uniform(5, 100), y + rng.uniform(5, 100)])
                    for _ in range(rng.randint(0, 4))]
            records.append(_rec(uid, k, dets))
            kept = [(lab, box) for lab, s, box in dets if s > 0.1]
            a = [box for lab, box in kept if lab == names[0]]
            b = [box for lab, box in kept if lab == names[1]]
            rel = p["rel_type"]
            holds = _VISOR_RELATION.get(rel)  # None for "and" and single prompts: visor.py skips them anyway
            sra = int(any(holds(ba, bb) for ba in a for bb in b)) if holds else 0
            results[f"{uid}_{k}"] = {"classes": sorted({lab for lab, _ in kept}), "sra": sra}
    oa, cond, uncond, visor_n = _visor_py(results, text_data)
    got = score(records, threshold=0.1)
    assert got["OA"] == pytest.approx(oa, abs=1e-9) and got["VISOR_cond"] == pytest.approx(cond, abs=1e-9)
    assert got["VISOR_uncond"] == pytest.approx(uncond, abs=1e-9)
    assert [got[f"VISOR_{k}"] for k in (1, 2, 3, 4)] == pytest.approx(visor_n, abs=1e-9)
    assert 0 < got["OA"] < 100 and got["images"] == 4 * sum(is_spatial(text_data[u]) for u in uids)


# ------------------------------------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tcompose.testing.tiny_sd import write_tiny_pipeline
    from tcompose.testing.tiny_detectors import write_tiny_owlv2, write_tiny_owlvit

    root = tmp_path_factory.mktemp("visor")
    corpus = [q.text for q in spatial_prompts(50, seed=0)]
    return {"sd": write_tiny_pipeline(root / "sd", corpus=corpus), "owlvit": write_tiny_owlvit(root / "owlvit"),
            "owlv2": write_tiny_owlv2(root / "owlv2")}


SETTINGS = GenerationSettings(steps=2, height=32, width=32, device="cpu")


def _config(tiny, out, models=("A", "B"), **kw):
    from tcompose.evaluate.visor.stage import VisorConfig

    base = dict(models=[f"{m}={tiny['sd']}" for m in models], output=out, prompts=3, images=2, settings=SETTINGS,
                detector=str(tiny["owlvit"]), part_size=2, detector_batch_size=2, store_threshold=0.0, threshold=0.0)
    return VisorConfig(**{**base, **kw})


@pytest.mark.slow
def test_visor_run_resume_and_score_only(tiny, tmp_path, monkeypatch):
    from tcompose.cli import main
    from tcompose.evaluate import detection_store
    from tcompose.evaluate.detection_store import read_records
    from tcompose.evaluate.visor.stage import rescore, run

    out = tmp_path / "v"
    summary = run(_config(tiny, out), progress=False)
    assert set(summary["models"]) == {"A", "B"} and summary["models"]["A"] == summary["models"]["B"]  # same seeds
    a = summary["models"]["A"]
    assert a["images"] == 6 and a["prompts"] == 3 and summary["timing"]["detected"] == 12
    prompts = json.loads((out / "prompts.json").read_text())
    assert [p["unique_id"] for p in prompts] == [q.prompt_id for q in spatial_prompts(3, seed=0)]
    rows = read_records(out / "detections" / "A")
    assert len(rows) == 6 and all(set(r["labels"]) <= set(r["categories"]) for r in rows.values())
    # the scores are those of the stored detections, recomputed here
    records = [{"unique_id": k[0], "image_index": k[1], **{f: r[f] for f in ("labels", "scores", "boxes")}}
               for k, r in rows.items()]
    assert score(records, threshold=0.0) == {k: v for k, v in a.items()}
    md = (out / "summary.md").read_text()
    assert "| A |" in md and "SD1.4 (VISOR paper)" in md and "published, not measured" in md

    # a rerun after losing a detections part rewrites only that part; nothing is generated again
    parts = sorted((out / "detections" / "A").glob("part-*.parquet"))
    parts[0].unlink()
    calls = []
    real = detection_store.write_part
    monkeypatch.setattr(detection_store, "write_part", lambda *args: calls.append(1) or real(*args))
    again = run(_config(tiny, out), progress=False)
    assert len(calls) == 1 and again["models"] == summary["models"]
    gen = json.loads((out / "models" / "A" / "run.json").read_text())["summary"]
    assert gen["generated"] == 0 and gen["skipped_existing"] == 6

    higher = rescore(out, threshold=0.5, progress=False)
    assert higher["threshold"] == 0.5 and (out / "summary_threshold-0.5.json").is_file()
    assert higher["models"]["A"]["OA"] <= a["OA"]
    assert main(["visor", "--score-only", str(out), "--threshold", "0.2"]) == 0
    from tcompose.evaluate.multigen.stage import rescore as multigen_rescore

    with pytest.raises(ValueError, match="holds a 'visor' run, not a tcompose multigen one"):
        multigen_rescore(out, progress=False)  # the other benchmark's --score-only reads no foreign folder
    with pytest.raises(ValueError, match="other settings"):
        run(_config(tiny, out, settings=SETTINGS.replace(steps=3)), progress=False)
    with pytest.raises(ValueError, match="other prompt source"):  # another --images: refused, not mixed
        run(_config(tiny, out, images=3), progress=False)
    # a model added to the folder later: the summary keeps the earlier ones
    more = run(_config(tiny, out, models=("C",)), progress=False)
    assert set(more["models"]) == {"A", "B", "C"} and more["models"]["C"] == summary["models"]["A"]


def test_visor_refuses_bad_input_before_any_image(tiny, tmp_path, capsys):
    from tcompose.cli import main

    out = tmp_path / "v"
    args = ["visor", "--model", f"A={tiny['sd']}", "-o", str(out), "--prompts", "1", "--images", "1",
            "--steps", "2", "--height", "32", "--width", "32"]
    assert main([*args, "--detector", str(tiny["owlv2"])]) == 2  # an OWLv2, not VISOR's OWL-ViT
    assert main([*args[:5], "--prompts", "30000"]) == 2
    assert main(["visor", "--output", str(out)]) == 2
    assert main(["visor", "--score-only", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "not an OWL-ViT detector" in err and "between 1 and 25280" in err and "pass --model" in err
    assert "--score-only takes" in err and not out.exists()


@pytest.mark.slow
def test_a_rerun_of_a_finished_visor_keeps_the_recorded_timing(tiny, tmp_path):
    from tcompose.evaluate.visor.stage import run

    out = tmp_path / "v"
    first = run(_config(tiny, out, models=("A",)), progress=False)
    assert first["timing"]["detected"] == 6 and first["timing"]["generation_s"] > 0
    again = run(_config(tiny, out, models=("A",)), progress=False)  # nothing left to generate or detect
    assert again["timing"] == first["timing"]
    assert json.loads((out / "run.json").read_text())["timing"] == first["timing"]
    assert json.loads((out / "summary.json").read_text())["timing"] == first["timing"]


@pytest.mark.parametrize("extra,named", [(["--prompts", "3"], "--prompts"), (["--seed", "1"], "--seed"),
                                         (["--store-threshold", "0.05"], "--store-threshold")])
def test_score_only_refuses_options_it_cannot_honour(tmp_path, capsys, extra, named):
    from tcompose.cli import main

    assert main(["visor", "--score-only", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"does not take {named};" in err and "without --score-only" in err
