"""Reading a COCO-format folder: images, captions and instance masks.

Layout (real COCO 2017, and what :mod:`tcompose.data.synthetic` writes)::

    COCO_DIR/
      annotations/captions_{split}.json     images + captions (5 per image in COCO)
      annotations/instances_{split}.json    images + instance annotations + categories
      {split}/000000397133.jpg ...          the images

Instance segmentations come in the three COCO encodings (polygons, uncompressed RLE with a list of
``counts`` as used for crowd regions, compressed RLE with a string of ``counts``) and are decoded with
pycocotools into boolean HxW arrays at the image's annotated resolution.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..io.errors import UserError


class CocoError(UserError):
    """A COCO folder or file that cannot be read; the message names the path and the fix."""


class ImageReadError(CocoError):
    """One image file that is missing or does not decode; callers skip the image and report ``reason``."""

    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class CocoImage:
    """One image of the split. ``annotations`` are the raw COCO instance dicts, in file order."""

    id: int
    file_name: str
    width: int
    height: int
    captions: tuple[str, ...] = ()
    annotations: tuple[dict, ...] = ()


def _load_json(path: Path, kind: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CocoError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); download or regenerate it") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CocoError(f"{path} cannot be read ({e}); check the file and its permissions") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CocoError(f"{path} has no 'images' list: it is not a COCO {kind} file")
    if not isinstance(data.get("annotations"), list):
        raise CocoError(f"{path} has no 'annotations' list: it is not a COCO {kind} file")
    return data


def available_splits(root: str | Path, kind: str = "captions") -> list[str]:
    """The splits that have an ``annotations/{kind}_{split}.json`` file under ``root``."""
    folder = Path(root) / "annotations"
    if not folder.is_dir():
        return []
    return sorted(p.stem[len(kind) + 1 :] for p in folder.glob(f"{kind}_*.json"))


class CocoDataset:
    """The images of one split of a COCO-format folder, in image-id order.

    ``captions`` / ``instances`` say which annotation files the caller needs; a needed file that is missing
    is a :class:`CocoError` naming it and the splits that do exist. Images are those listed by the loaded
    annotation files (their union); ``categories`` maps category id -> name (empty without instances).
    """

    def __init__(self, root: str | Path, split: str = "train2017", captions: bool = True, instances: bool = True):
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise CocoError(
                f"{self.root} {what}: pass the COCO folder that holds annotations/ and {split}/ (see data/README.md)"
            )
        self.image_dir = self.root / split
        kinds = [k for k, wanted in (("captions", captions), ("instances", instances)) if wanted]
        files = {k: self.root / "annotations" / f"{k}_{split}.json" for k in kinds}
        for kind, path in files.items():
            if not path.is_file():
                others = [s for s in available_splits(self.root, kind) if s != split]
                fix = f"pass --split {' or --split '.join(others)}" if others else "download the COCO annotations"
                raise CocoError(f"{path} is missing: {fix} (COCO_DIR must hold annotations/{kind}_SPLIT.json)")
        if not self.image_dir.is_dir():
            raise CocoError(f"{self.image_dir} is missing: put the {split} images there, or pass the right --split")

        infos: dict[int, dict] = {}
        caps: dict[int, list[str]] = {}
        anns: dict[int, list[dict]] = {}
        self.categories: dict[int, str] = {}
        for kind, path in files.items():
            data = _load_json(path, kind)
            for im in data["images"]:
                try:
                    infos.setdefault(int(im["id"]), {k: im[k] for k in ("file_name", "width", "height")})
                except (KeyError, TypeError, ValueError):
                    raise CocoError(f"{path}: image entry {im!r:.120} lacks id/file_name/width/height") from None
            if kind == "captions":
                for a in data["annotations"]:
                    caps.setdefault(int(a["image_id"]), []).append(str(a["caption"]))
            else:
                for a in data["annotations"]:
                    anns.setdefault(int(a["image_id"]), []).append(a)
                self.categories = {int(c["id"]): str(c["name"]) for c in data.get("categories", [])}
                unknown = {a["category_id"] for v in anns.values() for a in v} - set(self.categories)
                if unknown:
                    raise CocoError(f"{path}: annotations use category ids {sorted(unknown)[:5]} not in 'categories'")
        self._images = {
            i: CocoImage(
                id=i,
                file_name=info["file_name"],
                width=int(info["width"]),
                height=int(info["height"]),
                captions=tuple(caps.get(i, ())),
                annotations=tuple(anns.get(i, ())),
            )
            for i, info in sorted(infos.items())
        }
        self.ids: list[int] = list(self._images)

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[CocoImage]:
        return iter(self._images.values())

    def __getitem__(self, image_id: int) -> CocoImage:
        try:
            return self._images[image_id]
        except KeyError:
            raise KeyError(f"image id {image_id} is not in {self.root} split {self.split}") from None

    def image_path(self, image: CocoImage) -> Path:
        return self.image_dir / image.file_name

    def read_image(self, image: CocoImage, check_size: bool = True) -> bytes:
        """The image file's bytes, after checking that it decodes fully (and has the annotated size).

        Raises :class:`ImageReadError` (with a ``reason``) for a missing, truncated or undecodable file.
        """
        from PIL import Image

        path = self.image_path(image)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageReadError(path, f"cannot be read ({e.strerror or e})") from None
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                size = im.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            detail = re.sub(r"\s*<[^>]*>", "", str(e))  # no object reprs: the reason must be reproducible
            raise ImageReadError(path, f"does not decode ({type(e).__name__}: {detail})") from None
        if check_size and size != (image.width, image.height):
            raise ImageReadError(
                path, f"is {size[0]}x{size[1]} but the annotations say {image.width}x{image.height}"
            )
        return data

    def category_names(self, image: CocoImage, include_crowd: bool = True) -> list[str]:
        """Names of the categories annotated in ``image``, in category-id order."""
        ids = {a["category_id"] for a in image.annotations if include_crowd or not a.get("iscrowd", 0)}
        return [self.categories[i] for i in sorted(ids)]

    def category_mask(self, image: CocoImage, category: int | str, include_crowd: bool = True) -> np.ndarray:
        """Union of ``category``'s instance masks in ``image`` (id or name): boolean [height, width]."""
        if isinstance(category, str):
            ids = {i for i, n in self.categories.items() if n == category}
        else:
            ids = {category}
        out = np.zeros((image.height, image.width), dtype=bool)
        for a in image.annotations:
            if a["category_id"] in ids and (include_crowd or not a.get("iscrowd", 0)):
                out |= annotation_mask(a, image.height, image.width)
        return out


# ----------------------------------------------------------------------------------------------------------
# Segmentations


def annotation_rle(annotation: dict, height: int, width: int) -> dict:
    """The compressed RLE of an instance annotation (polygons, uncompressed or compressed RLE)."""
    from pycocotools import mask as mask_utils

    seg = annotation.get("segmentation")
    if isinstance(seg, list):
        polygons = [p for p in seg if len(p) >= 6]  # fewer than 3 points cover no pixels
        if not polygons:
            return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [height, width]:
            raise CocoError(
                f"annotation {annotation.get('id')}: RLE size {seg['size']} differs from the image's {[height, width]}"
            )
        if isinstance(seg["counts"], list):
            return mask_utils.frPyObjects(seg, height, width)
        counts = seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]
        return {"size": [height, width], "counts": counts}
    raise CocoError(f"annotation {annotation.get('id')}: segmentation is neither polygons nor RLE")


def annotation_mask(annotation: dict, height: int, width: int) -> np.ndarray:
    """An instance annotation as a boolean [height, width] mask."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode(annotation_rle(annotation, height, width)).astype(bool)
