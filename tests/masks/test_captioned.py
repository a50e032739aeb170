"""`tcompose masks` on captioned image sets that are not COCO: an imagefolder (metadata.jsonl / metadata.csv) and a
Parquet dataset with image bytes, with tiny random GroundingDINO / SAM-HQ models; a killed and resumed run."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tcompose.data.captioned import CaptionedDataset, detect_kind
from tcompose.data.synthetic import make_scenes
from tcompose.io.errors import UserError
from tcompose.io.datasets import MANIFEST, decode_mask, iter_rows, shard_files
from tcompose.masks.config import MasksConfig
from tcompose.masks.stage import run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tcompose.testing.tiny_vision import write_tiny_grounding_dino, write_tiny_sam

    root = tmp_path_factory.mktemp("captioned")
    scenes = make_scenes(root / "coco", n_images=5, size=48, seed=3)
    caps = json.loads((scenes / "annotations" / "captions_train2017.json").read_text())
    first = {}
    for a in caps["annotations"]:
        first.setdefault(a["image_id"], a["caption"])
    files = sorted((scenes / "train2017").glob("*.jpg"))
    # the imagefolder: the 5 scenes (first caption each), a corrupt image, an image with an empty caption
    folder = root / "imagefolder"
    (folder / "images").mkdir(parents=True)
    records = []
    for i, f in enumerate(files):
        (folder / "images" / f.name).write_bytes(f.read_bytes())
        records.append({"file_name": f"images/{f.name}", "text": first[i + 1]})
    (folder / "images" / "bad.jpg").write_bytes(files[0].read_bytes()[:20] + b"\x00" * 500)
    records.insert(2, {"file_name": "images/bad.jpg", "text": "a red ball on a table"})
    records.insert(4, {"file_name": f"images/{files[1].name}", "text": "   "})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    words = {w.strip(",.").lower() for r in records for w in r["text"].split()}
    return {
        "scenes": scenes, "folder": folder, "records": records,
        "gd": write_tiny_grounding_dino(root / "gd", words=sorted(words)),
        "sam": write_tiny_sam(root / "sam", hq=True),
    }


def _cfg(setup, source, out, **kw):
    base = dict(source="grounded-sam", detector=str(setup["gd"]), segmenter=str(setup["sam"]), workers=0,
                batch_size=1, shard_size=3, captions="first")
    return MasksConfig(source, out, **{**base, **kw})


def _content(out):
    """Rows without the image id (a row number here, an annotation id in COCO) and the file name."""
    return [(r["image"]["bytes"], r["caption"], r["phrases"], r["width"], r["height"],
             [None if m is None else decode_mask(m["bytes"]).tolist() for m in r["masks"]]) for r in iter_rows(out)]


@pytest.fixture(scope="module")
def folder_run(setup, tmp_path_factory):
    cfg = _cfg(setup, setup["folder"], tmp_path_factory.mktemp("ref") / "masks")
    return cfg, run(cfg, progress=False)


def test_imagefolder_matches_coco_and_counts_skips(setup, folder_run, tmp_path):
    cfg, manifest = folder_run
    coco = run(_cfg(setup, setup["scenes"], tmp_path / "coco"), progress=False)
    assert _content(cfg.output) == _content(tmp_path / "coco") and manifest["num_rows"] == coco["num_rows"] > 0
    s = manifest["stats"]
    assert s["images"] == 7 and s["images_skipped_unreadable"] == 1 and s["images_skipped_no_captions"] == 1
    reasons = {(k["file_name"], k["reason"].split(" (")[0]) for k in manifest["skipped"]}
    assert ("images/bad.jpg", "image does not decode") in reasons and ((setup["records"][4]["file_name"],
                                                                         "no captions") in reasons)
    digest = manifest["config"]["input"]["digest"]
    assert manifest["run"]["input"] == {"kind": "imagefolder", "path": str(setup["folder"]), "split": None,
                                        "caption_column": "text", "rows": 7, "digest": digest}
    assert manifest["config"]["input"] == {"kind": "imagefolder", "split": None, "caption_column": "text",
                                           "rows": 7, "digest": digest}
    assert manifest["config"]["split"] is None  # not masks' COCO default
    assert "input" not in coco["config"] and "input" not in coco["run"]  # a COCO manifest is as it was
    rows = list(iter_rows(cfg.output))
    assert [r["image_id"] for r in rows] == [0, 1, 3, 5, 6]  # the row numbers of the metadata
    assert all(r["file_name"].startswith("images/") and r["source"] == "grounded-sam" for r in rows)


def test_metadata_csv_and_caption_column(setup, folder_run, tmp_path):
    folder = tmp_path / "csv"
    (folder / "images").mkdir(parents=True)
    for f in (setup["folder"] / "images").iterdir():
        (folder / "images" / f.name).write_bytes(f.read_bytes())
    with (folder / "metadata.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["file_name", "prompt"])
        w.writeheader()
        w.writerows({"file_name": r["file_name"], "prompt": r["text"]} for r in setup["records"])
    with pytest.raises(UserError, match="no caption column 'text'.*--caption-column"):
        run(_cfg(setup, folder, tmp_path / "x"), progress=False)
    run(_cfg(setup, folder, tmp_path / "out", caption_column="prompt"), progress=False)
    assert _content(tmp_path / "out") == _content(folder_run[0].output)


def test_parquet_with_image_bytes(setup, folder_run, tmp_path):
    data = tmp_path / "pq"
    (data / "data").mkdir(parents=True)
    rows = [{"image": {"bytes": (setup["folder"] / r["file_name"]).read_bytes(), "path": r["file_name"]},
             "text": r["text"]} for r in setup["records"]]
    pq.write_table(pa.Table.from_pylist(rows[:4]), data / "data" / "train-00000-of-00002.parquet", row_group_size=3)
    pq.write_table(pa.Table.from_pylist(rows[4:]), data / "data" / "train-00001-of-00002.parquet")
    assert detect_kind(data) == "parquet" and len(CaptionedDataset(data, "parquet")) == 7
    manifest = run(_cfg(setup, data, tmp_path / "out"), progress=False)
    assert _content(tmp_path / "out") == _content(folder_run[0].output)
    assert manifest["stats"] == folder_run[1]["stats"]
    # plain binary images, other column names, a row without an image
    raw = [{"jpg": r["image"]["bytes"], "caption": r["text"]} for r in rows] + [{"jpg": None, "caption": "a cup"}]
    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "raw.parquet")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw.parquet").rename(tmp_path / "raw" / "x.parquet")
    with pytest.raises(UserError, match="no column 'image'.*--image-column"):
        run(_cfg(setup, tmp_path / "raw", tmp_path / "y"), progress=False)
    m2 = run(_cfg(setup, tmp_path / "raw", tmp_path / "out2", image_column="jpg", caption_column="caption"),
             progress=False)
    assert _content(tmp_path / "out2") == _content(folder_run[0].output)
    assert m2["stats"]["images_skipped_unreadable"] == 2 and any("missing" in k["reason"] for k in m2["skipped"])


def test_killed_and_resumed(setup, folder_run, shard_writes, tmp_path):
    cfg, reference = folder_run
    expected = list(iter_rows(cfg.output))
    shard_writes.kill_after_first()
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(setup, setup["folder"], out, workers=2), progress=False)
    assert len(shard_files(out)) == 1 and not (out / MANIFEST).exists()
    written = shard_writes.record()
    manifest = run(_cfg(setup, setup["folder"], out, workers=2), progress=False)
    assert written == [1, 2] and list(iter_rows(out)) == expected
    assert manifest["stats"] == reference["stats"] and manifest["skipped"] == reference["skipped"]


def test_refused_inputs(setup, tmp_path):
    with pytest.raises(UserError, match="coco-gt needs a COCO folder"):
        run(MasksConfig(setup["folder"], tmp_path / "a"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither annotations/"):
        run(_cfg(setup, tmp_path / "empty", tmp_path / "b"), progress=False)
    with pytest.raises(UserError, match="does not exist"):
        run(_cfg(setup, tmp_path / "nope", tmp_path / "c"), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_on_an_imagefolder(setup, folder_run, tmp_path):
    from typer.testing import CliRunner

    from tcompose.cli import app

    out = tmp_path / "cli"
    args = ["masks", str(setup["folder"]), "--output", str(out), "--detector", str(setup["gd"]), "--segmenter",
            str(setup["sam"]), "--workers", "0", "--batch-size", "1", "--shard-size", "3", "--caption-column", "text"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert _content(out) == _content(folder_run[0].output)


def test_arrow_folder_as_save_to_disk_writes_it(setup, folder_run, tmp_path):
    import datasets

    rows = [{"image": {"bytes": (setup["folder"] / r["file_name"]).read_bytes(), "path": r["file_name"]},
             "text": r["text"]} for r in setup["records"]]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "arrow"))
    assert detect_kind(tmp_path / "arrow") == "arrow"
    manifest = run(_cfg(setup, tmp_path / "arrow", tmp_path / "out"), progress=False)
    assert _content(tmp_path / "out") == _content(folder_run[0].output)
    assert manifest["stats"] == folder_run[1]["stats"] and manifest["run"]["input"]["kind"] == "arrow"


def test_hub_dataset_id_from_the_offline_cache(setup, folder_run, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--someone--captioned"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    data = repo / "snapshots" / commit / "data"
    data.mkdir(parents=True)
    rows = [{"image": {"bytes": (setup["folder"] / r["file_name"]).read_bytes(), "path": None}, "text": r["text"]}
            for r in setup["records"]]
    pq.write_table(pa.Table.from_pylist(rows), data / "train-00000-of-00001.parquet")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    manifest = run(_cfg(setup, "someone/captioned", tmp_path / "out"), progress=False)
    assert _content(tmp_path / "out") == _content(folder_run[0].output)
    assert manifest["run"]["input"]["hub_id"] == "someone/captioned"
    assert manifest["config"]["input"]["kind"] == "parquet"
    assert {r["file_name"] for r in iter_rows(tmp_path / "out")} == {f"{i:09d}.jpg" for i in (0, 1, 3, 5, 6)}
    with pytest.raises(UserError, match="neither a folder nor a hub dataset in the local cache"):
        run(_cfg(setup, "someone/absent", tmp_path / "out2"), progress=False)


def test_crops_from_masks_read_the_result(setup, folder_run, tmp_path):
    """Downstream stages read a masks dataset of an imagefolder as they read a COCO one."""
    from tcompose.crops.from_masks import MaskCropsConfig
    from tcompose.crops.from_masks import run as crops_run

    masked = sum(m is not None for r in iter_rows(folder_run[0].output) for m in r["masks"])
    manifest = crops_run(MaskCropsConfig(folder_run[0].output, tmp_path / "crops", min_area=1, size=32, workers=1),
                         progress=False)
    rows = list(iter_rows(tmp_path / "crops"))
    assert masked > 0 and len(rows) == manifest["num_rows"] > 0


def test_two_processes_split_the_rows(setup, folder_run, tmp_path):
    """Under accelerate launch each rank writes its own shards of the rows; rank 0 finalizes: same rows."""
    out = tmp_path / "out"
    other = run(_cfg(setup, setup["folder"], out), rank=1, world_size=2, progress=False)
    assert "num_rows" not in other and len(shard_files(out)) == 1  # rank 1: the second of the three shards
    manifest = run(_cfg(setup, setup["folder"], out), rank=0, world_size=2, progress=False)
    assert list(iter_rows(out)) == list(iter_rows(folder_run[0].output))
    assert manifest["stats"] == folder_run[1]["stats"]


def test_index_streams_and_holds_no_captions(tmp_path):
    """A large metadata file or table is indexed in one pass without keeping its captions: memory per row is
    the 8-byte offset (imagefolder) or nothing (Parquet), and a row's caption is read when asked for."""
    import tracemalloc

    n, caption = 20_000, "a photo of a cat and a wine glass " * 30  # ~1 KB a row, 20 MB in all
    folder = tmp_path / "big"
    folder.mkdir()
    with (folder / "metadata.jsonl").open("w") as f:
        for i in range(n):
            f.write(json.dumps({"file_name": f"{i}.jpg", "text": f"{i} {caption}"}) + "\n")
    table = tmp_path / "table"
    table.mkdir()
    pq.write_table(pa.Table.from_pylist([{"image": None, "text": f"{i} {caption}"} for i in range(n)]),
                   table / "x.parquet", row_group_size=1000)
    for root, kind in ((folder, "imagefolder"), (table, "parquet")):
        tracemalloc.start()
        data = CaptionedDataset(root, kind)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert len(data) == n and peak < 2_000_000, (kind, peak)  # the captions alone are 20 MB
        assert data[n - 1].captions == (f"{n - 1} {caption}",) and data[7].captions == (f"7 {caption}",)


def test_csv_caption_over_several_lines(tmp_path):
    """A quoted CSV caption with newlines and quotes is one row, found again by its offset."""
    folder = tmp_path / "csv"
    folder.mkdir()
    captions = ['a dog, "happy"\non the grass', "a cat", 'two\n\nlines "and" more']
    with (folder / "metadata.csv").open("w", newline="", encoding="utf-8-sig") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        w.writerows([f"{i}.jpg", c] for i, c in enumerate(captions))
    data = CaptionedDataset(folder, "imagefolder")
    assert [data[i].captions for i in range(len(data))] == [(c,) for c in captions]
    assert [data[i].file_name for i in data.ids] == ["0.jpg", "1.jpg", "2.jpg"]


def _copy_folder(setup, dst):
    (dst / "images").mkdir(parents=True)
    for f in (setup["folder"] / "images").iterdir():
        (dst / "images" / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_changed_input_is_not_mixed_into_an_older_run(setup, tmp_path):
    """Rows added to the metadata (or a caption edited) after a run: the rerun names what changed and writes
    nothing, instead of keeping the old last shard and leaving the new rows out."""
    folder = _copy_folder(setup, tmp_path / "grow")
    lines = [json.dumps(r) + "\n" for r in setup["records"]]
    (folder / "metadata.jsonl").write_text("".join(lines[:5]))
    out = tmp_path / "out"
    run(_cfg(setup, folder, out), progress=False)
    before = sorted(p.name for p in out.iterdir())
    (folder / "metadata.jsonl").write_text("".join(lines))
    with pytest.raises(UserError, match=r"input\.rows: 5 -> 7"):
        run(_cfg(setup, folder, out), progress=False)
    (folder / "metadata.jsonl").write_text("".join(lines[:4]) + lines[4].replace("images", "./images"))
    with pytest.raises(UserError, match=r"input\.digest: "):
        run(_cfg(setup, folder, out), progress=False)
    assert sorted(p.name for p in out.iterdir()) == before


def test_splits_of_a_table_or_an_imagefolder(setup, folder_run, tmp_path):
    """A hub-style layout with train and test files reads train unless --split names another; a split that is
    not there, or --split on an unsplit folder, is refused naming what there is."""
    rows = [{"image": {"bytes": (setup["folder"] / r["file_name"]).read_bytes(), "path": r["file_name"]},
             "text": r["text"]} for r in setup["records"]]
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), data / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:2]), data / "test-00000-of-00001.parquet")
    manifest = run(_cfg(setup, tmp_path / "hub", tmp_path / "out"), progress=False)
    assert _content(tmp_path / "out") == _content(folder_run[0].output)
    assert manifest["config"]["split"] == "train" and manifest["config"]["input"]["rows"] == 7
    test = run(_cfg(setup, tmp_path / "hub", tmp_path / "out-test", split="test"), progress=False)
    assert test["config"]["input"]["rows"] == 2 and test["stats"]["images"] == 2
    with pytest.raises(UserError, match="has the splits test, train; pass one of them"):
        run(_cfg(setup, tmp_path / "hub", tmp_path / "x", split="validation"), progress=False)
    with pytest.raises(UserError, match="is not split"):
        run(_cfg(setup, setup["folder"], tmp_path / "y", split="train"), progress=False)
    # an imagefolder split into subfolders, file names relative to each split's metadata
    split_folder = tmp_path / "splits"
    _copy_folder(setup, split_folder / "train")
    (split_folder / "train" / "metadata.jsonl").write_text((setup["folder"] / "metadata.jsonl").read_text())
    (split_folder / "test").mkdir()
    (split_folder / "test" / "metadata.jsonl").write_text("")
    run(_cfg(setup, split_folder, tmp_path / "out-if"), progress=False)
    assert _content(tmp_path / "out-if") == _content(folder_run[0].output)


def test_odd_imagefolders_are_refused_or_skipped(setup, tmp_path):
    both = _copy_folder(setup, tmp_path / "both")
    (both / "metadata.jsonl").write_text((setup["folder"] / "metadata.jsonl").read_text())
    (both / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(UserError, match="both metadata.jsonl and metadata.csv"):
        run(_cfg(setup, both, tmp_path / "a"), progress=False)
    (both / "metadata.csv").unlink()
    with pytest.raises(UserError, match="--image-column is for Parquet"):
        run(_cfg(setup, both, tmp_path / "b", image_column="jpg"), progress=False)
    with pytest.raises(UserError, match="no caption column 'prompt'.*pass another --caption-column"):
        run(_cfg(setup, both, tmp_path / "c", caption_column="prompt"), progress=False)
    # file names that leave the folder are skipped as unreadable, never read
    outside = tmp_path / "secret.jpg"
    outside.write_bytes((setup["folder"] / setup["records"][0]["file_name"]).read_bytes())
    records = setup["records"] + [{"file_name": "../secret.jpg", "text": "a cup"},
                                  {"file_name": str(outside), "text": "a cup"}]
    (both / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = run(_cfg(setup, both, tmp_path / "d"), progress=False)
    outside_rows = [k for k in manifest["skipped"] if "outside the dataset folder" in k["reason"]]
    assert len(outside_rows) == 2 and manifest["stats"]["images_skipped_unreadable"] == 3


def test_a_captioned_folder_given_as_a_dataset_says_to_run_masks_first(setup, tmp_path):
    from tcompose.io.datasets import DatasetError

    with pytest.raises(DatasetError, match=r"make one from them first with `tcompose masks .* --output MASKS`"):
        shard_files(setup["folder"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is it a tcompose dataset folder"):
        shard_files(tmp_path / "empty")
