"""Reading a COCO folder: the real val2017 sample (polygons, crowd RLE) and generated folders for errors."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tcompose.data.coco import CocoDataset, CocoError, ImageReadError, annotation_mask, annotation_rle
from tcompose.data.synthetic import make_scenes


@pytest.fixture(scope="module")
def mini(coco_mini):
    return CocoDataset(coco_mini, "val2017")


def test_images_captions_and_categories(mini, coco_mini):
    raw_caps = json.loads((coco_mini / "annotations" / "captions_val2017.json").read_text())
    raw_inst = json.loads((coco_mini / "annotations" / "instances_val2017.json").read_text())
    assert len(mini) == 79 and mini.ids == sorted(mini.ids)
    assert len(mini.categories) == 80 and mini.categories[1] == "person" and mini.categories[90] == "toothbrush"
    image = mini[397133]
    assert (image.file_name, image.width, image.height) == ("000000397133.jpg", 640, 427)
    in_file_order = [a["caption"] for a in raw_caps["annotations"] if a["image_id"] == 397133]
    assert list(image.captions) == in_file_order and len(in_file_order) == 5
    assert [a["id"] for a in image.annotations] == [a["id"] for a in raw_inst["annotations"] if a["image_id"] == 397133]
    assert "person" in mini.category_names(image) and "oven" in mini.category_names(image)
    assert sum(len(i.annotations) for i in mini) == 624
    assert mini.image_path(image) == coco_mini / "val2017" / "000000397133.jpg"


def test_masks_agree_with_pycocotools(mini, coco_mini):
    from pycocotools.coco import COCO

    reference = COCO(str(coco_mini / "annotations" / "instances_val2017.json"))  # the COCO API's own decoding
    crowd = 0
    for image in mini:
        for ann in image.annotations:
            mask = annotation_mask(ann, image.height, image.width)
            assert mask.shape == (image.height, image.width) and mask.dtype == bool
            rle = annotation_rle(ann, image.height, image.width)
            assert mask.sum() == mask_utils.area(rle) > 0
            assert (mask == reference.annToMask(ann).astype(bool)).all(), ann["id"]
            if ann["iscrowd"]:  # uncompressed RLE
                crowd += 1
                assert isinstance(ann["segmentation"]["counts"], list)
            elif ann["area"] > 500:  # polygons: COCO's area is the polygon's, close to the pixel count
                assert abs(mask.sum() - ann["area"]) / ann["area"] < 0.1, ann["id"]
    assert crowd == 5


def test_compressed_rle(mini):
    image = mini[217285]
    ann = next(a for a in image.annotations if a["iscrowd"])
    mask = annotation_mask(ann, image.height, image.width)
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    compressed = {**ann, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}
    assert (annotation_mask(compressed, image.height, image.width) == mask).all()
    with pytest.raises(CocoError, match="RLE size"):
        annotation_mask(compressed, image.height + 1, image.width)
    with pytest.raises(CocoError, match="neither polygons nor RLE"):
        annotation_mask({"id": 7, "segmentation": "x"}, 4, 4)


def test_category_mask_union_and_crowd(mini):
    image = mini[217285]  # persons: instances and one crowd region
    persons = [a for a in image.annotations if mini.categories[a["category_id"]] == "person"]
    assert any(a["iscrowd"] for a in persons) and any(not a["iscrowd"] for a in persons)
    union = np.zeros((image.height, image.width), bool)
    for a in persons:
        union |= annotation_mask(a, image.height, image.width)
    assert (mini.category_mask(image, "person") == union).all()
    assert (mini.category_mask(image, 1) == union).all()
    no_crowd = mini.category_mask(image, "person", include_crowd=False)
    assert no_crowd.sum() < union.sum() and not (no_crowd & ~union).any()
    crowd_only = dataclasses.replace(image, annotations=tuple(a for a in persons if a["iscrowd"]))
    assert mini.category_names(crowd_only) == ["person"]
    assert mini.category_names(crowd_only, include_crowd=False) == []
    assert not mini.category_mask(crowd_only, "person", include_crowd=False).any()


def test_read_image(mini, tmp_path):
    image = mini[mini.ids[0]]
    assert mini.read_image(image) == mini.image_path(image).read_bytes()
    out = make_scenes(tmp_path / "s", n_images=2, size=32, corrupt=1)
    coco = CocoDataset(out)
    assert len(coco.read_image(coco[1])) > 0
    with pytest.raises(ImageReadError, match="does not decode") as e:
        coco.read_image(coco[3])
    assert e.value.path.name == "000000000003.jpg" and "decode" in e.value.reason
    os.remove(coco.image_path(coco[2]))
    with pytest.raises(ImageReadError, match="cannot be read"):
        coco.read_image(coco[2])
    with pytest.raises(ImageReadError, match="is 32x32 but the annotations say 33x32"):
        coco.read_image(dataclasses.replace(coco[1], width=33))
    assert coco.read_image(dataclasses.replace(coco[1], width=33), check_size=False)


def test_clear_errors(coco_mini, tmp_path):
    with pytest.raises(CocoError, match="does not exist: pass the COCO folder"):
        CocoDataset(tmp_path / "nowhere", "val2017")
    with pytest.raises(CocoError) as e:
        CocoDataset(coco_mini, "train2017")
    msg = str(e.value)
    assert "annotations/captions_train2017.json is missing" in msg and "--split val2017" in msg
    assert "\n" not in msg and isinstance(e.value, ValueError)
    # only the files the caller needs are required
    out = make_scenes(tmp_path / "s", n_images=2, size=32, split="val2017")
    (out / "annotations" / "instances_val2017.json").unlink()
    assert len(CocoDataset(out, "val2017", instances=False)) == 2
    with pytest.raises(CocoError, match="instances_val2017.json is missing: download"):
        CocoDataset(out, "val2017")
    (out / "annotations" / "captions_val2017.json").write_text('{"images": [')
    with pytest.raises(CocoError, match=r"captions_val2017.json is not valid JSON"):
        CocoDataset(out, "val2017", instances=False)
    (out / "annotations" / "captions_val2017.json").write_text('{"annotations": []}')
    with pytest.raises(CocoError, match="has no 'images' list"):
        CocoDataset(out, "val2017", instances=False)
    out2 = make_scenes(tmp_path / "s2", n_images=1, size=32)
    (out2 / "train2017" / "000000000001.jpg").unlink()
    (out2 / "train2017").rmdir()
    with pytest.raises(CocoError, match="train2017 is missing: put the train2017 images there"):
        CocoDataset(out2)
