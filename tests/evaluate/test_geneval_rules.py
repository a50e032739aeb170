"""GenEval's rules against hand-worked cases for every task, its relative_position and summary arithmetic, and the
prompt file (pinned sha256, the real file's tags and object names, offline cache)."""

from __future__ import annotations

import json
import shutil

import pytest

from tcompose.evaluate.geneval import GENEVAL_OBJECTS, relative_position, score
from tcompose.evaluate.geneval.prompts import SHA256, fetch_prompts, read_prompt_file, resolve_prompts
from tcompose.evaluate.geneval.rules import compute_iou, judge, keep_objects
from tcompose.evaluate.multigen.prompts import PromptSetError

SINGLE = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
TWO = {"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "sports ball", "count": 1}],
       "prompt": "a photo of a bench and a sports ball"}
COUNT = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
         "prompt": "a photo of two cats"}
COLOR = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}
POSITION = {"tag": "position", "include": [{"class": "kite", "count": 1},
                                           {"class": "wine glass", "count": 1, "position": ["above", 0]}],
            "prompt": "a photo of a wine glass above a kite"}
ATTR = {"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"},
                                         {"class": "apple", "count": 1, "color": "black"}],
        "prompt": "a photo of a purple wine glass and a black apple"}


def det(label, score, box=(0, 0, 10, 10), color=None):
    return {"label": label, "score": score, "box": list(box), "color": color}


def verdict(meta, *dets, **rules):
    r = judge({"prompt_index": 0, "image_index": 0, "metadata": meta, "detections": list(dets)}, **rules)
    return r["correct"], r["reason"]


def test_single_and_two_objects():
    assert verdict(SINGLE, det("bench", 0.31)) == (True, "")
    assert verdict(SINGLE, det("bench", 0.3)) == (False, "expected bench>=1, found 0")  # strictly above 0.3
    assert verdict(SINGLE, det("bench", 0.3), threshold=0.2)[0]
    assert verdict(TWO, det("bench", 0.9), det("sports ball", 0.5)) == (True, "")
    assert verdict(TWO, det("bench", 0.9), det("dog", 0.99)) == (False, "expected sports ball>=1, found 0")


def test_counting_threshold_and_exclude():
    two = [det("cat", 0.95), det("cat", 0.91)]
    assert verdict(COUNT, *two, det("cat", 0.85)) == (True, "")  # 0.85 is under the counting threshold 0.9
    assert verdict(COUNT, *two, det("cat", 0.93)) == (False, "expected cat<3, found 3")  # the exclude
    assert verdict(COUNT, det("cat", 0.95), det("cat", 0.5)) == (False, "expected cat>=2, found 1")
    assert verdict(COUNT, det("cat", 0.95), det("cat", 0.5), counting_threshold=0.4) == (True, "")
    # max_overlap: a near-duplicate box of the same cat is suppressed (IoU >= 0.5), a separate one is not
    dup = [det("cat", 0.95, (0, 0, 10, 10)), det("cat", 0.94, (1, 0, 11, 10)), det("cat", 0.93, (50, 0, 60, 10))]
    assert verdict(COUNT, *dup)[1] == "expected cat<3, found 3"
    assert verdict(COUNT, *dup, max_overlap=0.5) == (True, "")
    assert verdict(COUNT, *dup, max_objects=2) == (True, "")  # the two best only
    assert compute_iou([0, 0, 10, 10], [1, 0, 11, 10]) == pytest.approx(110 / 132)  # (x1 - x0 + 1) areas


def test_colors_judged_on_the_best_object():
    assert verdict(COLOR, det("car", 0.8, color="red")) == (True, "")
    assert verdict(COLOR, det("car", 0.8, color="blue")) == (False, "expected red car>=1, found 0 red; and 1 blue")
    # the best car is blue: the red one below it is not looked at
    assert verdict(COLOR, det("car", 0.9, color="blue"), det("car", 0.8, color="red"))[0] is False
    assert verdict(COLOR, det("car", 0.2, color="red")) == (False, "expected car>=1, found 0")


def test_position_relative_to_an_earlier_group():
    kite = det("kite", 0.9, (0, 50, 10, 60))
    assert verdict(POSITION, kite, det("wine glass", 0.9, (0, 0, 10, 10))) == (True, "")
    assert verdict(POSITION, kite, det("wine glass", 0.9, (0, 70, 10, 80))) == (
        False, "expected wine glass above target, found below target")
    # centres 1 px apart, boxes 10 px: the offset shrinks by 0.1 x 20 = 2 px to nothing, no relation at all
    assert verdict(POSITION, kite, det("wine glass", 0.9, (0, 49, 10, 59))) == (
        False, "expected wine glass above target, found  target")
    # no kite: the first group fails, so the second has no target
    assert verdict(POSITION, det("wine glass", 0.9)) == (
        False, "expected kite>=1, found 0\nno target for wine glass to be above")


def test_relative_position_by_hand():
    assert relative_position([50, 0, 60, 10], [0, 0, 10, 10]) == ["right of"]  # offset 50, shrunk to 48: dx 0.96
    assert relative_position([12, 0, 22, 10], [0, 0, 10, 10]) == ["right of"]  # offset 12 -> 10: dx 0.83
    assert relative_position([1, 0, 11, 10], [0, 0, 10, 10]) == []  # offset 1 -> 0
    assert relative_position([10, 10, 10, 10], [0, 0, 0, 0]) == ["right of", "below"]  # dx = dy = 0.707
    assert relative_position([0, 0, 10, 10], [0, 30, 10, 40]) == ["above"]
    assert relative_position([0, 0, 10, 10], [0, 30, 10, 40], position_threshold=2.0) == []  # 30 - 2 x 20 < 0


def test_color_attr():
    glass, apple = det("wine glass", 0.9, color="purple"), det("apple", 0.9, (20, 0, 30, 10), color="black")
    assert verdict(ATTR, glass, apple) == (True, "")
    assert verdict(ATTR, glass, {**apple, "color": "red"}) == (
        False, "expected black apple>=1, found 0 black; and 1 red")
    assert verdict(ATTR, {**glass, "color": "black"}, {**apple, "color": "purple"})[1].count("expected") == 2


def test_keep_objects_orders_and_limits():
    found = keep_objects([det("cat", s) for s in (0.4, 0.9, 0.35, 0.2)] + [det("dog", 0.1)], "two_object")
    assert list(found) == ["cat"] and [d["score"] for d in found["cat"]] == [0.9, 0.4, 0.35]
    assert keep_objects([det("cat", s) for s in (0.4, 0.9, 0.91)], "counting") == {"cat": [det("cat", 0.91)]}


def test_score_task_means_and_overall():
    def rec(i, k, meta, dets):
        return {"prompt_index": i, "image_index": k, "metadata": meta, "detections": dets}

    records = [rec(0, 0, SINGLE, [det("bench", 0.9)]), rec(0, 1, SINGLE, []),  # single_object 1/2
               rec(1, 0, COLOR, [det("car", 0.9, color="red")]),  # colors 1/1
               rec(2, 0, COUNT, [det("cat", 0.99)] * 3), rec(2, 1, COUNT, None)]  # counting 0/1, one missing
    got = score(records)
    assert got["tasks"] == {"single_object": 0.5, "colors": 1.0, "counting": 0.0}
    assert got["overall"] == pytest.approx(0.5) and (got["images"], got["missing"], got["prompts"]) == (4, 1, 3)
    assert got["correct_images"] == 0.5 and got["task_counts"]["single_object"] == [1, 2]
    assert score(records, counting_threshold=0.999)["tasks"]["counting"] == 0.0  # none kept: expected cat>=2
    with pytest.raises(ValueError, match="two records for prompt 0 image 0"):
        score(records + [rec(0, 0, SINGLE, [])])


# ---------------------------------------------------------------------------------------------------- prompts


def test_the_real_prompt_file(test_data, tmp_path, monkeypatch):
    path = test_data / "geneval" / "evaluation_metadata.jsonl"
    prompts = read_prompt_file(path)
    assert len(prompts) == 553 and prompts[0].text == "a photo of a bench" and prompts[0].categories == ("bench",)
    tags = [p.tag for p in prompts]
    assert {t: tags.count(t) for t in dict.fromkeys(tags)} == {
        "single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}
    names = (test_data / "geneval" / "object_names.txt").read_text().split("\n")
    assert list(GENEVAL_OBJECTS) == [n for n in names if n]
    assert resolve_prompts(path, limit=3)[1]["commit"] == "af4902f24d3ca90ebbb446dd9891a59e0f82725f"

    tampered = tmp_path / "evaluation_metadata.jsonl"
    tampered.write_text(path.read_text().replace("bench", "Bench", 1))
    with pytest.raises(PromptSetError, match="differs from the pinned"):
        read_prompt_file(tampered)
    with pytest.raises(PromptSetError, match="line 1 is not a GenEval prompt"):
        resolve_prompts(tampered, custom=True)  # "Bench" is none of GenEval's objects

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PromptSetError, match="not in the cache .*--prompt-file"):
        resolve_prompts()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copy(path, mirror)
    cached = fetch_prompts(url=(mirror / path.name).as_uri())
    assert cached == tmp_path / "hf" / "tcompose" / "geneval" / path.name
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompts, source = resolve_prompts(limit=5)  # offline: from the cache
    assert len(prompts) == 5 and source["sha256"] == SHA256 and json.loads(json.dumps(source)) == source


def test_a_prompt_subset_is_refused_naming_custom_prompts_and_prompts_n(test_data, tmp_path):
    lines = (test_data / "geneval" / "evaluation_metadata.jsonl").read_text().splitlines(keepends=True)
    subset = tmp_path / "first3.jsonl"
    subset.write_text("".join(lines[:3]))
    with pytest.raises(PromptSetError) as err:
        resolve_prompts(subset)
    assert "--custom-prompts" in str(err.value) and "--prompts N" in str(err.value)
    assert len(resolve_prompts(subset, custom=True)[0]) == 3  # the flag it names serves the subset


def test_a_higher_prompts_count_is_the_same_prompt_source(test_data):
    """--prompts 40 then 41 of the same file: the first 40 are a prefix, run.json's source must not differ."""
    path = test_data / "geneval" / "evaluation_metadata.jsonl"
    (p40, s40), (p41, s41) = resolve_prompts(path, limit=40), resolve_prompts(path, limit=41)
    assert s40 == s41 and p41[:40] == p40 and s40["file_prompts"] == 553


def test_offline_without_cache_names_tcompose_download_geneval(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PromptSetError, match="`tcompose download geneval`"):
        resolve_prompts()
