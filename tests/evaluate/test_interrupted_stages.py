"""Ctrl-C in a stage that writes its results whole says in one line what was kept and the command that continues
(the trainers' line: tests/train/test_preemption.py)."""

from __future__ import annotations

import pytest

import tcompose.models.sampling as sampling
from tcompose.cli import main
from tcompose.testing.tiny_sd import write_tiny_pipeline

PROMPTS = ["a cat and a wine glass", "a red ball on a table"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("interrupt") / "base", corpus=PROMPTS, seed=0)


def test_ctrl_c_in_generate_says_how_many_images_were_kept(model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "gen"
    args = ["generate", "--model", str(model), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--images-per-prompt",
            "2", "--batch-size", "1", "--steps", "2", "--height", "32", "--width", "32", "--dtype", "fp32",
            "--output", str(out)]
    real, calls = sampling.generate_batch, [0]

    def batch_then_ctrl_c(*a, **kw):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(sampling, "generate_batch", batch_then_ctrl_c)
    assert main(args) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"interrupted: 1 of 4 images kept in {out / 'images'}; resume with: tcompose generate ")
    assert len(list((out / "images").glob("*.png"))) == 1
    monkeypatch.undo()
    assert main(args) == 0  # the same command continues
    assert "1 already on disk" in capsys.readouterr().err


def test_ctrl_c_in_masks_says_how_many_shards_were_kept(tmp_path, shard_writes, capsys):
    from tcompose.data.synthetic import make_scenes

    scenes = make_scenes(tmp_path / "scenes", n_images=6, size=32, seed=0)
    shard_writes.kill_after_first()
    out = tmp_path / "masks"
    assert main(["masks", str(scenes), "--source", "coco-gt", "--split", "train2017", "--shard-size", "2",
                 "--output", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"interrupted: 1 of 3 shards kept in {out}; resume with: tcompose masks "), err


def test_ctrl_c_in_multigen_detection_says_how_many_detections_were_kept(tmp_path, monkeypatch, capsys):
    """Ctrl-C while detecting: the images stay, and the line counts the images whose detections are stored."""
    import tcompose.evaluate.detection_store as store
    from tcompose.data.categories import COCO_80
    from tcompose.evaluate.multigen.prompts import sample_prompts
    from tcompose.testing.tiny_sd import write_tiny_pipeline
    from tcompose.testing.tiny_detectors import write_tiny_owlv2

    corpus = [p.text for p in sample_prompts(COCO_80, 20, seed=0)]
    sd, owl = write_tiny_pipeline(tmp_path / "sd", corpus=corpus), write_tiny_owlv2(tmp_path / "owl")

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "detect_images", interrupted)
    out = tmp_path / "mg"
    code = main(["multigen", "--model", f"A={sd}", "-o", str(out), "--sample-seed", "0", "--prompts", "2",
                 "--images", "1", "--steps", "2", "--height", "32", "--width", "32", "--detector", str(owl)])
    err = capsys.readouterr().err
    assert code == 130, err
    assert f"interrupted: detections of 0 of 2 images of A kept in {out / 'detections' / 'A'}" in err
    assert len(list((out / "models" / "A" / "images").glob("*.png"))) == 2
