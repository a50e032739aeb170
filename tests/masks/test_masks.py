"""The masks stage (source coco-gt): real COCO sample, skips, errors, resume, several processes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tcompose.data.coco import CocoDataset, CocoError
from tcompose.data.synthetic import CATEGORIES, make_scenes
from tcompose.io.datasets import MANIFEST, DatasetError, decode_mask, iter_rows, shard_files
from tcompose.masks import stage as masks_stage
from tcompose.masks.config import MasksConfig
from tcompose.masks.stage import STATS_KEYS, run


def _rows(out):
    return list(iter_rows(out))


@pytest.fixture(scope="module")
def real(coco_mini, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "masks"
    cfg = MasksConfig(coco_dir=coco_mini, output=out, split="val2017", captions="all", limit=10, shard_size=4)
    return cfg, run(cfg, progress=False)


def test_real_coco_with_datasets(real, tmp_path):
    import datasets

    cfg, manifest = real
    assert manifest["num_rows"] > 30 and [s["file"] for s in manifest["shards"]] == [
        "train-00000.parquet", "train-00001.parquet", "train-00002.parquet"
    ]
    ds = datasets.load_dataset("parquet", data_dir=str(cfg.output), cache_dir=str(tmp_path / "hf"))["train"]
    assert len(ds) == manifest["num_rows"]
    coco = CocoDataset(cfg.coco_dir, "val2017")
    assert sorted(set(ds["image_id"])) == [i for i in coco.ids[:10] if i in set(ds["image_id"])]
    for row in ds.select(range(0, len(ds), 7)):
        image = coco[row["image_id"]]
        assert isinstance(row["image"], Image.Image) and row["image"].size == (image.width, image.height)
        assert row["caption"] in [" ".join(c.split()) for c in image.captions]
        assert len(row["phrases"]) == len(row["categories"]) == len(row["masks"]) >= 1
        for phrase, category, mask in zip(row["phrases"], row["categories"], row["masks"]):
            assert phrase in row["caption"].lower() and category in coco.category_names(image)
            assert isinstance(mask, Image.Image) and mask.size == (image.width, image.height)
            expected = coco.category_mask(image, category)
            assert expected.any() and (np.asarray(mask.convert("L")) > 0).tolist() == expected.tolist()


def test_real_coco_with_pyarrow(real, coco_mini):
    from pycocotools.coco import COCO

    cfg, manifest = real
    reference = COCO(str(coco_mini / "annotations" / "instances_val2017.json"))
    names = {c["id"]: c["name"] for c in reference.loadCats(reference.getCatIds())}
    table = pq.read_table(shard_files(cfg.output)[0])
    assert table.schema.field("image").type.names == ["bytes", "path"]
    for row in table.to_pylist():
        assert row["source"] == "coco-gt"
        path = coco_mini / "val2017" / row["file_name"]
        assert row["image"] == {"bytes": path.read_bytes(), "path": row["file_name"]}  # the original JPEG
        for category, mask in zip(row["categories"], row["masks"]):
            union = np.zeros((row["height"], row["width"]), bool)
            for ann in reference.loadAnns(reference.getAnnIds(imgIds=row["image_id"])):
                if names[ann["category_id"]] == category:
                    union |= reference.annToMask(ann).astype(bool)
            assert (decode_mask(mask) == union).all()


def test_real_manifest(real):
    cfg, manifest = real
    stats = manifest["stats"]
    assert set(stats) == set(STATS_KEYS)
    assert stats["images"] == 10 and stats["captions"] == 50 and stats["rows"] == manifest["num_rows"]
    assert stats["captions_no_match"] == 50 - stats["rows"] > 0  # image 802: "Kitchen appliances and cabinets ..."
    listed = [s for s in manifest["skipped"] if s["caption"]]
    assert len(listed) == stats["captions_no_match"]
    assert {"image_id": 802, "file_name": "000000000802.jpg", "reason": "no caption noun names an annotated category",
            "caption": "Kitchen appliances and cabinets as seen through opening."} in listed
    assert stats["phrases"] == sum(len(r["phrases"]) for r in _rows(cfg.output))
    assert manifest["config"]["split"] == "val2017" and manifest["config"]["captions"] == "all"
    assert str(cfg.coco_dir) not in json.dumps(manifest["config"])  # paths are not settings
    assert json.loads((cfg.output / MANIFEST).read_text())["fingerprint"] == manifest["fingerprint"]


@pytest.fixture()
def scenes(tmp_path):
    """12 synthetic images, one more with a corrupt JPEG, one without annotations, one unmatched caption,
    one caption naming a category whose annotation covers no pixel."""
    out = make_scenes(tmp_path / "coco", n_images=12, size=48, seed=1, corrupt=1)
    caps_path = out / "annotations" / "captions_train2017.json"
    inst_path = out / "annotations" / "instances_train2017.json"
    caps, inst = json.loads(caps_path.read_text()), json.loads(inst_path.read_text())
    first = caps["annotations"][0]["image_id"]
    caps["annotations"].insert(0, {"id": 999, "image_id": first, "caption": "Nothing here but a wooden surface."})
    bare = {"id": 14, "file_name": "000000000014.jpg", "width": 48, "height": 48}
    shutil.copy(out / "train2017" / "000000000002.jpg", out / "train2017" / bare["file_name"])
    caps["images"].append(bare)
    inst["images"].append(bare)
    caps["annotations"].append({"id": 1000, "image_id": 14, "caption": "a red ball on a table"})
    # image 1 gets a degenerate annotation (a 2-point polygon covers no pixel) of a category it lacks
    present = {a["category_id"] for a in inst["annotations"] if a["image_id"] == 1}
    absent = min(set(CATEGORIES) - present)
    inst["annotations"].append({"id": 999, "image_id": 1, "category_id": absent, "segmentation": [[1, 1, 5, 5]],
                                "area": 0, "bbox": [1, 1, 4, 4], "iscrowd": 0})
    caps["annotations"].append({"id": 1001, "image_id": 1, "caption": f"and a {CATEGORIES[absent]}"})
    caps_path.write_text(json.dumps(caps))
    inst_path.write_text(json.dumps(inst))
    return out


def test_skips_are_counted_and_listed(scenes, tmp_path):
    manifest = run(MasksConfig(scenes, tmp_path / "out", captions="all", shard_size=5), progress=False)
    stats = manifest["stats"]
    assert stats["images"] == 14 and stats["images_skipped_unreadable"] == 1
    assert stats["images_skipped_no_annotations"] == 1 and stats["captions_no_match"] == 1
    reasons = {(s["image_id"], s["reason"].split(" (")[0]) for s in manifest["skipped"]}
    assert (13, "image does not decode") in reasons
    assert (14, "no instance annotations") in reasons
    assert (1, "no caption noun names an annotated category") in reasons
    rows = _rows(tmp_path / "out")
    assert {r["image_id"] for r in rows} == set(range(1, 13)) and len(rows) == stats["rows"]
    coco = CocoDataset(scenes)
    empty = [r for r in rows if None in r["masks"]]
    assert stats["masks_empty"] == 1 and len(empty) == 1 and empty[0]["caption"].startswith("and a ")
    for r in rows:
        assert r["source"] == "coco-gt" and r["width"] == r["height"] == 48
        for category, mask in zip(r["categories"], r["masks"]):
            if mask is not None:
                assert (decode_mask(mask) == coco.category_mask(coco[r["image_id"]], category)).all()
    # --captions first: one row per image, its first caption; the unmatched first caption skips image 1
    first = run(MasksConfig(scenes, tmp_path / "first", shard_size=5), progress=False)
    rows = _rows(tmp_path / "first")
    assert [r["caption"] for r in rows] == [coco[r["image_id"]].captions[0] for r in rows]
    assert len(rows) == 11 and first["stats"]["images_skipped_no_match"] == 1 and first["stats"]["captions"] == 12


def test_errors_are_clear_and_write_nothing(coco_mini, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CocoError, match=r"captions_train2017.json is missing: pass --split val2017"):
        run(MasksConfig(coco_mini, out), progress=False)
    with pytest.raises(CocoError, match="does not exist"):
        run(MasksConfig(tmp_path / "missing", out), progress=False)
    with pytest.raises(ValueError, match="unknown --source 'sam'"):
        run(MasksConfig(coco_mini, out, split="val2017", source="sam"), progress=False)
    with pytest.raises(ValueError, match="--captions must be"):
        run(MasksConfig(coco_mini, out, split="val2017", captions="some"), progress=False)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        run(MasksConfig(coco_mini, out, split="val2017"), rank=2, world_size=2, progress=False)
    assert not out.exists()


def test_resume_after_a_kill_gives_the_same_rows(scenes, tmp_path, shard_writes):
    cfg = dict(captions="all", shard_size=3)
    reference = run(MasksConfig(scenes, tmp_path / "ref", **cfg), progress=False)
    expected = _rows(tmp_path / "ref")

    shard_writes.kill_after_first()
    with pytest.raises(KeyboardInterrupt):
        run(MasksConfig(scenes, tmp_path / "out", **cfg), progress=False)
    assert [p.name for p in shard_files(tmp_path / "out")] == ["train-00000.parquet"]
    assert not (tmp_path / "out" / MANIFEST).exists()

    written = shard_writes.record()
    manifest = run(MasksConfig(scenes, tmp_path / "out", **cfg), progress=False)
    assert written == [1, 2, 3, 4]  # the finished shard was kept
    assert _rows(tmp_path / "out") == expected
    assert manifest["stats"] == reference["stats"] and manifest["skipped"] == reference["skipped"]

    (tmp_path / "out" / "train-00002.parquet").unlink()  # a lost shard is rewritten identically
    written.clear()
    run(MasksConfig(scenes, tmp_path / "out", **cfg), progress=False)
    assert written == [2] and _rows(tmp_path / "out") == expected


def test_other_settings_are_refused(scenes, tmp_path):
    out = tmp_path / "out"
    run(MasksConfig(scenes, out, shard_size=4), progress=False)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    for other in (dict(captions="all"), dict(limit=5), dict(include_crowd=False), dict(shard_size=5)):
        with pytest.raises(DatasetError, match="other settings"):
            run(MasksConfig(scenes, out, **{"shard_size": 4, **other}), progress=False)
    (out / MANIFEST).unlink()  # an unfinished folder: the shards themselves are checked
    with pytest.raises(DatasetError, match="other settings"):
        run(MasksConfig(scenes, out, shard_size=4, captions="all"), progress=False)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir() if p.name != MANIFEST) == [
        b for b in before if b[0] != MANIFEST
    ]


def test_several_processes(scenes, tmp_path):
    single = run(MasksConfig(scenes, tmp_path / "one", shard_size=3), progress=False)
    out = tmp_path / "two"
    with pytest.raises(DatasetError, match=r"shards \[1, 3\] did not appear"):
        run(MasksConfig(scenes, out, shard_size=3), rank=0, world_size=2, progress=False, finalize_timeout_s=0.2)
    summary = run(MasksConfig(scenes, out, shard_size=3), rank=1, world_size=2, progress=False)
    assert summary["rank"] == 1 and summary["shards_written"] == 2 and not (out / MANIFEST).exists()
    manifest = run(MasksConfig(scenes, out, shard_size=3), rank=0, world_size=2, progress=False)
    assert _rows(out) == _rows(tmp_path / "one") and manifest["stats"] == single["stats"]


def test_progress_and_summary(scenes, tmp_path, capsys):
    manifest = run(MasksConfig(scenes, tmp_path / "out", limit=3), progress=True)
    err = capsys.readouterr().err
    assert "masks:" in err and f"{manifest['num_rows']} rows" in err
    line = masks_stage.summary_line(manifest, tmp_path / "out")
    assert "3 images" in line and str(tmp_path / "out") in line


def test_an_input_that_gives_no_row_at_all_is_an_error(tmp_path):
    """Captions that name none of the annotated objects: an error naming why, not an empty dataset."""
    scenes = make_scenes(tmp_path / "scenes", n_images=3, size=32, seed=0)
    caps = scenes / "annotations" / "captions_train2017.json"
    data = json.loads(caps.read_text())
    for a in data["annotations"]:
        a["caption"] = "Nothing to see in this picture."
    caps.write_text(json.dumps(data))
    out = tmp_path / "masks"
    with pytest.raises(DatasetError, match="not one of its 3 images gave a row .*no caption noun names an annotated"):
        run(MasksConfig(coco_dir=scenes, output=out, split="train2017"), progress=False)
    assert not out.exists()
