"""The embedded default dataset: generated COCO-format scenes of a few coloured objects on a table.

``make_scenes(out_dir)`` writes the same layout as real COCO (``annotations/captions_{split}.json``,
``annotations/instances_{split}.json``, ``{split}/*.jpg``), so :mod:`tcompose.data.coco` and every stage read it
unchanged. Each image is a table-coloured, lightly noisy backdrop with 1-3 objects of distinct categories
(``ball`` = disc, ``box`` = square, ``cup`` = trapezoid, ``kite`` = diamond) in distinct colours, placed
without overlap and 25-38 % of the image side large, so they survive the 8x8 / 16x16 attention maps of a
small UNet. Each object's pixels are painted through the mask that pycocotools rasterises from the
annotation polygon, so the instance segmentation agrees with the drawn pixels exactly (up to JPEG noise at
the edges). Each image gets 1-5 captions such as ``"a photo of a blue cup, a red ball and a green box"``,
from varied templates with the objects in random order. Every image derives from ``(seed, index)`` alone,
so the same seed gives the same files, and a larger ``n_images`` extends a smaller one.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

#: category id -> name; the shape each category is drawn as is fixed by the name.
CATEGORIES = {1: "ball", 2: "box", 3: "cup", 4: "kite"}
#: colour name -> RGB, chosen far from each other and from the table backdrop.
COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 70, 215),
    "yellow": (240, 215, 40),
    "purple": (145, 55, 190),
}
TABLE_RGB = (150, 112, 74)

_TEMPLATES = (
    "{objects}",
    "{objects} on a table",
    "a photo of {objects}",
    "a photo of {objects} on a wooden table",
    "there is {objects} on the table",
    "a table with {objects}",
    "an image showing {objects}",
    "on a brown table lie {objects}",
    "a close-up picture of {objects} on a table top",
    "we can see {objects} here",
)


def _polygon(name: str, cx: float, cy: float, s: float) -> list[float]:
    """The outline of a ``name`` object of size ``s`` centred at ``(cx, cy)``, as a flat COCO polygon."""
    h = s / 2
    if name == "ball":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([cx + h * np.cos(t), cy + h * np.sin(t)], 1)
    elif name == "box":
        pts = np.array([[cx - h, cy - h], [cx + h, cy - h], [cx + h, cy + h], [cx - h, cy + h]])
    elif name == "cup":
        pts = np.array([[cx - h, cy - h], [cx + h, cy - h], [cx + 0.6 * h, cy + h], [cx - 0.6 * h, cy + h]])
    elif name == "kite":
        pts = np.array([[cx, cy - h], [cx + 0.8 * h, cy], [cx, cy + h], [cx - 0.8 * h, cy]])
    else:
        raise ValueError(f"no shape for category {name!r}; choose from {sorted(CATEGORIES.values())}")
    return [round(float(v), 2) for v in pts.reshape(-1)]


def _place(rng: np.random.Generator, n: int, size: int, min_frac: float, max_frac: float) -> list[tuple]:
    """Up to ``n`` non-overlapping squares ``(cx, cy, s)`` inside the image (rejection sampling)."""
    placed: list[tuple[float, float, float]] = []
    for _ in range(n):
        for _try in range(100):
            s = rng.uniform(min_frac, max_frac) * size
            cx, cy = rng.uniform(s / 2 + 1, size - s / 2 - 1, size=2)
            gap = 2.0
            if all(abs(cx - x) > (s + t) / 2 + gap or abs(cy - y) > (s + t) / 2 + gap for x, y, t in placed):
                placed.append((float(cx), float(cy), float(s)))
                break
    return placed


def _objects_text(rng: np.random.Generator, objects: list[tuple[str, str]]) -> str:
    words = []
    for name, colour in (objects[i] for i in rng.permutation(len(objects))):
        words.append(f"a {colour} {name}" if rng.random() < 0.8 else f"a {name}")
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


def _scene(seed: int, index: int, size: int, max_objects: int, captions: tuple[int, int], sizes: tuple) -> tuple:
    """One image: (RGB uint8 array, [(category name, colour, polygon, mask)], [captions])."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:size, 0:size]
    shade = 1.0 + 0.12 * (xx + yy) / (2 * size) - 0.06
    img = np.asarray(TABLE_RGB, dtype=np.float64)[None, None] * shade[..., None]
    img += rng.normal(0, 6, size=(size, size, 3))
    n = int(rng.integers(1, max_objects + 1))
    names = [CATEGORIES[i] for i in rng.choice(sorted(CATEGORIES), size=min(n, len(CATEGORIES)), replace=False)]
    colours = list(rng.choice(sorted(COLOURS), size=len(names), replace=False))
    objects = []
    for (cx, cy, s), name, colour in zip(_place(rng, len(names), size, *sizes), names, colours):
        poly = _polygon(name, cx, cy, s)
        mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], size, size))).astype(bool)
        img[mask] = np.asarray(COLOURS[colour], dtype=np.float64) + rng.normal(0, 4, size=(int(mask.sum()), 3))
        objects.append((name, str(colour), poly, mask))
    pairs = [(name, colour) for name, colour, _, _ in objects]
    n_captions = min(int(rng.integers(captions[0], captions[1] + 1)), len(_TEMPLATES))
    texts = [
        _TEMPLATES[int(t)].format(objects=_objects_text(rng, pairs))
        for t in rng.choice(len(_TEMPLATES), size=n_captions, replace=False)
    ]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects, texts


def make_scenes(
    out_dir: str | Path,
    n_images: int = 64,
    size: int = 64,
    split: str = "train2017",
    seed: int = 0,
    max_objects: int = 3,
    captions_per_image: tuple[int, int] = (1, 5),
    object_frac: tuple[float, float] = (0.25, 0.38),
    corrupt: int = 0,
    quality: int = 95,
) -> Path:
    """Write a synthetic COCO-format dataset to ``out_dir`` and return ``out_dir``.

    ``n_images`` scenes of ``size`` x ``size`` pixels with 1..``max_objects`` objects each, object sides a
    fraction ``object_frac`` of ``size``, ``captions_per_image`` (min, max) captions. ``corrupt`` appends that
    many more images (annotated and captioned like the others) whose JPEG files are damaged and do not
    decode, for testing how stages skip bad inputs. Annotations carry an extra ``color`` field.
    """
    from PIL import Image

    if n_images < 0 or corrupt < 0 or not 1 <= max_objects <= len(CATEGORIES):
        raise ValueError(f"need n_images >= 0, corrupt >= 0, 1 <= max_objects <= {len(CATEGORIES)}")
    out = Path(out_dir)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / split).mkdir(parents=True, exist_ok=True)
    images, instances, captions = [], [], []
    for index in range(n_images + corrupt):
        image_id = index + 1
        pixels, objects, texts = _scene(seed, index, size, max_objects, captions_per_image, object_frac)
        file_name = f"{image_id:012d}.jpg"
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, subsampling=0)
        data = buf.getvalue()
        if index >= n_images:  # keep the JPEG header, replace the compressed data with noise
            junk = np.random.default_rng([seed, index, 1]).integers(0, 256, len(data) - 20, dtype=np.uint8)
            data = data[:20] + junk.tobytes()
        (out / split / file_name).write_bytes(data)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for name, colour, poly, mask in objects:
            ys, xs = np.nonzero(mask)
            instances.append(
                {
                    "id": len(instances) + 1,
                    "image_id": image_id,
                    "category_id": next(i for i, n in CATEGORIES.items() if n == name),
                    "segmentation": [poly],
                    "area": int(mask.sum()),
                    "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                    "iscrowd": 0,
                    "color": colour,
                }
            )
        captions += [{"id": len(captions) + 1, "image_id": image_id, "caption": t} for t in texts]
    info = {"description": f"tcompose synthetic scenes (seed {seed}, {size}px)", "version": "1.0"}
    categories = [{"id": i, "name": n, "supercategory": "object"} for i, n in CATEGORIES.items()]
    _write_json(out / "annotations" / f"instances_{split}.json",
                {"info": info, "images": images, "annotations": instances, "categories": categories})
    _write_json(out / "annotations" / f"captions_{split}.json",
                {"info": info, "images": images, "annotations": captions})
    return out


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)
