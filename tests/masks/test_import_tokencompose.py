"""Import of the original TokenCompose layout (metadata.jsonl + images + seg/<id>/mask_<id>_<phrase>.png)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tcompose.io.datasets import MANIFEST, DatasetError, check_columns, decode_mask, iter_rows, shard_files
from tcompose.masks.import_tokencompose import STATS_KEYS, ImportConfig, image_id_for, mask_path, run, summary_line


def _mask(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _save_grey(path, mask):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def _save_rgba(path, mask):
    """As the original's plt.imsave(cmap=gray) wrote masks: RGBA, white foreground, opaque."""
    path.parent.mkdir(parents=True, exist_ok=True)
    v = mask.astype(np.uint8) * 255
    Image.fromarray(np.stack([v, v, v, np.full_like(v, 255)], -1), "RGBA").save(path)


@pytest.fixture()
def layout(tmp_path):
    """train/{metadata.jsonl, *.jpg} and seg/<id>/mask_<id>_<phrase>.png, as the original distributed them."""
    train, seg = tmp_path / "data" / "train", tmp_path / "data" / "seg"
    train.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in {"000000000142.jpg": (40, 30), "000000000370.jpg": (32, 32), "000000000443.jpg": (24, 20),
                         "dog_photo.jpg": (20, 16), "000000000000.jpg": (16, 16)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(train / name, quality=95)
    masks = {
        "142_plate": _mask(30, 40, 5, 5, 20, 30), "142_silk": _mask(30, 40, 0, 30, 10, 40),
        "370_girl": _mask(32, 32, 2, 2, 30, 12), "443_cat": _mask(32, 32, 0, 0, 5, 5),  # wrong size for 443
        "dog": np.zeros((16, 20), bool), "0_box": _mask(16, 16, 4, 4, 12, 12),
    }
    _save_grey(seg / "000000000142" / "mask_000000000142_Plate.png", masks["142_plate"])
    _save_rgba(seg / "000000000142" / "mask_000000000142_Silk.png", masks["142_silk"])
    _save_grey(seg / "000000000370" / "mask_000000000370_girl.png", masks["370_girl"])
    _save_grey(seg / "000000000443" / "mask_000000000443_cat.png", masks["443_cat"])
    _save_grey(seg / "dog_photo" / "mask_dog_photo_dog.png", masks["dog"])
    _save_grey(seg / "000000000000" / "mask_000000000000_box.png", masks["0_box"])
    p = "seg/{0}/mask_{0}_{1}.png".format
    lines = [
        {"file_name": "000000000142.jpg", "text": "Plate with  bread and a carton of Silk. ",
         "attn_list": [["Plate", p("000000000142", "Plate")], ["bread", None], ["Silk", p("000000000142", "Silk")]]},
        '{"file_name": "000000000370.jpg", "text": "broken',  # line 2: bad JSON
        {"file_name": "000000000370.jpg", "text": "A little girl holds a piece of broccoli.",  # line 3: missing mask
         "attn_list": [["girl", p("000000000370", "girl")], ["broccoli", p("000000000370", "broccoli")]]},
        {"file_name": "000000000443.jpg", "text": "A cat on a lap.",  # line 4: mask of another size
         "attn_list": [["cat", p("000000000443", "cat")], ["lap", None]]},
        {"file_name": "dog_photo.jpg", "text": "A dog.", "attn_list": [["dog", p("dog_photo", "dog")]]},  # line 5
        {"file_name": "000000999999.jpg", "text": "Gone.", "attn_list": [["thing", None]]},  # line 6: no image
        "",  # line 7: blank
        {"file_name": "000000000370.jpg", "text": "Nothing grounded here.", "attn_list": []},  # line 8
        {"file_name": "000000000370.jpg", "caption": "wrong key", "attn_list": []},  # line 9: lacks text
        {"file_name": "000000000000.jpg", "text": "a box", "attn_list": [["box", p("000000000000", "box")]]},
    ]
    meta = train / "metadata.jsonl"
    meta.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return meta, masks


def test_import_rows_stats_and_skips(layout, tmp_path):
    meta, masks = layout
    out = tmp_path / "out"
    manifest = run(ImportConfig(meta, out, seg_root=meta.parent.parent, shard_size=4), progress=False)
    rows = list(iter_rows(out))
    assert [r["image_id"] for r in rows] == [142, 5, 0]  # "dog_photo.jpg" is line 5; image id 0 stays 0
    first, dog, box = rows
    assert first["caption"] == "Plate with bread and a carton of Silk."
    assert first["phrases"] == ["Plate", "bread", "Silk"] and first["categories"] == ["", "", ""]
    assert (decode_mask(first["masks"][0]) == masks["142_plate"]).all() and first["masks"][1] is None
    assert (decode_mask(first["masks"][2]) == masks["142_silk"]).all()  # the RGBA mask's first channel
    assert (first["width"], first["height"], first["source"], first["file_name"]) == (40, 30, "tokencompose",
                                                                                      "000000000142.jpg")
    assert first["image"]["bytes"] == (meta.parent / "000000000142.jpg").read_bytes()
    assert dog["masks"] == [None]  # an all-black mask is no mask
    assert (decode_mask(box["masks"][0]) == masks["0_box"]).all()
    stats = manifest["stats"]
    assert stats == {**dict.fromkeys(STATS_KEYS, 0), "lines": 9, "rows": 3, "phrases": 5, "masks_null": 1,
                     "masks_empty": 1, "lines_skipped_bad_json": 2, "rows_skipped_no_phrases": 1,
                     "rows_skipped_unreadable_image": 1, "rows_skipped_bad_mask": 2}
    reasons = {s["line"]: (s["file_name"], s["reason"]) for s in manifest["skipped"]}
    assert sorted(reasons) == [2, 3, 4, 6, 8, 9]
    assert reasons[2][0] is None and reasons[2][1].startswith("not valid JSON")
    assert reasons[3][0] == "000000000370.jpg" and "mask of 'broccoli'" in reasons[3][1] and "is missing" in reasons[3][1]
    assert "is 32x32 but the image is 24x20" in reasons[4][1]
    assert reasons[6][1].startswith("image 000000999999.jpg is missing")
    assert reasons[8][1] == "empty attn_list" and reasons[9][1].startswith("not {")
    assert manifest["kind"] == "masks" and check_columns(out, "masks")
    assert "3 rows" in summary_line(manifest, out)


def test_seg_root_may_be_the_seg_folder_itself(layout, tmp_path):
    meta, _ = layout
    seg = meta.parent.parent / "seg"
    assert mask_path(seg, "seg/000000000142/mask_000000000142_Plate.png") == seg / "000000000142" / "mask_000000000142_Plate.png"
    run(ImportConfig(meta, tmp_path / "a", seg_root=meta.parent.parent), progress=False)
    run(ImportConfig(meta, tmp_path / "b", images=meta.parent, seg_root=seg), progress=False)
    assert list(iter_rows(tmp_path / "a")) == list(iter_rows(tmp_path / "b"))
    assert image_id_for("COCO_train2014_000000000042.jpg", 7) == 42 and image_id_for("x.jpg", 7) == 7


def test_resume_and_datasets(layout, tmp_path, shard_writes):
    import datasets

    meta, _ = layout
    cfg = dict(seg_root=meta.parent.parent, shard_size=3)
    run(ImportConfig(meta, tmp_path / "ref", **cfg), progress=False)
    expected = list(iter_rows(tmp_path / "ref"))

    out = tmp_path / "out"
    shard_writes.kill_after_first()
    with pytest.raises(KeyboardInterrupt):
        run(ImportConfig(meta, out, **cfg), progress=False)
    assert [p.name for p in shard_files(out)] == ["train-00000.parquet"] and not (out / MANIFEST).exists()
    shard_writes.restore()
    run(ImportConfig(meta, out, **cfg), progress=False)
    assert list(iter_rows(out)) == expected

    ds = datasets.load_dataset("parquet", data_dir=str(out), cache_dir=str(tmp_path / "hf"))["train"]
    assert len(ds) == 3 and isinstance(ds[0]["image"], Image.Image) and ds[0]["masks"][1] is None
    assert isinstance(ds[0]["masks"][0], Image.Image) and ds[0]["masks"][0].size == (40, 30)

    with pytest.raises(DatasetError, match="other settings"):
        run(ImportConfig(meta, out, seg_root=meta.parent.parent, shard_size=3, limit=2), progress=False)
    meta.write_text(meta.read_text().replace("a box", "a big box"))  # other input, same folder: refused
    with pytest.raises(DatasetError, match="other settings"):
        run(ImportConfig(meta, out, **cfg), progress=False)


def test_errors(layout, tmp_path):
    meta, _ = layout
    with pytest.raises(FileNotFoundError, match="cannot be read"):
        run(ImportConfig(tmp_path / "nope.jsonl", tmp_path / "o", images=meta.parent, seg_root=meta.parent),
            progress=False)
    with pytest.raises(NotADirectoryError, match="--seg-root"):
        run(ImportConfig(meta, tmp_path / "o", seg_root=tmp_path / "missing"), progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DatasetError, match="holds no lines"):
        run(ImportConfig(empty, tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()


def test_cli_masks_from_tokencompose(layout, tmp_path):
    from tcompose.cli import main

    meta, _ = layout
    out = tmp_path / "cli"
    args = ["--from-tokencompose", str(meta), "--seg-root", str(meta.parent.parent), "--output", str(out)]
    assert main(["masks", *args]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["stage"] == "import-tokencompose" and manifest["num_rows"] > 0
    assert main(["masks", str(tmp_path), *args]) == 2  # COCO_DIR and --from-tokencompose together
    assert main(["masks", "--seg-root", str(tmp_path), "--output", str(tmp_path / "x")]) == 2  # no input at all


def test_a_malformed_metadata_file_is_an_error_not_an_empty_dataset(layout, tmp_path, capsys):
    from tcompose.cli import main

    meta, _ = layout
    seg_root = meta.parent.parent
    bad = meta.parent / "bad.jsonl"
    bad.write_text('{"file_name": "000000000142.jpg", "text": "broken\n[1, 2, 3]\n{"text": "no file name"}\n')
    out = tmp_path / "o"
    assert main(["masks", "--from-tokencompose", str(bad), "--seg-root", str(seg_root), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl: not one of its 3 lines gave a row" in err and "nothing was written" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    # once fixed, the same --output takes the data
    bad.write_text(meta.read_text())
    assert main(["masks", "--from-tokencompose", str(bad), "--seg-root", str(seg_root), "--output", str(out)]) == 0
    assert json.loads((out / MANIFEST).read_text())["num_rows"] > 0
