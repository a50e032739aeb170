"""crops --from-masks: one crop per masked phrase of a masks dataset (the grounded-SAM recipe), checked by hand."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tcompose.cli import main
from tcompose.clip.config import TrainClipConfig
from tcompose.clip.loop import run as train_clip
from tcompose.crops.from_masks import MaskCropsConfig, mask_bbox, phrase_id, run
from tcompose.crops.geometry import CLIP_MEAN_RGB, crop_box, cut
from tcompose.io.datasets import MANIFEST, ShardedWriter, encode_mask, image_struct, iter_rows, shard_files
from tcompose.testing.tiny_vision import write_tiny_clip

GREY = np.array(CLIP_MEAN_RGB, dtype=float)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")  # lossless, so the crops can be compared pixel for pixel
    return buf.getvalue()


def _rect(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def handmade_rows():
    """Four rows: two objects + an unmasked phrase; a tiny mask; a corrupt image; a mask of the wrong size."""
    rng = np.random.default_rng(0)
    h, w = 60, 80
    px = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    cat = _rect(h, w, 10, 20, 40, 50)  # 30 x 30 at (10, 20)
    cat[20:25, 10:15] = False  # not a rectangle: the box is still 10..39 x 20..49
    glass = np.zeros((h, w), bool)
    glass[5:12, 60:78] = True  # 18 x 7 reaching near the right edge: the square crop is padded
    rows = [
        {"image_id": 1, "file_name": "a.jpg", "image": image_struct(_jpeg(px), "a.jpg"), "width": w, "height": h,
         "caption": "a cat, a wine glass and a dog", "phrases": ["cat", "wine glass", "dog"],
         "categories": ["cat", "wine glass", "dog"], "source": "test",
         "masks": [image_struct(encode_mask(cat)), image_struct(encode_mask(glass)), None]},
        {"image_id": 2, "file_name": "b.jpg", "image": image_struct(_jpeg(px), "b.jpg"), "width": w, "height": h,
         "caption": "a fly", "phrases": ["fly"], "categories": [""], "source": "test",
         "masks": [image_struct(encode_mask(_rect(h, w, 0, 0, 3, 3)))]},
        {"image_id": 3, "file_name": "c.jpg", "image": image_struct(b"not an image", "c.jpg"), "width": w, "height": h,
         "caption": "a cat", "phrases": ["cat"], "categories": ["cat"], "source": "test",
         "masks": [image_struct(encode_mask(cat))]},
        {"image_id": 4, "file_name": "d.jpg", "image": image_struct(_jpeg(px), "d.jpg"), "width": w, "height": h,
         "caption": "a cat", "phrases": ["cat"], "categories": ["cat"], "source": "test",
         "masks": [image_struct(encode_mask(np.ones((10, 10), bool)))]},
    ]
    return rows, px, {"cat": cat, "wine glass": glass}


def write_masks(out, rows, shard_size=2):
    wr = ShardedWriter(out, kind="masks", stage="masks", content_config={"handmade": 1}, shard_size=shard_size)
    for shard in wr.plan(len(rows)):
        wr.write_shard(shard, rows[shard.items.start:shard.items.stop], {}, [])
    wr.finalize(len(rows))
    return out


@pytest.fixture()
def handmade(tmp_path):
    rows, px, masks = handmade_rows()
    return write_masks(tmp_path / "masks", rows), px, masks


def _decode(row) -> np.ndarray:
    with Image.open(io.BytesIO(row["image"]["bytes"])) as im:
        return np.asarray(im.convert("RGB")).astype(float)


def test_mask_bbox_by_hand():
    m = np.zeros((6, 7), bool)
    m[1, 2] = m[4, 5] = True
    assert mask_bbox(m) == [2.0, 1.0, 4.0, 4.0]  # x 2..5, y 1..4: whole pixels
    assert phrase_id("wine glass") == phrase_id("wine glass") != phrase_id("wine glasses")
    assert 0 <= phrase_id("cat") < 2**56


def test_one_crop_per_masked_phrase_with_the_masks_box(handmade, tmp_path):
    masks_dir, px, masks = handmade
    manifest = run(MaskCropsConfig(masks_dir, tmp_path / "crops", min_area=20, size=48, workers=1), progress=False)
    rows = list(iter_rows(tmp_path / "crops"))
    assert [(r["image_id"], r["category"], r["text"]) for r in rows] == [
        (1, "cat", "a photo of a cat"), (1, "wine glass", "a photo of a wine glass")]
    s = manifest["stats"]
    assert (s["rows"], s["phrases"], s["crops"]) == (4, 6, 2)
    assert s["phrases_skipped_no_mask"] == 1 and s["phrases_skipped_small"] == 1  # "dog"; the 3x3 "fly"
    assert s["rows_skipped_unreadable"] == 2 and s["crops_padded"] == 1
    reasons = sorted(k["reason"] for k in manifest["skipped"])
    assert reasons[0].startswith("image does not decode") and "is 10x10, the image 80x60" in reasons[1]
    cat, glass = rows
    assert cat["bbox"] == [10.0, 20.0, 30.0, 30.0] and glass["bbox"] == [60.0, 5.0, 18.0, 7.0]
    assert cat["crop_box"] == list(crop_box([10, 20, 30, 30], 0.1, True)) == [7, 17, 43, 53]
    assert glass["crop_box"] == list(crop_box([60, 5, 18, 7], 0.1, True))
    assert cat["category_id"] == phrase_id("cat") and cat["ann_id"] == 0 and glass["ann_id"] == 1
    for row in rows:  # the pixels are the source's region, resized like the COCO recipe's (PIL bicubic)
        region = cut(px, tuple(row["crop_box"]), CLIP_MEAN_RGB)
        want = np.asarray(Image.fromarray(region).resize((48, 48), Image.BICUBIC)).astype(float)
        assert np.abs(_decode(row) - want).mean() < 6  # JPEG
    assert {k["image_id"] for k in manifest["skipped"]} == {3, 4}


def test_masked_greys_what_lies_outside_the_mask(handmade, tmp_path):
    masks_dir, px, masks = handmade
    run(MaskCropsConfig(masks_dir, tmp_path / "crops", min_area=20, size=36, masked=True, workers=1), progress=False)
    cat = next(r for r in iter_rows(tmp_path / "crops") if r["category"] == "cat")
    got = _decode(cat)
    box = tuple(cat["crop_box"])  # 36 px square: the crop is the region at its own size, no resampling
    inside = cut(masks["cat"], box, False)
    assert np.abs(got[~inside] - GREY).mean() < 4
    assert np.abs(got[inside] - cut(px, box, CLIP_MEAN_RGB)[inside]).mean() < 12  # JPEG on noise


def test_resume_rewrites_only_what_is_missing(handmade, tmp_path):
    masks_dir, _, _ = handmade
    cfg = MaskCropsConfig(masks_dir, tmp_path / "crops", min_area=20, size=32, shard_size=1, workers=1)
    first = run(cfg, progress=False)
    expected = list(iter_rows(tmp_path / "crops"))
    files = shard_files(tmp_path / "crops")
    assert len(files) == 4
    files[0].unlink()
    (tmp_path / "crops" / MANIFEST).unlink()
    again = run(cfg, progress=False)
    assert list(iter_rows(tmp_path / "crops")) == expected and again["stats"] == first["stats"]
    with pytest.raises(ValueError, match="other settings|--overwrite|different"):
        run(MaskCropsConfig(masks_dir, tmp_path / "crops", min_area=20, size=64, shard_size=1, workers=1),
            progress=False)


def test_cli_from_masks_and_its_bad_inputs(handmade, tmp_path, capsys):
    masks_dir, _, _ = handmade
    out = tmp_path / "crops"
    args = ["crops", "--from-masks", str(masks_dir), "--output", str(out), "--min-area", "20", "--workers", "1"]
    assert main(args) == 0
    assert len(list(iter_rows(out))) == 2
    assert "2 crops from 4 rows" in capsys.readouterr().err
    for argv, message in ((["crops", str(tmp_path), "--from-masks", str(masks_dir)], "not both"),
                          (["crops", "--from-masks", str(masks_dir), "--split", "val2017"], "do not apply"),
                          (["crops"], "missing COCO_DIR"),
                          (["crops", "--from-masks", str(out)], "a 'crops' dataset")):
        assert main([*argv, "--output", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_train_clip_reads_crops_from_masks(tmp_path):
    rows, _, _ = handmade_rows()
    rows = [dict(rows[0], image_id=i) for i in range(8)]  # 16 crops of 8 images: a train and a held-out split
    masks_dir = write_masks(tmp_path / "masks", rows, shard_size=4)
    run(MaskCropsConfig(masks_dir, tmp_path / "crops", min_area=20, size=32, workers=1), progress=False)
    base = write_tiny_clip(tmp_path / "clip", corpus=["a photo of a cat", "a photo of a wine glass"], seed=0)
    summary = train_clip(TrainClipConfig(data=tmp_path / "crops", output=tmp_path / "run", model=str(base),
                                         batch_size=4, max_steps=2, num_workers=0, eval_fraction=0.25,
                                         checkpoint_every=0, progress=False))
    assert summary["steps"] == 2 and (tmp_path / "run" / "eval.json").is_file()
