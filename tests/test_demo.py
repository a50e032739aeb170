"""The offline demo end to end at a small size: both runs, the report, and the picture it ends with."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from tcompose.demo import DemoConfig, run
from tcompose.io.figures import figure_size


def test_demo_writes_the_report_and_attention_png(tmp_path):
    out = tmp_path / "demo"
    report = run(DemoConfig(output=out, images=24, steps=4, batch_size=4, figure_scenes=2, progress=False))
    assert set(report["runs"]) == {"losses-off", "losses-on"}
    assert json.loads((out / "demo_report.json").read_text())["figure"] == str(out / "attention.png")
    with Image.open(out / "attention.png") as im:
        width, height = im.size
        pixels = np.asarray(im.convert("RGB"))
    # two held-out scenes x (losses off, losses on); every scene names 1-3 nouns, one panel each after the image
    assert height == figure_size(4, 1, 160)[1]
    assert width in {figure_size(4, n, 160)[0] for n in (1, 2, 3)}
    assert pixels.std() > 20  # drawn, not blank
