"""Box maths of the crops stage: margin, square, integer crop boxes, padded cuts, output sizes. Pure functions.

Conventions: a COCO box is ``[x, y, w, h]`` in source pixels (floats, ``x`` and ``y`` the top-left corner);
a crop box is ``(x0, y0, x1, y1)`` in integer source pixels, ``x1``/``y1`` exclusive, and may reach past the
image edge. What lies outside the image is filled with :data:`CLIP_MEAN_RGB` rather than shifting the box
inwards, so an object cut off by the image edge stays where it was relative to the crop.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

#: OpenAI CLIP's normalisation mean (0.48145466, 0.4578275, 0.40821073) in 0..255, rounded: padding and
#: ``--masked`` background in this colour become ~0 after CLIP's preprocessing (a neutral input).
CLIP_MEAN_RGB = (123, 117, 104)

# Box coordinates are rounded to this many decimals before floor/ceil, so that float noise
# (10 + 20 + 0.1 * 20 = 32.000000000000004) never adds a pixel to a crop.
_DECIMALS = 6


def check_bbox(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    """``bbox`` as four finite floats with positive width and height; ValueError otherwise."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise ValueError(f"bbox {bbox!r} is not four numbers [x, y, w, h]") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise ValueError(f"bbox {list(bbox)} needs finite values and a positive width and height")
    return x, y, w, h


def crop_box(bbox: Sequence[float], margin: float = 0.1, square: bool = True) -> tuple[int, int, int, int]:
    """The integer region cut for a COCO box ``[x, y, w, h]``: ``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive.

    1. Margin: each side moves out by ``margin`` times the box's extent along that axis (``margin=0.1``: the
       region is 1.2 w x 1.2 h).
    2. Integer pixels: left/top floored, right/bottom ceiled, so the region always contains the whole box.
    3. ``square``: the shorter side grows to the longer one around the centre (an odd extra pixel goes to
       the right/bottom), so the box's centre is the crop's centre within half a pixel.
    """
    x, y, w, h = check_bbox(bbox)
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be >= 0, got {margin}")
    x0 = math.floor(round(x - margin * w, _DECIMALS))
    y0 = math.floor(round(y - margin * h, _DECIMALS))
    x1 = math.ceil(round(x + w + margin * w, _DECIMALS))
    y1 = math.ceil(round(y + h + margin * h, _DECIMALS))
    if square:
        side = max(x1 - x0, y1 - y0)
        x0 -= (side - (x1 - x0)) // 2
        y0 -= (side - (y1 - y0)) // 2
        x1, y1 = x0 + side, y0 + side
    return x0, y0, x1, y1


def cut(pixels: np.ndarray, box: Sequence[int], fill) -> np.ndarray:
    """The region ``box = (x0, y0, x1, y1)`` of ``pixels`` (HxW or HxWxC), ``fill`` where it leaves the image.

    Returns a new array of shape ``(y1 - y0, x1 - x0, ...)`` and the dtype of ``pixels``.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty crop box {tuple(box)}")
    height, width = pixels.shape[:2]
    out = np.empty((y1 - y0, x1 - x0) + pixels.shape[2:], dtype=pixels.dtype)
    out[...] = fill
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = pixels[sy0:sy1, sx0:sx1]
    return out


def output_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Size ``(w, h)`` a ``width`` x ``height`` crop is resized to: its longer side becomes ``size``.

    The aspect ratio is kept (the shorter side rounds half up, at least 1 pixel); a square crop becomes
    ``size`` x ``size``.
    """
    if width < 1 or height < 1 or size < 1:
        raise ValueError(f"need a positive crop and output size, got {width}x{height} -> {size}")
    scale = size / max(width, height)
    return max(1, math.floor(width * scale + 0.5)), max(1, math.floor(height * scale + 0.5))


def inside_fraction(box: Sequence[int], width: int, height: int) -> float:
    """Share of the crop box's area that lies inside a ``width`` x ``height`` image (1.0: no padding)."""
    x0, y0, x1, y1 = box
    inside = max(0, min(x1, width) - max(x0, 0)) * max(0, min(y1, height) - max(y0, 0))
    return inside / ((x1 - x0) * (y1 - y0))
