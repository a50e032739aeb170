"""MultiGen's sample grid: labels on a background, inside the image, clear of each other."""

from __future__ import annotations

import itertools
import random

import numpy as np
from PIL import Image

from tcompose.evaluate.multigen.report import PALETTE, _overlap, place_labels, write_grid


def _inside(corner, size, width, height):
    (x, y), (w, h) = corner, size
    return 0 <= x and 0 <= y and x + w <= width and y + h <= height


def test_labels_of_one_crowded_box_stay_inside_and_apart():
    # five detections of nearly the same box at the image's top-left corner: "above" is off the image
    boxes = [(2 + i, 1 + i, 150 + i, 150 + i) for i in range(5)]
    sizes = [(70, 15)] * 5
    corners = place_labels(boxes, sizes, 256, 256)
    rects = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(corners, sizes)]
    assert all(_inside(c, s, 256, 256) for c, s in zip(corners, sizes))
    assert all(_overlap(a, b) == 0 for a, b in itertools.combinations(rects, 2))
    assert corners[0][0] == 2 and corners[0][1] <= 1  # the most confident label sits at its box's corner


def test_random_boxes_labels_inside_and_apart_where_there_is_room():
    rng = random.Random(0)
    for _ in range(200):
        boxes = []
        for _ in range(rng.randint(1, 4)):
            x0, y0 = rng.uniform(0, 200), rng.uniform(0, 200)
            boxes.append((x0, y0, min(255, x0 + rng.uniform(40, 200)), min(255, y0 + rng.uniform(40, 200))))
        sizes = [(rng.uniform(30, 90), 15) for _ in boxes]
        corners = place_labels(boxes, sizes, 256, 256)
        assert all(_inside(c, s, 256, 256) for c, s in zip(corners, sizes))
        rects = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(corners, sizes)]
        assert all(_overlap(a, b) == 0 for a, b in itertools.combinations(rects, 2))


def test_grid_draws_filled_labels_in_each_categorys_colour(tmp_path):
    grey = tmp_path / "a.png"
    Image.fromarray(np.full((128, 128, 3), 90, np.uint8)).save(grey)
    path = write_grid(tmp_path / "grid.png", ["a cat and a dog"], [[grey, tmp_path / "missing.png"]],
                      [[[("cat", 0.9, [10, 10, 100, 100]), ("dog", 0.5, [12, 12, 102, 102])], []]], cell=128)
    px = np.asarray(Image.open(path).convert("RGB")).astype(int)
    label_area = px[22:160, :128]  # the first image, below the prompt's line
    for colour in PALETTE[:2]:  # cat, then dog: a filled label background of each colour
        assert (np.abs(label_area - colour).sum(-1) == 0).sum() > 150
    assert (px[40:140, 140:250] == 200).all()  # the missing image stays grey
