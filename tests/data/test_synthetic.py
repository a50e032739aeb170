"""The generated COCO-format scenes: same loaders, masks that match the drawn pixels, deterministic."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from tcompose.data.coco import CocoDataset, ImageReadError, annotation_mask
from tcompose.data.synthetic import CATEGORIES, COLOURS, TABLE_RGB, make_scenes
from tcompose.data.vocab import match_categories


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    t0 = time.perf_counter()
    make_scenes(out, n_images=64, size=64, seed=0)
    return out, time.perf_counter() - t0


def _pixels(coco, image):
    return np.asarray(Image.open(io.BytesIO(coco.read_image(image))).convert("RGB")).astype(float)


def test_fast_and_loads_through_coco(scenes):
    out, seconds = scenes
    assert seconds < 3.0, f"64 scenes took {seconds:.2f} s"
    coco = CocoDataset(out, "train2017")
    assert len(coco) == 64 and coco.categories == CATEGORIES
    n_objects = []
    for image in coco:
        assert (image.width, image.height) == (64, 64)
        assert 1 <= len(image.captions) <= 5 and len(set(image.captions)) == len(image.captions)
        assert 1 <= len(image.annotations) <= 3
        names = coco.category_names(image)
        assert len(names) == len(image.annotations)  # distinct categories per image
        n_objects.append(len(names))
        for caption in image.captions:  # every caption names every object, once
            assert sorted(c for _, c in match_categories(caption, names)) == sorted(names), caption
    assert set(n_objects) == {1, 2, 3}


def test_masks_match_drawn_pixels(scenes):
    out, _ = scenes
    coco = CocoDataset(out)
    for image in coco:
        pixels = _pixels(coco, image)
        union = np.zeros((64, 64), bool)
        for ann in image.annotations:
            mask = annotation_mask(ann, 64, 64)
            assert not (mask & union).any(), "objects overlap"
            union |= mask
            assert mask.sum() == ann["area"] >= (0.25 * 64) ** 2 * 0.35  # big enough for an 8x8 map
            colour = np.asarray(COLOURS[ann["color"]], float)
            assert np.abs(pixels[mask].mean(0) - colour).max() < 6, (image.id, ann["color"])
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        background = ~union  # no object colour outside the masks (2 pixels off the edges: JPEG ringing)
        for _ in range(2):
            b = background
            b[1:-1, 1:-1] &= b[:-2, 1:-1] & b[2:, 1:-1] & b[1:-1, :-2] & b[1:-1, 2:]
        assert np.abs(pixels[background].mean(0) - np.asarray(TABLE_RGB)).max() < 15
        for ann in image.annotations:
            far = np.abs(pixels[background] - np.asarray(COLOURS[ann["color"]])).max(1)
            assert (far > 40).mean() > 0.99, "object colour outside its mask"


def test_deterministic_and_prefix_stable(tmp_path):
    a = make_scenes(tmp_path / "a", n_images=6, size=48, seed=3)
    b = make_scenes(tmp_path / "b", n_images=6, size=48, seed=3)
    c = make_scenes(tmp_path / "c", n_images=6, size=48, seed=4)
    d = make_scenes(tmp_path / "d", n_images=9, size=48, seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 8
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    ca, cd = CocoDataset(a), CocoDataset(d)
    assert [ca[i] for i in ca.ids] == [cd[i] for i in ca.ids]  # more images extend, not reshuffle
    for i in ca.ids:
        assert (a / "train2017" / ca[i].file_name).read_bytes() == (d / "train2017" / cd[i].file_name).read_bytes()


def test_options_and_corrupt_image(tmp_path):
    out = make_scenes(tmp_path / "s", n_images=3, size=96, split="val2017", corrupt=1, max_objects=1)
    coco = CocoDataset(out, "val2017")
    assert len(coco) == 4 and all(len(i.annotations) == 1 and i.width == 96 for i in coco)
    for image in list(coco)[:3]:
        assert coco.read_image(image)
    with pytest.raises(ImageReadError):
        coco.read_image(coco[4])
    assert coco[4].captions and coco[4].annotations  # annotated like any other image
    with pytest.raises(ValueError, match="max_objects"):
        make_scenes(tmp_path / "t", max_objects=9)
