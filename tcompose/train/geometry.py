"""The image and mask geometry of train-unet: the original TokenCompose implementation's, step for step.

The reference (``train_token_compose.py``) transforms both the image and each mask with torchvision's
``Resize(R, BILINEAR)``, ``CenterCrop(R)``, ``ToTensor()`` (and ``Normalize([0.5], [0.5])`` for the image);
a mask then keeps its first channel and is divided by its maximum. Without torchvision, the same steps:

1. the shorter side becomes R, the longer one ``int(R * long / short)`` (truncated: 640x427 -> 767x512),
   resized by PIL's bilinear filter (what torchvision calls on a PIL image);
2. the R x R centre crop at ``left = int(round((W - R) / 2.0))``, ``top = int(round((H - R) / 2.0))``
   (Python's round, half to even: 127.5 -> 128);
3. pixels ``/ 255`` in float32, then ``(x - 0.5) / 0.5`` for the image; a mask (stored as a 1-bit PNG,
   foreground 255 once widened to 8 bits, as the reference's RGBA masks were) ``/ 255``, then ``/ max``.

:func:`resize_crop` returns the resized size and the crop's top-left corner too: SDXL's micro-conditioning
(``original_size``, ``crops_coords_top_left``, ``target_size``) is computed from them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

#: Bumped when this geometry changes: the latent cache's fingerprint includes it.
GEOMETRY_VERSION = 2


@dataclass(frozen=True)
class Placement:
    """Where an image lands in the R x R training square: its original and resized sizes, the crop corner."""

    original: tuple[int, int]  # (width, height) of the stored image
    resized: tuple[int, int]  # (width, height) after the shorter side became R
    left: int
    top: int
    size: int  # R

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.left, self.top, self.left + self.size, self.top + self.size


def resize_crop(width: int, height: int, resolution: int) -> Placement:
    """torchvision's ``Resize(R)`` output size and ``CenterCrop(R)`` offsets for a ``width`` x ``height`` image."""
    r = resolution
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(r * long / short)
    new_w, new_h = (r, new_long) if width <= height else (new_long, r)
    left = int(round((new_w - r) / 2.0))
    top = int(round((new_h - r) / 2.0))
    return Placement((width, height), (new_w, new_h), left, top, r)


def _place(im, placement: Placement):
    from PIL import Image

    if im.size != placement.resized:
        im = im.resize(placement.resized, Image.BILINEAR)
    return im.crop(placement.box)


def load_pixels(image_bytes: bytes, resolution: int, flip: bool = False) -> tuple[torch.Tensor, Placement]:
    """An encoded image as the VAE's input ``[3, R, R]`` float32 in [-1, 1] (the reference's transform, then an
    optional left-right flip), and where it was placed."""
    from PIL import Image

    with Image.open(io.BytesIO(image_bytes)) as im:
        im = im.convert("RGB")
        placement = resize_crop(*im.size, resolution)
        im = _place(im, placement)
    x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).to(torch.float32).div(255)
    x = (x - 0.5) / 0.5
    return (x.flip(-1) if flip else x), placement


def load_mask(mask: np.ndarray, placement: Placement, flip: bool = False) -> torch.Tensor:
    """A boolean mask at the image's size -> ``[R, R]`` float32 in [0, 1], placed as the image (bilinear, as the
    reference resized its 8-bit masks), divided by its maximum when that is above 0."""
    from PIL import Image

    if mask.shape != (placement.original[1], placement.original[0]):
        raise ValueError(f"mask of shape {mask.shape} for an image of {placement.original[0]}x{placement.original[1]}")
    im = _place(Image.fromarray(mask.astype(np.uint8) * 255), placement)
    m = torch.from_numpy(np.array(im, dtype=np.uint8)).to(torch.float32).div(255)
    if m.max() > 0:
        m = m / m.max()
    return m.flip(-1) if flip else m
