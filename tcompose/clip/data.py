"""A crops dataset (``tcompose crops``) as CLIP training pairs: preprocessed crop, token ids, category label.

    rows = read_crops(DATA)                                  # texts, labels, image ids; images stay on disk
    train, heldout = split_by_image(rows.image_ids, 0.05, seed=0, max_heldout=5000)
    pre = Preprocess.from_config(preprocess_config)          # CLIP's resize + centre crop + normalise
    examples = CropExamples(rows, pre, tokenizer)            # examples[row] or examples[(row, number)]

The held-out split is by ``image_id``: every crop of a held-out image is held out, so no image contributes
crops to both training and evaluation. Preprocessing is deterministic (no augmentation), so an example depends
only on its row and a resumed run sees exactly the batches an uninterrupted one would
(:class:`tcompose.io.batches.MicroBatches` fixes the order).
"""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from ..io.errors import UserError
from ..io.datasets import DatasetError, RowReader, check_columns, load_manifest


@dataclass
class CropRows:
    """The text side of a crops dataset, in shard order; images are read per example through ``reader``."""

    data_dir: Path
    reader: RowReader
    texts: list[str]
    labels: list[int]  # category_id per row
    image_ids: list[int]
    ann_ids: list[int]
    categories: dict[int, str]  # category_id -> name
    class_texts: dict[int, str]  # category_id -> its most frequent caption (the zero-shot prompt)

    def __len__(self) -> int:
        return len(self.texts)


def read_crops(data_dir: str | Path) -> CropRows:
    """Read a crops dataset's captions, categories and ids (not its images); a clear error if it is unusable."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    if manifest.get("kind", "crops") != "crops":
        raise DatasetError(f"{data_dir} is a {manifest.get('kind')!r} dataset; train-clip needs a crops dataset "
                           "(make one with `tcompose crops COCO_DIR --output data/crops` and pass --data data/crops)")
    texts, labels, image_ids, ann_ids, names = [], [], [], [], {}
    counts: dict[int, Counter] = {}
    for f in check_columns(data_dir, "crops"):
        t = pq.read_table(f, columns=["text", "category", "category_id", "image_id", "ann_id"]).to_pydict()
        for i, (text, cat, cid) in enumerate(zip(t["text"], t["category"], t["category_id"])):
            if not text or cid is None:
                raise DatasetError(f"{f}: row {i} (ann_id {t['ann_id'][i]}) has no text or category_id; "
                                   "write the crops dataset again with `tcompose crops`")
            if names.setdefault(cid, cat) != cat:
                raise DatasetError(f"{f}: category_id {cid} is named both {names[cid]!r} and {cat!r}")
            counts.setdefault(cid, Counter())[text] += 1
        texts += t["text"]
        labels += t["category_id"]
        image_ids += t["image_id"]
        ann_ids += t["ann_id"]
    if not texts:
        raise DatasetError(f"{data_dir}: the crops dataset has no rows")
    class_texts = {cid: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for cid, c in sorted(counts.items())}
    return CropRows(data_dir, RowReader(data_dir, ["image"]), texts, labels, image_ids, ann_ids,
                    dict(sorted(names.items())), class_texts)


def split_by_image(image_ids: list[int], fraction: float, seed: int, max_heldout: int | None = None) -> tuple[list[int], list[int]]:
    """Train and held-out row indices: a seeded ``fraction`` of the images (at least one, never all) is held out
    with all of its crops; ``max_heldout`` caps the held-out rows (whole images, in the seeded order)."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"--eval-fraction must be in [0, 1), got {fraction}")
    ids = sorted(set(image_ids))
    n_eval = min(math.ceil(fraction * len(ids)), len(ids) - 1) if fraction > 0 else 0
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    rows_of: dict[int, list[int]] = {}
    for row, iid in enumerate(image_ids):
        rows_of.setdefault(iid, []).append(row)
    held: set[int] = set()
    n_rows = 0
    for i in perm[:n_eval]:
        if max_heldout is not None and n_rows + len(rows_of[ids[i]]) > max_heldout and held:
            break
        held.add(ids[i])
        n_rows += len(rows_of[ids[i]])
    train = [r for r, iid in enumerate(image_ids) if iid not in held]
    heldout = [r for r, iid in enumerate(image_ids) if iid in held]
    return train, heldout


@dataclass
class Preprocess:
    """CLIP's image preprocessing without torchvision: shortest side -> ``size`` (bicubic), centre crop
    ``crop`` x ``crop``, scale to [0, 1], normalise by ``mean`` / ``std``. Returns ``float32 [3, crop, crop]``."""

    size: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_config(cls, cfg: dict) -> "Preprocess":
        size = cfg.get("size", {})
        crop = cfg.get("crop_size", {})
        short = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
        side = crop.get("height") if isinstance(crop, dict) else crop
        return cls(int(short), int(side or short), tuple(cfg["image_mean"]), tuple(cfg["image_std"]))

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        im = image.convert("RGB")
        w, h = im.size
        if (w <= h and w != self.size) or (h < w and h != self.size):
            # CLIPImageProcessor's rounding: the short side becomes ``size``, the long side int(size * long / short)
            nw, nh = (self.size, int(self.size * h / w)) if w <= h else (int(self.size * w / h), self.size)
            im = im.resize((nw, nh), Image.BICUBIC)
            w, h = nw, nh
        top, left = (h - self.crop) // 2, (w - self.crop) // 2  # CLIPImageProcessor's centre: floor
        im = im.crop((left, top, left + self.crop, top + self.crop))  # pads with black if the image is smaller
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """``[N, 77]`` token ids of ``texts``, padded with the tokenizer's pad token and truncated."""
    length = tokenizer.model_max_length if 0 < int(tokenizer.model_max_length) < 100_000 else 77
    return tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


class CropExamples(Dataset):
    """Indexed by ``row`` or ``(row, example_number)`` (what MicroBatches yields); returns
    ``{"pixel_values" [3, S, S], "input_ids" [77], "label" (category_id)}``. Each distinct caption is tokenised
    once (``caption_ids [U, 77]``; ``caption_of [N]`` maps rows to them), not once per crop."""

    def __init__(self, rows: CropRows, preprocess: Preprocess, tokenizer):
        self.rows = rows
        self.preprocess = preprocess
        unique = sorted(set(rows.texts))
        index = {t: i for i, t in enumerate(unique)}
        self.caption_ids = tokenize(tokenizer, unique)
        self.caption_of = torch.tensor([index[t] for t in rows.texts], dtype=torch.int32)

    def __len__(self) -> int:
        return len(self.rows)

    def input_ids(self, rows: list[int]) -> torch.Tensor:
        return self.caption_ids[self.caption_of[rows].long()]

    def __getitem__(self, key) -> dict:
        from PIL import Image

        row = key[0] if isinstance(key, tuple) else key
        record = self.rows.reader[row]
        try:
            with Image.open(io.BytesIO(record["image"]["bytes"])) as im:
                pixels = self.preprocess(im)
        except Exception as err:  # noqa: BLE001  (name the row, keep the cause)
            raise DatasetError(f"{self.rows.data_dir}: row {row} (ann_id {self.rows.ann_ids[row]}) has an unreadable "
                               f"crop image ({err}); write the crops dataset again") from err
        return {"pixel_values": pixels, "input_ids": self.caption_ids[int(self.caption_of[row])], "label": self.rows.labels[row]}


def collate(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long),
    }
