"""Attention figures: the shared scale compares maps, the per-map scale stretches each; a colour bar says which."""

import numpy as np
import pytest
from PIL import Image

from tcompose.io.figures import CBAR_PX, LABEL_PX, TITLE_PX, PanelRow, draw_attention_figure, figure_size

PANEL = 64


def _rows():
    image = np.full((32, 32, 3), 128, np.uint8)
    yy, xx = np.mgrid[0:16, 0:16]
    strong = np.exp(-((yy - 8.0) ** 2 + (xx - 8.0) ** 2) / 20.0).astype(np.float32)
    return [PanelRow("model", image, [("strong", strong), ("weak", 0.1 * strong)])]


def _panel(png, column):
    x0 = LABEL_PX + column * PANEL
    return png[TITLE_PX:TITLE_PX + PANEL, x0:x0 + PANEL].astype(np.float64)


@pytest.mark.parametrize("scale", ["per-map", "shared"])
def test_scale_decides_whether_a_weak_map_looks_weak(tmp_path, scale):
    path = tmp_path / f"{scale}.png"
    panels = draw_attention_figure(_rows(), path, panel=PANEL, scale=scale)
    assert [t for _, _, t in panels] == ["image", "strong", "weak"]
    png = np.asarray(Image.open(path).convert("RGB"))
    assert png.shape[1::-1] == figure_size(1, 2, PANEL)
    strong, weak = _panel(png, 1), _panel(png, 2)
    gap = np.abs(strong - weak).mean()
    if scale == "per-map":  # each map stretched to its own range: the same picture
        assert gap < 2.0
    else:  # one scale: the weak map's peak stays blue where the strong one's turns red
        assert gap > 10.0
        c = PANEL // 2
        assert strong[c, c, 0] > weak[c, c, 0] + 60
    bar = png[TITLE_PX:-TITLE_PX, -CBAR_PX:]
    assert (bar.std(axis=(0, 1)) > 20).any()  # the colour bar is drawn, not a blank band


def test_unknown_scale_is_refused(tmp_path):
    with pytest.raises(ValueError, match="per-map, shared"):
        draw_attention_figure(_rows(), tmp_path / "x.png", scale="log")
