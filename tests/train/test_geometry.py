"""train-unet's image and mask geometry against a transcription of the original's torchvision transforms.

The reference transforms images with ``Resize(R, BILINEAR), CenterCrop(R), ToTensor(), Normalize([0.5], [0.5])``
and masks (RGBA PNGs) with the same without Normalize, then keeps channel 0 and divides by the maximum. The
functions below transcribe torchvision 0.16's code for a PIL input line by line (torchvision itself cannot be
installed beside this project's CPU torch).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tcompose.train.geometry import load_mask, load_pixels, resize_crop

# ------------------------------------------------------------------- torchvision, transcribed for PIL images


def tv_resize(img: Image.Image, size: int) -> Image.Image:
    """transforms.functional.resize(img, size) with an int size: _compute_resized_output_size, then PIL."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), Image.BILINEAR)


def tv_center_crop(img: Image.Image, output_size: int) -> Image.Image:
    image_width, image_height = img.size
    crop_height = crop_width = output_size
    crop_top = int(round((image_height - crop_height) / 2.0))
    crop_left = int(round((image_width - crop_width) / 2.0))
    return img.crop((crop_left, crop_top, crop_left + crop_width, crop_top + crop_height))


def tv_to_tensor(pic: Image.Image) -> torch.Tensor:
    img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
    img = img.view(pic.size[1], pic.size[0], len(pic.getbands())).permute((2, 0, 1)).contiguous()
    return img.to(dtype=torch.float32).div(255)


def tv_normalize(t: torch.Tensor) -> torch.Tensor:
    mean = torch.as_tensor([0.5], dtype=t.dtype)[:, None, None]
    std = torch.as_tensor([0.5], dtype=t.dtype)[:, None, None]
    return t.sub(mean).div(std)


def reference_image(img: Image.Image, r: int) -> torch.Tensor:
    return tv_normalize(tv_to_tensor(tv_center_crop(tv_resize(img.convert("RGB"), r), r)))


def reference_mask(rgba: Image.Image, r: int) -> torch.Tensor:
    """data_utils.py: attn_transforms(Image.open(path)); 4 channels -> channel 0; / max when > 0."""
    attn_gt = tv_to_tensor(tv_center_crop(tv_resize(rgba, r), r))
    if attn_gt.shape[0] == 4:
        attn_gt = attn_gt[0].unsqueeze(0)
    if attn_gt.max() > 0:
        attn_gt = attn_gt / attn_gt.max()
    return attn_gt[0]


# ---------------------------------------------------------------------------------------------------------


def _jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(smooth).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _mask(w: int, h: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[h // 5 : h // 2, w // 7 : w - w // 3] = True
    m[h - h // 4 :, :3] = True  # touching the left edge, cropped away for landscape images
    return m


def _rgba(mask: np.ndarray) -> Image.Image:
    """The original's mask files: RGBA, white foreground, opaque."""
    v = mask.astype(np.uint8) * 255
    return Image.fromarray(np.stack([v, v, v, np.full_like(v, 255)], -1), "RGBA")


def test_the_shorter_side_becomes_r_truncating_and_the_crop_rounds_half_to_even():
    p = resize_crop(640, 427, 512)  # a COCO landscape image
    assert p.resized == (767, 512) and (p.left, p.top) == (128, 0)  # (767 - 512) / 2 = 127.5 -> 128
    p = resize_crop(427, 640, 512)
    assert p.resized == (512, 767) and (p.left, p.top) == (0, 128)
    p = resize_crop(500, 375, 512)  # upscaled: 682.67 -> 682; (682 - 512) / 2 = 85
    assert p.resized == (682, 512) and (p.left, p.top) == (85, 0)
    p = resize_crop(611, 400, 512)  # 782.08 -> 782; (782 - 512) / 2 = 135
    assert p.resized == (782, 512) and p.left == 135
    assert resize_crop(100, 61, 8).left == 2  # 13.11 -> 13; (13 - 8) / 2 = 2.5 -> 2 (half to even)
    assert resize_crop(64, 64, 64).box == (0, 0, 64, 64)


@pytest.mark.parametrize("w,h,r", [(640, 427, 64), (427, 640, 64), (333, 200, 96), (77, 50, 32), (64, 64, 64)])
def test_image_and_mask_equal_the_reference_transforms(w, h, r):
    data = _jpeg(w, h, seed=w + h)
    pixels, placement = load_pixels(data, r)
    with Image.open(io.BytesIO(data)) as im:
        expect = reference_image(im, r)
    assert torch.equal(pixels, expect)
    mask = _mask(w, h)
    got = load_mask(mask, placement)
    assert torch.equal(got, reference_mask(_rgba(mask), r))
    assert got.max() == 1.0 and 0 < got.mean() < 1  # bilinear edges are fractional, the inside is 1


def test_flip_mirrors_image_and_mask_together():
    data, mask = _jpeg(90, 60, 0), _mask(90, 60)
    pixels, placement = load_pixels(data, 48)
    flipped, _ = load_pixels(data, 48, flip=True)
    assert torch.equal(flipped, pixels.flip(-1))
    assert torch.equal(load_mask(mask, placement, flip=True), load_mask(mask, placement).flip(-1))


def test_a_mask_of_another_size_than_its_image_is_refused():
    _, placement = load_pixels(_jpeg(90, 60, 0), 48)
    with pytest.raises(ValueError, match="mask of shape"):
        load_mask(np.zeros((60, 91), bool), placement)


def test_training_examples_use_the_reference_geometry(tmp_path):
    """A row of a masks dataset becomes exactly the reference's pixels and mask."""
    from tcompose.io.datasets import ShardedWriter, encode_mask, image_struct
    from tcompose.models.families import load_components
    from tcompose.testing.tiny_sd import write_tiny_pipeline
    from tcompose.train.examples import TrainingExamples, prepare_rows

    w, h, r = 120, 80, 48
    data, mask = _jpeg(w, h, 1), _mask(w, h)
    row = {"image_id": 1, "file_name": "1.jpg", "image": image_struct(data, "1.jpg"), "width": w, "height": h,
           "caption": "a ball on a table", "phrases": ["ball"], "categories": ["ball"],
           "masks": [image_struct(encode_mask(mask))], "source": "test"}
    writer = ShardedWriter(tmp_path / "masks", "masks", "test", {"t": 1})
    for shard in writer.plan(1):
        writer.write_shard(shard, [row], {}, [])
    writer.finalize(1)
    comps = load_components(write_tiny_pipeline(tmp_path / "sd", corpus=["a ball on a table"]))
    prep = prepare_rows(tmp_path / "masks", comps)
    example = TrainingExamples(prep, r, (4, r // 2, r // 2), 1000, seed=0)[(0, 0)]
    with Image.open(io.BytesIO(data)) as im:
        assert torch.equal(example["pixel_values"], reference_image(im, r))
    assert torch.equal(example["masks"][0], reference_mask(_rgba(mask), r))
