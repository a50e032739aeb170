"""train-clip's eval chart: per-category zero-shot top-1 by hand, the grouping rules, the picture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tcompose.clip.eval import category_groups, group_top1, per_category_top1, write_eval_chart
from tcompose.data.categories import COCO_80


def test_per_category_top1_by_hand():
    classes = torch.eye(3)
    images = torch.tensor([[1.0, 0.1, 0], [0.2, 1.0, 0], [1.0, 0.0, 0.5], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 2, 2])  # the third image is closest to class 0: one of class 2's two is wrong
    got = per_category_top1(images, classes, labels, ["cat", "dog", "cup"])
    assert got == {"cat": {"top1": 1.0, "crops": 1}, "dog": {"top1": 1.0, "crops": 1}, "cup": {"top1": 0.5, "crops": 2}}


def test_few_categories_are_one_bar_each_largest_first():
    assert category_groups({"ball": 3, "box": 8, "cup": 5}) == {"box": ["box"], "cup": ["cup"], "ball": ["ball"]}


def test_many_coco_categories_group_by_supercategory_and_the_rest_merge():
    crops = {n: 1 for n in COCO_80}
    groups = category_groups(crops)
    assert len(groups) == 12 and set(groups) == {"person", "vehicle", "outdoor", "animal", "accessory", "sports",
                                                  "kitchen", "food", "furniture", "electronic", "appliance", "indoor"}
    assert groups["animal"][:2] == ["bird", "cat"]
    # phrases from --from-masks are not COCO names: one bar each, the smallest merged into "other (N)"
    phrases = {f"thing {i}": 100 - i for i in range(30)}
    groups = category_groups(phrases)
    assert list(groups)[:11] == [f"thing {i}" for i in range(11)] and list(groups)[11] == "other (19)"
    assert sum(len(v) for v in groups.values()) == 30


def test_group_top1_weighs_by_crops():
    per = {"cat": {"top1": 1.0, "crops": 1}, "dog": {"top1": 0.5, "crops": 3}}
    assert group_top1(per, {"animal": ["cat", "dog"]}) == {"animal": pytest.approx(0.625)}


def test_chart_is_written_only_with_per_category_results(tmp_path):
    before = {"zero_shot_top1": 0.25, "per_category": {"cat": {"top1": 0.0, "crops": 2}, "dog": {"top1": 0.5, "crops": 2}}}
    after = {"zero_shot_top1": 0.75, "categories": 2, "chance_top1": 0.5,
             "per_category": {"cat": {"top1": 1.0, "crops": 2}, "dog": {"top1": 0.5, "crops": 2}}}
    assert write_eval_chart({"before": before, "after": after}, tmp_path / "eval.png")
    px = np.asarray(Image.open(tmp_path / "eval.png").convert("RGB")).astype(int)
    blue = (np.abs(px - (31, 120, 181)).sum(-1) < 6).sum()
    grey = (np.abs(px - (179, 179, 179)).sum(-1) < 6).sum()
    assert blue > 2 * grey > 0  # after: 1.0 + 0.5 of bar length, before: 0.0 + 0.5
    assert not write_eval_chart({"before": None, "after": after}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
