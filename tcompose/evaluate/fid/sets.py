"""The caption-image sets of the FID protocol: which captions are generated, which images they are scored against.

- **COCO** (the protocol TokenCompose's authors gave, following the SD1.4 model card): ``n`` (10,000) captions
  drawn with ``seed`` from COCO val2017's caption annotations, one image generated per caption; the reference
  is every val2017 image of the folder (5,000). :func:`coco_pairs` reads a COCO-format folder
  (``annotations/captions_val2017.json`` and ``val2017/``).
- **Flickr30K**: ``n`` (1,000) caption-image pairs: the images of a split file (Flickr30K Entities'
  ``val.txt``, one image id per line; without one, all images), ``n`` of them drawn with ``seed`` when there
  are more, and for each one of its captions drawn with ``seed``; the reference is those ``n`` images.
  :func:`flickr30k_pairs` reads the captions from ``results_20130124.token`` (``1000092795.jpg#0<TAB>text``),
  Kaggle's ``results.csv`` (``image_name| comment_number| comment``) or ``captions.txt`` (``image,caption``),
  and the images from ``flickr30k-images/``, ``flickr30k_images/``, ``Images/`` or the folder itself.

A set is a list of :class:`Pair` (``prompt_id`` = position, the generated image's id); the run writes it to
``OUT/sets/NAME.json`` so another group can reuse exactly these captions and images.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from ...io.errors import UserError

SETS = ("coco", "flickr30k")
DEFAULT_SIZES = {"coco": 10_000, "flickr30k": 1_000}


@dataclass(frozen=True)
class Pair:
    """One caption to generate (``prompt_id``) and the source image it describes (``image``, a path relative to
    the dataset folder)."""

    prompt_id: int
    caption: str
    image_id: str
    image: str
    caption_id: str

    def to_dict(self) -> dict:
        return asdict(self)


def coco_pairs(folder: str | Path, n: int = 10_000, seed: int = 0, split: str = "val2017"
               ) -> tuple[list[Pair], list[str]]:
    """(the drawn captions, every reference image of the split, relative to ``folder``) of a COCO-format folder."""
    folder = Path(folder)
    path = folder / "annotations" / f"captions_{split}.json"
    if not path.is_file():
        raise UserError(f"--coco {folder}: no annotations/captions_{split}.json there; pass the COCO folder that "
                        f"holds annotations/ and {split}/ (see data/README.md)")
    data = json.loads(path.read_text(encoding="utf-8"))
    files = {int(im["id"]): im["file_name"] for im in data["images"]}
    image_dir = folder / split
    present = {i: image_dir / f for i, f in files.items() if (image_dir / f).is_file()}
    if not present:
        raise UserError(f"--coco {folder}: no image of {path.name} is in {image_dir}")
    anns = sorted((a for a in data["annotations"] if int(a["image_id"]) in present), key=lambda a: int(a["id"]))
    if n < 1:
        raise UserError(f"--coco-captions must be >= 1, got {n}")
    if n > len(anns):
        raise UserError(f"--coco-captions {n}: {path.name} has only {len(anns)} captions whose image is in "
                        f"{image_dir}; pass --coco-captions {len(anns)} or fewer (the protocol's 10,000 needs the "
                        "whole val2017)")
    drawn = sorted(random.Random(seed).sample(anns, n), key=lambda a: int(a["id"]))
    rel = {i: f"{split}/{files[i]}" for i in present}
    pairs = [Pair(i, " ".join(str(a["caption"]).split()), str(a["image_id"]), rel[int(a["image_id"])], str(a["id"]))
             for i, a in enumerate(drawn)]
    return pairs, [rel[i] for i in sorted(present)]


def _flickr_captions(folder: Path) -> dict[str, list[str]]:
    caps: dict[str, list[str]] = {}
    token = folder / "results_20130124.token"
    if token.is_file():
        for line in token.read_text(encoding="utf-8").splitlines():
            if "\t" in line:
                key, text = line.split("\t", 1)
                caps.setdefault(key.split("#")[0], []).append(text.strip())
        return caps
    kaggle = folder / "results.csv"
    if kaggle.is_file():
        for row in kaggle.read_text(encoding="utf-8").splitlines()[1:]:
            parts = [p.strip() for p in row.split("|")]
            if len(parts) >= 3 and parts[2]:
                caps.setdefault(parts[0], []).append("|".join(parts[2:]).strip())
        return caps
    plain = folder / "captions.txt"
    if plain.is_file():
        with plain.open(encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                caps.setdefault(row["image"], []).append(row["caption"].strip())
        return caps
    raise UserError(f"--flickr30k {folder}: no captions file there (results_20130124.token, results.csv or "
                    "captions.txt)")


def _flickr_images(folder: Path) -> Path:
    for name in ("flickr30k-images", "flickr30k_images", "Images"):
        if (folder / name).is_dir():
            return folder / name
    return folder


def flickr30k_pairs(folder: str | Path, n: int = 1_000, seed: int = 0,
                    split_file: str | Path | None = None) -> tuple[list[Pair], list[str]]:
    """(``n`` caption-image pairs, their ``n`` images as the reference, relative to ``folder``) of a Flickr30K
    folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--flickr30k {folder} is not a folder")
    caps = _flickr_captions(folder)
    image_dir = _flickr_images(folder)
    ids = sorted(k for k in caps if (image_dir / k).is_file())
    if split_file is not None:
        wanted = {line.strip() for line in Path(split_file).read_text().splitlines() if line.strip()}
        ids = [k for k in ids if Path(k).stem in wanted or k in wanted]
        if not ids:
            raise UserError(f"--flickr30k-split {split_file}: none of its {len(wanted)} ids has an image and a "
                            f"caption in {folder}")
    if not ids:
        raise UserError(f"--flickr30k {folder}: no image of the captions file is in {image_dir}")
    if n < 1:
        raise UserError(f"--flickr30k-pairs must be >= 1, got {n}")
    if n > len(ids):  # as --coco-captions: fewer pairs than asked would change what the FID is of, silently
        where = f" among the ids of --flickr30k-split {split_file}" if split_file is not None else ""
        raise UserError(f"--flickr30k-pairs {n}: {folder} has only {len(ids)} images with captions{where}; pass "
                        f"--flickr30k-pairs {len(ids)} or fewer (the protocol's 1,000 are the images of Flickr30K Entities' "
                        "val.txt)")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(ids, n)) if len(ids) > n else ids
    pairs = []
    for i, k in enumerate(chosen):
        j = rng.randrange(len(caps[k]))
        image = (image_dir / k).relative_to(folder).as_posix()
        pairs.append(Pair(i, " ".join(caps[k][j].split()), Path(k).stem, image, f"{Path(k).stem}#{j}"))
    return pairs, [p.image for p in pairs]


def write_set(path: Path, name: str, pairs: list[Pair], reference: list[str], source: dict) -> None:
    """``OUT/sets/NAME.json``; a rerun must find the same set (another one is refused)."""
    from ...io.datasets import write_json_atomic

    record = {"set": name, "source": source, "pairs": [p.to_dict() for p in pairs],
              "reference": list(reference)}
    if path.is_file():
        old = json.loads(path.read_text())
        if old["pairs"] != record["pairs"] or old["reference"] != record["reference"]:
            raise UserError(f"{path}: this folder was run with another {name} set (other captions, images or "
                            "seed); use a new --output")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
