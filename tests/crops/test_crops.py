"""The crops stage: box maths by hand, crops checked against pycocotools and PIL, skips, resume, workers."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from tcompose.crops.geometry import CLIP_MEAN_RGB, crop_box, cut, inside_fraction, output_size
from tcompose.crops.stage import STATS_KEYS, CropsConfig, run, summary_line
from tcompose.data.coco import CocoError
from tcompose.data.synthetic import make_scenes
from tcompose.io.datasets import MANIFEST, DatasetError, iter_rows, shard_files

GREY = np.array(CLIP_MEAN_RGB, dtype=float)


# ----------------------------------------------------------------------------------------------------------
# Box maths (hand-computed)


def test_crop_box_by_hand():
    # margin 0.1 of [10, 20, 30, 10]: x 7..43 (36 wide), y 19..31 (12 high); square grows y by 24 around the centre
    assert crop_box([10, 20, 30, 10], 0.1, square=False) == (7, 19, 43, 31)
    assert crop_box([10, 20, 30, 10], 0.1, square=True) == (7, 7, 43, 43)
    # float noise: 10 + 20 + 0.1 * 20 = 32.000000000000004 must not become 33
    assert crop_box([10, 0, 20, 20], 0.1, square=False) == (8, -2, 32, 22)
    # fractional boxes: floor the top-left, ceil the bottom-right; an odd extra pixel goes right/bottom
    assert crop_box([1.5, 2.25, 3.0, 4.5], 0.0, square=False) == (1, 2, 5, 7)
    assert crop_box([1.5, 2.25, 3.0, 4.5], 0.0, square=True) == (1, 2, 6, 7)
    assert crop_box([0, 0, 5, 2], 0.0, square=True) == (0, -1, 5, 4)
    for bad in ([0, 0, 0, 5], [0, 0, 5, -1], [0, 0, float("nan"), 5], [1, 2, 3]):
        with pytest.raises(ValueError, match="bbox"):
            crop_box(bad)
    with pytest.raises(ValueError, match="margin"):
        crop_box([0, 0, 5, 5], margin=-0.1)


def test_crop_box_contains_the_box_around_its_centre():
    rng = random.Random(0)
    for _ in range(500):
        x, y, w, h = rng.uniform(-20, 600), rng.uniform(-20, 600), rng.uniform(0.5, 400), rng.uniform(0.5, 400)
        m = rng.choice([0.0, 0.1, 0.25, 1.0])
        x0, y0, x1, y1 = crop_box([x, y, w, h], m, square=False)  # the box plus margin, widened to whole pixels
        assert x - m * w - 1 < x0 <= x - m * w + 1e-6 and x + w + m * w - 1e-6 <= x1 < x + w + m * w + 1
        assert y - m * h - 1 < y0 <= y - m * h + 1e-6 and y + h + m * h - 1e-6 <= y1 < y + h + m * h + 1
        s0, t0, s1, t1 = crop_box([x, y, w, h], m, square=True)  # that region grown to a square around its centre
        assert s1 - s0 == t1 - t0 == max(x1 - x0, y1 - y0) and s0 <= x0 and t0 <= y0 and s1 >= x1 and t1 >= y1
        assert abs((s0 + s1) - (x0 + x1)) <= 1 and abs((t0 + t1) - (y0 + y1)) <= 1


def test_cut_pads_outside_the_image():
    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    out = cut(pixels, (-1, 2, 3, 6), (9, 8, 7))
    assert out.shape == (4, 4, 3)
    assert (out[:2, 1:] == pixels[2:4, 0:3]).all()
    assert (out[:, 0] == (9, 8, 7)).all() and (out[2:] == (9, 8, 7)).all()
    assert (cut(pixels, (10, 10, 12, 11), 0) == 0).all()  # wholly outside: all fill
    mask = np.ones((4, 5), bool)
    assert cut(mask, (3, -1, 6, 1), False).tolist() == [[False] * 3, [True, True, False]]
    assert inside_fraction((-1, 2, 3, 6), 5, 4) == 6 / 16 and inside_fraction((0, 0, 5, 4), 5, 4) == 1.0


def test_output_size():
    assert output_size(100, 100, 224) == (224, 224)
    assert output_size(300, 150, 224) == (224, 112)
    assert output_size(150, 101, 224) == (224, 151)  # 150.83 rounds to 151
    assert output_size(3, 1000, 224) == (1, 224)


# ----------------------------------------------------------------------------------------------------------
# A hand-made COCO folder: image and annotation ids from 0, every segmentation encoding, edge cases


def _pattern(w, h, seed):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([40 + 3 * xx, 30 + 2 * yy, 200 - 2 * xx - yy], -1).astype(float)
    rng = np.random.default_rng(seed)
    for _ in range(4):  # a few flat coloured blocks
        x, y = rng.integers(0, w - 12), rng.integers(0, h - 12)
        img[y : y + 12, x : x + 12] = rng.integers(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _rle_counts(mask):
    """Uncompressed COCO RLE counts: run lengths in column-major order, the first one of background."""
    flat = np.concatenate([[False], mask.T.reshape(-1)])
    return np.diff(np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]), [flat.size - 1]])).tolist()


@pytest.fixture()
def handmade(tmp_path):
    from pycocotools import mask as mask_utils

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    images = [
        {"id": 0, "file_name": "000000000000.jpg", "width": 80, "height": 60},
        {"id": 1, "file_name": "000000000001.jpg", "width": 64, "height": 64},
        {"id": 2, "file_name": "000000000002.jpg", "width": 32, "height": 32},  # file missing
        {"id": 3, "file_name": "000000000003.jpg", "width": 32, "height": 32},  # corrupt JPEG
    ]
    for im in images[:2]:
        Image.fromarray(_pattern(im["width"], im["height"], im["id"])).save(
            root / "val2017" / im["file_name"], quality=98, subsampling=0)
    ok = io.BytesIO()
    Image.fromarray(_pattern(32, 32, 3)).save(ok, format="JPEG")
    (root / "val2017" / "000000000003.jpg").write_bytes(ok.getvalue()[:40] + b"\x00" * 300)

    blob = np.zeros((64, 64), bool)
    blob[10:30, 40:64] = True  # reaches the right edge: its crop is padded
    blob[12:16, 44:50] = False
    crowd, box = np.zeros((60, 80), bool), np.zeros((60, 80), bool)
    crowd[30:58, 2:40] = True
    box[20:26, 45:75] = True
    compressed = mask_utils.encode(np.asfortranarray(blob.astype(np.uint8)))
    anns = [
        # polygon (ann id 0, image id 0), a kite shape near the top-left corner
        {"id": 0, "image_id": 0, "category_id": 1, "iscrowd": 0,
         "segmentation": [[3.5, 14.0, 20.0, 1.5, 36.5, 14.0, 20.0, 27.0]]},
        # uncompressed RLE, not crowd, no area / bbox fields: both computed from the mask
        {"id": 7, "image_id": 0, "category_id": 2, "iscrowd": 0,
         "segmentation": {"size": [60, 80], "counts": _rle_counts(box)}},
        # crowd region, uncompressed RLE: left out unless include_crowd
        {"id": 8, "image_id": 0, "category_id": 3, "iscrowd": 1,
         "segmentation": {"size": [60, 80], "counts": _rle_counts(crowd)}},
        # compressed RLE (string counts) on image 1, touching the image's right edge
        {"id": 3, "image_id": 1, "category_id": 2, "iscrowd": 0,
         "segmentation": {"size": [64, 64], "counts": compressed["counts"].decode()}},
        # too small (area field 50 < min_area)
        {"id": 4, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 9, 1, 9, 7, 1, 7]],
         "area": 48.0, "bbox": [1, 1, 8, 6]},
        # RLE of the wrong size and no area: invalid, listed
        {"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": {"size": [10, 10], "counts": [100]}},
        *({"id": i, "image_id": im, "category_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 30, 1, 30, 30, 1, 30]],
           "area": 841.0, "bbox": [1.0, 1.0, 29.0, 29.0]} for i, im in ((6, 2), (9, 3))),
    ]
    # area as COCO computes it (the mask's pixels); bbox: the polygon's extent, or pycocotools' box of an RLE
    polygon = mask_utils.merge(mask_utils.frPyObjects(anns[0]["segmentation"], 60, 80))
    anns[0].update(area=float(mask_utils.area(polygon)), bbox=[3.5, 1.5, 33.0, 25.5])
    for a, rle in ((anns[2], mask_utils.encode(np.asfortranarray(crowd.astype(np.uint8)))), (anns[3], compressed)):
        a.update(area=float(mask_utils.area(rle)), bbox=[float(v) for v in mask_utils.toBbox(rle)])
    categories = [{"id": 1, "name": "kite"}, {"id": 2, "name": "box"}, {"id": 3, "name": "people"}]
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return root


def _reference_masks(root):
    """Each annotation's mask as pycocotools' COCO API decodes it."""
    from pycocotools.coco import COCO

    coco = COCO(str(root / "annotations" / "instances_val2017.json"))
    return coco, {a["id"]: coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds())}


def _expected(src: Image.Image, box, size, mask=None) -> np.ndarray:
    """The crop computed another way: PIL paste onto a grey canvas (and a PIL composite for masks), resized."""
    x0, y0, x1, y1 = box
    canvas = Image.new("RGB", (x1 - x0, y1 - y0), CLIP_MEAN_RGB)
    canvas.paste(src.crop((max(x0, 0), max(y0, 0), min(x1, src.width), min(y1, src.height))),
                 (max(x0, 0) - x0, max(y0, 0) - y0))
    if mask is not None:
        keep = Image.fromarray(mask).crop(box)  # PIL fills outside the image with 0 (False)
        canvas = Image.composite(canvas, Image.new("RGB", canvas.size, CLIP_MEAN_RGB), keep)
    long = max(canvas.size)
    target = tuple(max(1, int(np.floor(s * size / long + 0.5))) for s in canvas.size)
    return np.asarray(canvas.resize(target, Image.BICUBIC) if target != canvas.size else canvas, dtype=float)


def _pixels(row) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"), dtype=float)


def test_handmade_crops_match_pycocotools(handmade, tmp_path):
    from pycocotools import mask as mask_utils

    out = tmp_path / "out"
    manifest = run(CropsConfig(handmade, out, split="val2017", min_area=100, size=48, workers=1), progress=False)
    rows = list(iter_rows(out))
    assert [(r["image_id"], r["ann_id"]) for r in rows] == [(0, 0), (0, 7), (1, 3)]
    coco, ref = _reference_masks(handmade)
    for r in rows:
        ann = coco.anns[r["ann_id"]] if "bbox" in coco.anns[r["ann_id"]] else None
        mask = ref[r["ann_id"]]
        # the row's box is the annotation's (or, without one, pycocotools' box of the mask)
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        expected_bbox = ann["bbox"] if ann else mask_utils.toBbox(rle).tolist()
        assert r["bbox"] == pytest.approx(expected_bbox, abs=1e-4)
        assert r["crop_box"] == list(crop_box(expected_bbox, 0.1, True))
        ys, xs = np.nonzero(mask)  # every mask pixel lies inside the crop
        x0, y0, x1, y1 = r["crop_box"]
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
        name = coco.cats[r["category_id"]]["name"]
        assert r["category"] == name and r["text"] == f"a photo of a {name}"
        src = Image.open(handmade / "val2017" / coco.imgs[r["image_id"]]["file_name"]).convert("RGB")
        got = _pixels(r)
        assert got.shape == (48, 48, 3)
        assert np.abs(got - _expected(src, r["crop_box"], 48)).mean() < 2.0
    # ann 3 reaches past the right edge (x1 > 64): the padded columns are CLIP grey, not shifted pixels
    edge = rows[2]
    assert edge["crop_box"][2] > 64 and edge["image"]["path"] == "000000000001_3.jpg"
    pad_cols = int(np.floor((edge["crop_box"][2] - 64) * 48 / (edge["crop_box"][2] - edge["crop_box"][0])))
    assert np.abs(_pixels(edge)[:, -pad_cols + 1 :] - GREY).max() < 6

    stats = manifest["stats"]
    assert set(stats) == set(STATS_KEYS)
    assert stats == {**dict.fromkeys(STATS_KEYS, 0), "images": 4, "images_with_crops": 2, "crops": 3,
                     "crops_padded": 2, "annotations": 8, "annotations_skipped_crowd": 1,
                     "annotations_skipped_small": 1, "annotations_skipped_invalid": 1,
                     "annotations_skipped_unreadable_image": 2, "images_skipped_unreadable": 2}
    reasons = {(s["image_id"], s["ann_id"]): s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {(1, 5), (2, None), (3, None)}
    assert "RLE size [10, 10] differs" in reasons[(1, 5)]
    assert reasons[(2, None)].startswith("image cannot be read")
    assert reasons[(3, None)].startswith("image does not decode")
    assert manifest["kind"] == "crops" and manifest["config"]["margin"] == 0.1


def test_crowd_masked_and_categories(handmade, tmp_path):
    _, ref = _reference_masks(handmade)
    cfg = dict(split="val2017", min_area=100, size=40, workers=1)
    run(CropsConfig(handmade, tmp_path / "crowd", include_crowd=True, **cfg), progress=False)
    crowd = {r["ann_id"]: r for r in iter_rows(tmp_path / "crowd")}
    assert sorted(crowd) == [0, 3, 7, 8] and crowd[8]["text"] == "a photo of a people"
    assert crowd[8]["bbox"] == [2.0, 30.0, 38.0, 28.0]  # pycocotools' box of the crowd mask

    run(CropsConfig(handmade, tmp_path / "masked", include_crowd=True, masked=True, **cfg), progress=False)
    src = Image.open(handmade / "val2017" / "000000000000.jpg").convert("RGB")
    for r in iter_rows(tmp_path / "masked"):
        if r["image_id"] != 0:
            continue
        got = _pixels(r)
        assert np.abs(got - _expected(src, r["crop_box"], 40, ref[r["ann_id"]])).mean() < 2.0
        # away from the mask (resampled onto the crop's pixel grid, grown by 2 pixels) everything is grey
        near = Image.fromarray(ref[r["ann_id"]].astype(np.uint8) * 255).crop(r["crop_box"])
        near = near.resize(got.shape[1::-1], Image.BOX).filter(ImageFilter.MaxFilter(5))
        outside = np.asarray(near) == 0
        err = np.abs(got[outside] - GREY)
        assert outside.sum() > 20 and err.mean() < 1.0 and err.max() < 20  # JPEG ringing near the mask's edge
        plain = _pixels(crowd[r["ann_id"]])
        assert np.abs(plain[outside] - GREY).max() > 40  # the unmasked crop shows the image there

    run(CropsConfig(handmade, tmp_path / "box", categories=("box",), **cfg), progress=False)
    rows = list(iter_rows(tmp_path / "box"))
    assert [r["ann_id"] for r in rows] == [7, 3]
    with pytest.raises(ValueError, match="--categories car: not in"):
        run(CropsConfig(handmade, tmp_path / "car", categories=("car",), **cfg), progress=False)


def test_non_square_sizes(handmade, tmp_path):
    run(CropsConfig(handmade, tmp_path / "ns", split="val2017", min_area=100, size=50, square=False, margin=0.0,
                    workers=1), progress=False)
    rows = {r["ann_id"]: r for r in iter_rows(tmp_path / "ns")}
    # boxes [3.5, 1.5, 33, 25.5] -> 34x26 pixels (ann 0), 30x6 (ann 7), 24x20 (ann 3); the longer side becomes 50
    assert {k: r["crop_box"] for k, r in rows.items()} == {0: [3, 1, 37, 27], 7: [45, 20, 75, 26], 3: [40, 10, 64, 30]}
    sizes = {k: Image.open(io.BytesIO(r["image"]["bytes"])).size for k, r in rows.items()}
    assert sizes == {0: (50, 38), 7: (50, 10), 3: (50, 42)}


def test_loads_with_datasets_and_pyarrow(handmade, tmp_path):
    import datasets

    out = tmp_path / "out"
    # one image per shard: images 2 and 3 give no crops, so their shards are empty (and must still load)
    run(CropsConfig(handmade, out, split="val2017", min_area=100, size=32, workers=1, shard_size=1), progress=False)
    assert [pq.read_metadata(f).num_rows for f in shard_files(out)] == [2, 1, 0, 0]
    ds = datasets.load_dataset("parquet", data_dir=str(out), cache_dir=str(tmp_path / "hf"))["train"]
    assert len(ds) == 3 and ds.column_names == ["image", "text", "category", "category_id", "image_id", "ann_id",
                                                "bbox", "crop_box"]
    row = ds[0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (32, 32)
    assert row["image_id"] == 0 and row["ann_id"] == 0 and len(row["crop_box"]) == 4
    table = pq.read_table(shard_files(out)[0])
    assert table.schema.field("crop_box").type.value_type == pa.int32()
    assert table.schema.field("bbox").type.value_type == pa.float32()


def test_real_coco_sample(coco_mini, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "real"
    manifest = run(CropsConfig(coco_mini, out, split="val2017", limit=4, workers=1, size=64), progress=False)
    ref = COCO(str(coco_mini / "annotations" / "instances_val2017.json"))
    ids = sorted(ref.getImgIds())[:4]
    expected = [a for i in ids for a in ref.loadAnns(ref.getAnnIds(imgIds=i)) if not a["iscrowd"] and a["area"] >= 1024]
    rows = list(iter_rows(out))
    assert [r["ann_id"] for r in rows] == [a["id"] for a in expected] and len(rows) >= 4
    for r, a in zip(rows, expected):
        assert r["bbox"] == pytest.approx(a["bbox"], abs=1e-3) and r["category"] == ref.cats[a["category_id"]]["name"]
        ys, xs = np.nonzero(ref.annToMask(a))
        x0, y0, x1, y1 = r["crop_box"]
        assert x1 - x0 == y1 - y0 and x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
    assert manifest["stats"]["images"] == 4 and manifest["stats"]["crops"] == len(rows)


# ----------------------------------------------------------------------------------------------------------
# Workers, resume, settings, errors, summary


@pytest.fixture()
def scenes(tmp_path):
    return make_scenes(tmp_path / "scenes", n_images=10, size=64, seed=3, corrupt=1)


def test_one_and_two_workers_write_the_same(scenes, tmp_path):
    one = run(CropsConfig(scenes, tmp_path / "one", min_area=100, shard_size=4, size=32, workers=1), progress=False)
    two = run(CropsConfig(scenes, tmp_path / "two", min_area=100, shard_size=4, size=32, workers=2), progress=False)
    assert list(iter_rows(tmp_path / "one")) == list(iter_rows(tmp_path / "two"))
    assert one["stats"] == two["stats"] and one["skipped"] == two["skipped"] and one["fingerprint"] == two["fingerprint"]
    assert one["stats"]["images_skipped_unreadable"] == 1 and one["stats"]["crops"] > 10


def test_resume_after_a_kill(scenes, tmp_path, shard_writes):
    cfg = dict(min_area=100, shard_size=3, size=32)
    reference = run(CropsConfig(scenes, tmp_path / "ref", workers=1, **cfg), progress=False)
    expected = list(iter_rows(tmp_path / "ref"))

    out = tmp_path / "out"
    shard_writes.kill_after_first()
    with pytest.raises(KeyboardInterrupt):
        run(CropsConfig(scenes, out, workers=2, **cfg), progress=False)
    assert [p.name for p in shard_files(out)] == ["train-00000.parquet"] and not (out / MANIFEST).exists()
    (out / ".train-00001.parquet.12345.tmp").write_bytes(b"half a shard")  # what a kill mid-write leaves

    written = shard_writes.record()
    manifest = run(CropsConfig(scenes, out, workers=1, **cfg), progress=False)
    assert written == [1, 2, 3] and not list(out.glob(".*.tmp"))
    assert list(iter_rows(out)) == expected
    assert manifest["stats"] == reference["stats"] and manifest["skipped"] == reference["skipped"]

    (out / "train-00003.parquet").unlink()  # a lost last shard is rewritten, nothing else
    written.clear()
    run(CropsConfig(scenes, out, workers=1, **cfg), progress=False)
    assert written == [3] and list(iter_rows(out)) == expected
    ids = [(r["image_id"], r["ann_id"]) for r in iter_rows(out)]
    assert len(ids) == len(set(ids))  # no duplicates


def test_other_settings_are_refused(scenes, tmp_path):
    out = tmp_path / "out"
    run(CropsConfig(scenes, out, min_area=100, size=32, workers=1), progress=False)
    for other in (dict(margin=0.2), dict(square=False), dict(masked=True), dict(size=40), dict(shard_size=5)):
        with pytest.raises(DatasetError, match="other settings"):
            run(CropsConfig(scenes, out, **{"min_area": 100, "size": 32, "workers": 1, **other}), progress=False)
    run(CropsConfig(scenes, out, min_area=100, size=32, workers=2), progress=False)  # workers is not a setting


def test_errors_are_clear_and_write_nothing(scenes, tmp_path):
    out = tmp_path / "out"
    for kwargs, message in ((dict(template="a photo"), "must use {category}"), (dict(margin=-1.0), "--margin"),
                            (dict(template="a {category} of {what}"), "must use {category}"), (dict(size=0), "--size"),
                            (dict(min_area=-5), "--min-area"), (dict(workers=0), "--workers"), (dict(limit=0), "--limit")):
        with pytest.raises(ValueError, match=message):
            run(CropsConfig(scenes, out, **kwargs), progress=False)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        run(CropsConfig(scenes, out), rank=2, world_size=2, progress=False)
    with pytest.raises(CocoError, match="instances_val2017.json is missing"):
        run(CropsConfig(scenes, out, split="val2017"), progress=False)
    assert not out.exists()


def test_several_processes_and_summary(scenes, tmp_path, capsys):
    single = run(CropsConfig(scenes, tmp_path / "one", min_area=100, shard_size=3, size=32, workers=1), progress=False)
    out = tmp_path / "two"
    summary = run(CropsConfig(scenes, out, min_area=100, shard_size=3, size=32, workers=1), rank=1, world_size=2,
                  progress=False)
    assert summary["shards_written"] == 2 and not (out / MANIFEST).exists()
    manifest = run(CropsConfig(scenes, out, min_area=100, shard_size=3, size=32, workers=1), rank=0, world_size=2,
                   progress=True)
    assert list(iter_rows(out)) == list(iter_rows(tmp_path / "one")) and manifest["stats"] == single["stats"]
    err = capsys.readouterr().err
    assert f"crops: {manifest['num_rows']} crops from 11 images" in " ".join(err.split())
    assert "unreadable image: 1" in summary_line(manifest, out) and "crops/s" in " ".join(err.split())


def test_masked_crop_of_a_degenerate_polygon_is_skipped_and_counted(handmade, tmp_path):
    """A polygon of collinear points covers no pixel: its --masked crop would be all grey with a label."""
    ann_file = handmade / "annotations" / "instances_val2017.json"
    data = json.loads(ann_file.read_text())
    data["annotations"].append({"id": 11, "image_id": 0, "category_id": 1, "iscrowd": 0, "area": 400.0,
                                "bbox": [40.0, 30.0, 20.0, 20.0], "segmentation": [[40, 30, 50, 40, 60, 50]]})
    ann_file.write_text(json.dumps(data))
    cfg = dict(split="val2017", min_area=100, size=40, workers=1)
    manifest = run(CropsConfig(handmade, tmp_path / "masked", masked=True, **cfg), progress=False)
    assert 11 not in {r["ann_id"] for r in iter_rows(tmp_path / "masked")}
    assert manifest["stats"]["annotations_skipped_empty_mask"] == 1
    assert any(s["ann_id"] == 11 and "degenerate polygon" in s["reason"] for s in manifest["skipped"])
    assert "empty mask: 1" in summary_line(manifest, tmp_path / "masked")
    plain = run(CropsConfig(handmade, tmp_path / "plain", **cfg), progress=False)  # unmasked, its box is kept
    assert 11 in {r["ann_id"] for r in iter_rows(tmp_path / "plain")} and plain["stats"]["annotations_skipped_empty_mask"] == 0


def test_an_input_that_gives_no_crop_at_all_is_an_error(handmade, tmp_path):
    out = tmp_path / "none"
    with pytest.raises(DatasetError, match="not one of its 4 images gave a row"):
        run(CropsConfig(handmade, out, split="val2017", min_area=10**6, workers=1), progress=False)
    assert not out.exists()
