"""Category constants against the official lists in the test data."""

from __future__ import annotations

import json

from tcompose.data.categories import COCO_80, COCO_SUPERCATEGORIES


def test_coco_supercategories_are_the_official_ones(test_data):
    cats = json.loads((test_data / "coco-mini-val2017" / "annotations" / "instances_val2017.json").read_text())
    official: dict[str, list[str]] = {}
    for c in cats["categories"]:
        official.setdefault(c["supercategory"], []).append(c["name"])
    assert {k: list(v) for k, v in COCO_SUPERCATEGORIES.items()} == official
    assert [n for names in COCO_SUPERCATEGORIES.values() for n in names] == list(COCO_80)
