"""The offline demo end to end at a small size: both runs, the report, the picture it ends with, and what the demo
is for: the run with the grounding losses puts clearly more of each noun's attention inside its object than the
run without them, which stays at chance."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tcompose.demo import DemoConfig, run
from tcompose.io.figures import figure_size


# The held-out grounding score after 40 steps at this size (seed 0): off 0.126, on 0.249, chance 0.126; seeds 1 and 2
# give gains of 0.081 and 0.092 (at 20 steps the gain is 0.063, at 30 0.100). The full demo: 0.133 off, 0.262 on.
STEPS = 40
MIN_GAIN = 0.05  # on - off, in share of attention: about 40% of the smallest gain seen above
NEAR_CHANCE = 0.03  # a random model trained without the losses stays this close to chance


def test_demo_writes_the_report_and_attention_png(tmp_path):
    out = tmp_path / "demo"
    report = run(DemoConfig(output=out, images=24, steps=STEPS, batch_size=4, figure_scenes=2, progress=False))
    assert set(report["runs"]) == {"losses-off", "losses-on"}
    written = json.loads((out / "demo_report.json").read_text())
    assert written["figure"] == str(out / "attention.png")

    # the losses work: the losses-on run beats the losses-off run by a margin, and chance; off stays at chance
    off, on = written["runs"]["losses-off"], written["runs"]["losses-on"]
    assert off["chance"] == on["chance"] and 0 < on["chance"] < 0.5  # the same held-out scenes, objects not the frame
    assert off["before"] == on["before"]  # the same seed: the same model before training
    assert on["after"] - off["after"] >= MIN_GAIN, (off, on)
    assert on["after"] - on["chance"] >= MIN_GAIN, (off, on)
    assert abs(off["after"] - off["chance"]) <= NEAR_CHANCE, (off, on)
    assert written["gain"] == report["gain"] == pytest.approx(on["after"] - off["after"])
    with Image.open(out / "attention.png") as im:
        width, height = im.size
        pixels = np.asarray(im.convert("RGB"))
    # two held-out scenes x (losses off, losses on); every scene names 1-3 nouns, one panel each after the image
    assert height == figure_size(4, 1, 160)[1]
    assert width in {figure_size(4, n, 160)[0] for n in (1, 2, 3)}
    assert pixels.std() > 20  # drawn, not blank


def test_demo_family_trains_a_tiny_model_of_that_family(tmp_path):
    """--family flux: the same scenes and masks, a tiny FLUX.1-dev-layout model in its own base folder, both runs
    and the report; an unknown family is refused before anything is written."""
    from tcompose.io.errors import UserError

    with pytest.raises(UserError, match="--family 'sd4': choose one of sd1, sdxl, sd3, flux"):
        run(DemoConfig(output=tmp_path / "x", family="sd4", progress=False))
    assert not (tmp_path / "x").exists()
    out = tmp_path / "demo"
    report = run(DemoConfig(output=out, images=24, steps=2, batch_size=4, figure_scenes=1, family="flux",
                            progress=False))
    assert (out / "base-model-flux" / "transformer").is_dir() and not (out / "base-model").exists()
    summary = json.loads((out / "losses-on" / "training_summary.json").read_text())
    assert summary["family"] == "flux" and set(report["runs"]) == {"losses-off", "losses-on"}
    assert (out / "attention.png").is_file()


def test_a_rerun_with_other_scenes_makes_them_again(tmp_path):
    """A rerun into the same --output with another --seed or --images trains on new scenes (with new masks and a
    new base model), saying so; the same settings reuse them."""
    import tcompose.demo as demo

    out, said = tmp_path / "demo", []
    first = demo._scenes(DemoConfig(output=out, images=8, seed=0), said.append)
    captions = (first / "annotations" / "captions_train2017.json").read_text()
    (out / "masks").mkdir()
    (out / "base-model").mkdir()
    assert demo._scenes(DemoConfig(output=out, images=8, seed=0), said.append) == first and not said
    assert (first / "annotations" / "captions_train2017.json").read_text() == captions  # reused
    demo._scenes(DemoConfig(output=out, images=8, seed=1), said.append)
    assert len(said) == 1 and "seed 0" in said[0] and "seed 1" in said[0]
    assert (first / "annotations" / "captions_train2017.json").read_text() != captions
    assert not (out / "masks").exists() and not (out / "base-model").exists()
    demo._scenes(DemoConfig(output=out, images=10, seed=1), said.append)
    images = json.loads((first / "annotations" / "captions_train2017.json").read_text())["images"]
    assert len(said) == 2 and len(images) == 10
    # masks left without scenes (a kill between the deletions, or scenes removed by hand) go too
    import shutil

    shutil.rmtree(first)
    (out / "masks").mkdir()
    demo._scenes(DemoConfig(output=out, images=10, seed=1), said.append)
    assert len(said) == 3 and "unrecorded settings" in said[2] and not (out / "masks").exists()
