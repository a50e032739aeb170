"""``tcompose crops --from-masks MASKS_DIR``: object crops cut from a masks dataset, as the study that proposed the
CLIP extension made them (from the grounded-SAM masks of the TokenCompose training set).

    tcompose masks /data/coco --split train2017 --output data/gsam            # phrases + grounded-SAM masks
    tcompose crops --from-masks data/gsam --output data/crops-gsam            # one crop per masked phrase
    tcompose train-clip --data data/crops-gsam --output runs/clip-gsam

One crop per (row, phrase with a mask): the bounding box of the phrase's mask (``[x, y, w, h]``, whole pixels),
grown by ``--margin`` and made square with ``--square`` exactly as COCO boxes are (:mod:`tcompose.crops.geometry`),
padded with CLIP's mean grey where it leaves the image, resized to ``--size``, JPEG; ``--masked`` greys the
pixels outside the mask. Labelled ``--template`` with the phrase as written in the caption ("a photo of a wine
glass"); ``category`` is the phrase, ``category_id`` a stable 56-bit hash of it (the same phrase has the same id
in every shard and run), ``ann_id`` = row number x 1000 + the phrase's slot, ``image_id`` the row's. The same
crops dataset that ``tcompose crops COCO_DIR`` writes and train-clip reads.

Skipped and counted (listed where noted): a phrase without a mask (``phrases_skipped_no_mask``), a mask of
fewer than ``--min-area`` pixels (``phrases_skipped_small``), a row whose image does not decode or whose mask has
another size (listed). Resumable shard by shard and split over processes like the other sharded stages.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from ..io.datasets import (
    DatasetError,
    RowReader,
    ShardedWriter,
    check_columns,
    decode_mask,
    image_struct,
    load_manifest,
)
from ..io.runs import kept_on_interrupt, shards_kept
from ..io.stages import (
    refuse_empty,
    refuse_other_settings,
    remove_stale_tmp,
    wait_for_shards,
)
from .geometry import CLIP_MEAN_RGB, crop_box, cut, inside_fraction
from .stage import (
    GEOMETRY_VERSION,
    JPEG_QUALITY,
    check_options,
    default_workers,
    encode_crop,
    write_shards,
)

STATS_KEYS = (
    "rows",  # masks-dataset rows considered
    "phrases",  # their phrases
    "crops",  # rows written
    "crops_padded",  # crops whose region reaches past the image edge
    "phrases_skipped_no_mask",  # phrases the masks source found no mask for
    "phrases_skipped_small",  # masks of fewer than --min-area pixels
    "rows_skipped_unreadable",  # image that does not decode, or a mask of another size (listed)
)


@dataclass
class MaskCropsConfig:
    """Settings of ``tcompose crops --from-masks``."""

    masks: Path
    """A masks dataset folder (``tcompose masks``)."""
    output: Path
    min_area: float = 32 * 32
    margin: float = 0.1
    square: bool = True
    size: int = 224
    template: str = "a photo of a {category}"
    masked: bool = False
    limit: int | None = None
    """Only the first N rows of the masks dataset."""
    shard_size: int = 1000
    """Masks-dataset rows per shard."""
    workers: int | None = None

    def __post_init__(self):
        self.masks, self.output = Path(self.masks), Path(self.output)


def content_config(cfg: MaskCropsConfig, masks_fingerprint: str) -> dict:
    return {"source": "masks", "masks": masks_fingerprint, "min_area": float(cfg.min_area), "margin": float(cfg.margin),
            "square": cfg.square, "size": cfg.size, "template": cfg.template, "masked": cfg.masked, "limit": cfg.limit,
            "shard_size": cfg.shard_size, "jpeg_quality": JPEG_QUALITY, "geometry": GEOMETRY_VERSION}


def phrase_id(phrase: str) -> int:
    """A stable id of a phrase (the first 7 bytes of its sha256): the same in every shard, run and process."""
    return int.from_bytes(hashlib.sha256(phrase.encode("utf-8")).digest()[:7], "big")


def mask_bbox(mask: np.ndarray) -> list[float]:
    """COCO ``[x, y, w, h]`` of a boolean mask's pixels (whole pixels: x1 - x0 + 1 wide)."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


@lru_cache(maxsize=4)
def _reader(folder: str) -> RowReader:
    return RowReader(folder, ["image_id", "file_name", "image", "phrases", "masks"])


def row_crops(row: int, folder: str, cfg: MaskCropsConfig) -> tuple[list, dict, list]:
    """(rows, stats, skipped) of one masks-dataset row (runs in the worker processes)."""
    from PIL import Image

    stats, skipped = dict.fromkeys(STATS_KEYS, 0), []
    record = _reader(folder)[row]
    stats["rows"] = 1
    stats["phrases"] = len(record["phrases"])

    def skip(reason: str) -> tuple[list, dict, list]:
        stats["rows_skipped_unreadable"] += 1
        skipped.append({"row": row, "image_id": record["image_id"], "file_name": record["file_name"], "reason": reason})
        return [], stats, skipped

    try:
        with Image.open(io.BytesIO(record["image"]["bytes"])) as im:
            pixels = np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001  (any decoding failure of one image: skipped and listed)
        return skip(f"image does not decode ({type(e).__name__})")
    h, w = pixels.shape[:2]
    out = []
    for slot, (phrase, m) in enumerate(zip(record["phrases"], record["masks"])):
        if m is None or m.get("bytes") is None:
            stats["phrases_skipped_no_mask"] += 1
            continue
        mask = decode_mask(m)
        if mask.shape != (h, w):
            return skip(f"the mask of {phrase!r} is {mask.shape[1]}x{mask.shape[0]}, the image {w}x{h}")
        if mask.sum() < cfg.min_area:
            stats["phrases_skipped_small"] += 1
            continue
        bbox = mask_bbox(mask)
        box = crop_box(bbox, cfg.margin, cfg.square)
        crop = cut(pixels, box, CLIP_MEAN_RGB)
        if cfg.masked:
            crop[~cut(mask, box, False)] = CLIP_MEAN_RGB
        out.append({
            "image": image_struct(encode_crop(crop, cfg.size), f"{Path(record['file_name']).stem}_r{row}_{slot}.jpg"),
            "text": cfg.template.format(category=phrase), "category": phrase, "category_id": phrase_id(phrase),
            "image_id": int(record["image_id"]), "ann_id": row * 1000 + slot, "bbox": bbox, "crop_box": list(box),
        })
        stats["crops_padded"] += inside_fraction(box, w, h) < 1
    stats["crops"] = len(out)
    return out, stats, skipped


def run(cfg: MaskCropsConfig, rank: int = 0, world_size: int = 1, progress: bool = True,
        finalize_timeout_s: float = 86400.0) -> dict:
    """Write the crops dataset; returns the manifest (rank 0) or this process's summary (others)."""
    from ..io.runs import dataset_fingerprint

    t0 = time.monotonic()
    check_options(cfg)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
    manifest = load_manifest(cfg.masks)
    if manifest.get("kind", "masks") != "masks":
        raise DatasetError(f"--from-masks {cfg.masks} is a {manifest.get('kind')!r} dataset; pass a masks dataset "
                           "(`tcompose masks COCO_DIR --output data/gsam`)")
    check_columns(cfg.masks, "masks")
    n_rows = len(_reader(str(cfg.masks)))
    n = min(n_rows, cfg.limit) if cfg.limit is not None else n_rows
    content = content_config(cfg, dataset_fingerprint(cfg.masks))
    refuse_other_settings(cfg.output, content, "crops")
    workers = cfg.workers or default_workers(world_size)
    writer = ShardedWriter(cfg.output, "crops", "crops-from-masks", content,
                           {"masks": str(cfg.masks), "output": str(cfg.output), "world_size": world_size},
                           cfg.shard_size,
                           rank, world_size)
    todo = writer.pending(n)
    remove_stale_tmp(writer, todo)
    with kept_on_interrupt(lambda: shards_kept(writer, n)):  # Ctrl-C: the finished shards stay
        written = write_shards(writer, todo, [pos for shard in todo for pos in shard.items],
                               partial(row_crops, folder=str(cfg.masks), cfg=cfg), workers, "crops (from masks)",
                               progress and rank == 0, STATS_KEYS)
        if rank == 0 and world_size > 1:
            wait_for_shards(writer, n, finalize_timeout_s)
    if rank != 0:
        return {"rank": rank, "world_size": world_size, "shards_written": len(todo), "stats": written}
    manifest = writer.finalize(n, elapsed_s=round(time.monotonic() - t0, 3))
    refuse_empty(manifest, writer, f"--from-masks {cfg.masks}", "rows")
    if progress:
        from rich.console import Console

        s = manifest["stats"]
        Console(stderr=True).print(
            f"crops: {manifest['num_rows']} crops from {s['rows']} rows ({s['phrases']} phrases; skipped: "
            f"{s['phrases_skipped_no_mask']} without a mask, {s['phrases_skipped_small']} small, "
            f"{s['rows_skipped_unreadable']} unreadable rows) -> {cfg.output}", highlight=False)
    return manifest
