"""The crops stage: COCO instance annotations -> object crops labelled "a photo of a {category}" (CLIP finetuning).

Runbook::

    # all val2017 objects of at least 32x32 pixels, 224x224 squares with a 10 % margin, two worker processes
    tcompose crops COCO_DIR --split val2017 --output DIR --workers 2
    # only some categories, the object alone on grey, the whole of train2017
    tcompose crops COCO_DIR --split train2017 --categories "cat,dog,wine glass" --masked --output DIR
    # several processes (each writes its own shards; the main one writes manifest.json at the end)
    accelerate launch -m tcompose crops COCO_DIR --split train2017 --output DIR
    # killed? run the same command again: finished shards are kept, the rest is written, rows are identical

Per image (in image-id order), per instance annotation (in file order): crowd regions (``iscrowd=1``) are
left out unless ``include_crowd``, so are categories outside ``categories`` and objects whose ``area`` (the
annotation's field: its mask's area in pixels, not its box's) is below ``min_area``. The object's ``bbox``
grows by ``margin`` on every side and, with ``square``, to a square around its centre
(:func:`tcompose.crops.geometry.crop_box`). Where that region leaves the image it is padded with CLIP's mean
colour, never shifted, so an object cut by the image edge keeps its true place in the crop; ``masked`` sets
the pixels outside the instance mask to the same grey. PIL resizes the region (bicubic, longer side
``size``) and stores it as a JPEG (quality 95, no chroma subsampling). Off-centre, truncated and partly
occluded objects are all kept: that variety is what CLIP should learn from.

Rows follow :data:`tcompose.io.datasets.CROPS_COLUMNS`. Counted in the manifest's ``stats``: left-out
annotations (crowd, category, small); counted and listed in ``skipped`` (``{image_id, file_name, ann_id,
reason}``): an annotation whose box or segmentation cannot be read, an image file that is missing, does not
decode or has another size than annotated. Images without a kept annotation are never opened. A spawn
``multiprocessing.Pool`` of ``workers`` processes decodes and crops; the main process writes the shards in
order, so the rows do not depend on ``workers``.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np

from ..data.coco import CocoDataset, CocoError, ImageReadError, annotation_mask, annotation_rle
from ..io.errors import UserError
from ..io.datasets import DatasetError, ShardedWriter, image_struct
from ..io.runs import kept_on_interrupt, shards_kept
from ..io.stages import progress_bar, refuse_empty, refuse_other_settings, remove_stale_tmp, wait_for_shards
from .geometry import CLIP_MEAN_RGB, check_bbox, crop_box, cut, inside_fraction, output_size

JPEG_QUALITY = 95  # crops are small: a high quality costs little and keeps CLIP's input clean
GEOMETRY_VERSION = 2  # bumped when the crop maths changes, so a resumed run never mixes two versions (2: empty masks skipped)

#: Counters every crops manifest has under ``stats`` (summed over shards).
STATS_KEYS = (
    "images",  # images considered (after --limit)
    "images_with_crops",  # images that gave at least one crop
    "crops",  # rows written
    "crops_padded",  # crops whose region reaches past the image edge (padded with grey)
    "annotations",  # instance annotations of the considered images
    "annotations_skipped_crowd",  # iscrowd=1 without --include-crowd
    "annotations_skipped_category",  # category not in --categories
    "annotations_skipped_small",  # area below --min-area
    "annotations_skipped_invalid",  # box or segmentation that cannot be read (listed)
    "annotations_skipped_empty_mask",  # --masked: no mask pixel inside the crop (a degenerate polygon; listed)
    "annotations_skipped_unreadable_image",  # kept annotations of images skipped as unreadable
    "images_skipped_unreadable",  # image file missing, not decodable, or of another size than annotated (listed)
)


@dataclass
class CropsConfig:
    """Settings of ``tcompose crops``."""

    coco_dir: Path
    """COCO-format folder: ``annotations/instances_{split}.json`` and the images in ``{split}/``."""
    output: Path
    """Dataset folder to write (Parquet shards + manifest.json); rerunning into it resumes."""
    split: str = "train2017"
    """Which annotation file and image folder to read (``val2017`` for the 5k validation images)."""
    min_area: float = 32 * 32
    """Smallest object kept, in pixels of its segmentation mask (the annotation's ``area`` field)."""
    margin: float = 0.1
    """Context around the box: each side moves out by this fraction of the box's width / height."""
    square: bool = True
    """Grow the shorter side of the region to the longer one around the box centre (CLIP's input is square).
    Off: the region keeps the box's shape and the longer side is resized to ``size``."""
    size: int = 224
    """Side of the output crops in pixels (the longer side when not ``square``)."""
    template: str = "a photo of a {category}"
    """Text of each row; ``{category}`` is replaced by the category name."""
    masked: bool = False
    """Set the pixels outside the instance mask to CLIP's mean grey (the object alone)."""
    include_crowd: bool = False
    """Also crop crowd regions (``iscrowd=1``: a crowd of people, a pile of bananas). Off by default: a crowd
    box holds many objects, not "a photo of a person"."""
    categories: tuple[str, ...] = ()
    """Only these category names (empty: all)."""
    limit: int | None = None
    """Only the first N images in image-id order (None: all)."""
    shard_size: int = 1000
    """Images per Parquet shard; the unit of resuming and of splitting work between processes."""
    workers: int | None = None
    """Processes that decode and crop (1: this one; None: cores / world size). The rows do not depend on it."""

    def __post_init__(self):
        self.coco_dir = Path(self.coco_dir)
        self.output = Path(self.output)
        self.categories = tuple(self.categories)


def content_config(cfg: CropsConfig) -> dict:
    """The settings that decide the rows (not paths, not workers): a resumed run must match them exactly."""
    return {
        "split": cfg.split, "min_area": float(cfg.min_area), "margin": float(cfg.margin), "square": cfg.square,
        "size": cfg.size, "template": cfg.template, "masked": cfg.masked, "include_crowd": cfg.include_crowd,
        "categories": sorted(cfg.categories), "limit": cfg.limit,
        "shard_size": cfg.shard_size,  # decides which images a shard holds, so resuming needs the same
        "jpeg_quality": JPEG_QUALITY, "geometry": GEOMETRY_VERSION,
    }


#: The largest --size: well above any CLIP input (224, 336, 448), far below what a crop of every annotation could
#: hold in memory at once (a 4096 px RGB crop is 48 MiB before JPEG).
MAX_SIZE = 4096


def check_options(cfg) -> None:
    """The options every crops run shares (``tcompose crops COCO_DIR`` and ``--from-masks``): ValueError naming
    the first bad one."""
    try:
        template_ok = "{category}" in cfg.template and cfg.template.format(category="x") is not None
    except (KeyError, IndexError, ValueError):
        template_ok = False
    for bad, message in (
        (not cfg.min_area >= 0, f"--min-area must be >= 0 pixels, got {cfg.min_area}"),
        (not (cfg.margin >= 0 and np.isfinite(cfg.margin)), f"--margin must be >= 0 (of the box), got {cfg.margin}"),
        (cfg.size < 1, f"--size must be >= 1 pixel, got {cfg.size}"),
        (cfg.size > MAX_SIZE, f"--size {cfg.size}: at most {MAX_SIZE} pixels (CLIP takes 224 or 336; every crop is "
                              f"upscaled to --size, so more only costs memory and disk); pass --size {MAX_SIZE} or less"),
        (not template_ok, f"--template {cfg.template!r} must use {{category}} and no other field"),
        (cfg.limit is not None and cfg.limit < 1, f"--limit must be >= 1 (or left out: all), got {cfg.limit}"),
        (cfg.shard_size < 1, f"--shard-size must be >= 1, got {cfg.shard_size}"),
        (cfg.workers is not None and cfg.workers < 1, f"--workers must be >= 1 (or left out), got {cfg.workers}"),
    ):
        if bad:
            raise UserError(message)


def _wanted(cfg: CropsConfig, coco: CocoDataset) -> frozenset:
    """The ids of the categories to crop, after checking that every ``cfg.categories`` name exists."""
    known = set(coco.categories.values())
    unknown = [c for c in cfg.categories if c not in known]
    if unknown:
        names = ", ".join(sorted(known)[:12]) + (", ..." if len(known) > 12 else "")
        raise UserError(f"--categories {', '.join(unknown)}: not in {cfg.coco_dir} {cfg.split} (it has {names})")
    return frozenset(i for i, n in coco.categories.items() if not cfg.categories or n in cfg.categories)


# ----------------------------------------------------------------------------------------------------------
# One image (runs in the worker processes)


def _load_rgb(path: str, width: int, height: int) -> np.ndarray:
    """The image as HxWx3 uint8, checked to decode fully at the annotated size; ImageReadError otherwise."""
    from PIL import Image

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageReadError(Path(path), f"cannot be read ({e.strerror or e})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            pixels = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        detail = re.sub(r"\s*<[^>]*>", "", str(e))  # no object reprs: the reason must be reproducible
        raise ImageReadError(Path(path), f"does not decode ({type(e).__name__}: {detail})") from None
    if pixels.shape[:2] != (height, width):
        size = f"{pixels.shape[1]}x{pixels.shape[0]}"
        raise ImageReadError(Path(path), f"is {size} but the annotations say {width}x{height}")
    return pixels


def _area_and_bbox(ann: dict, height: int, width: int) -> tuple[float, list[float]]:
    """The annotation's ``area`` and ``bbox`` fields, computed from its segmentation where they are missing."""
    area, bbox = ann.get("area"), ann.get("bbox")
    if area is None or bbox is None:
        from pycocotools import mask as mask_utils

        rle = annotation_rle(ann, height, width)
        area = float(mask_utils.area(rle)) if area is None else area
        bbox = [float(v) for v in mask_utils.toBbox(rle)] if bbox is None else bbox
    return float(area), list(bbox)


def encode_crop(crop: np.ndarray, size: int) -> bytes:
    from PIL import Image

    im = Image.fromarray(crop)
    target = output_size(im.width, im.height, size)
    if target != im.size:
        im = im.resize(target, Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def image_crops(image: dict, cfg: CropsConfig, names: dict, wanted: frozenset) -> tuple[list, dict, list]:
    """The rows of one image, its statistics and its skipped entries (the same bytes in any process).

    ``image``: ``{id, file_name, width, height, path, annotations}`` (raw COCO instance dicts); ``names``:
    category id -> name; ``wanted``: the category ids to crop.
    """
    stats = dict.fromkeys(STATS_KEYS, 0)
    skipped: list[dict] = []
    image_id, h, w = image["id"], image["height"], image["width"]

    def skip(key: str, reason: str, ann_id: int | None = None) -> None:
        stats[key] += 1
        skipped.append({"image_id": image_id, "file_name": image["file_name"], "ann_id": ann_id, "reason": reason})

    stats["images"] = 1
    kept = []
    for ann in image["annotations"]:
        stats["annotations"] += 1
        if not isinstance(ann.get("id"), int):
            skip("annotations_skipped_invalid", f"annotation without an integer id ({ann.get('id')!r})")
            continue
        if ann.get("iscrowd", 0) and not cfg.include_crowd:
            stats["annotations_skipped_crowd"] += 1
            continue
        if ann["category_id"] not in wanted:
            stats["annotations_skipped_category"] += 1
            continue
        try:
            area, bbox = _area_and_bbox(ann, h, w)
            bbox = list(check_bbox(bbox))
        except (CocoError, ValueError, TypeError) as e:
            skip("annotations_skipped_invalid", f"annotation {ann['id']}: {e}", ann["id"])
            continue
        if area < cfg.min_area:
            stats["annotations_skipped_small"] += 1
            continue
        kept.append((ann, bbox))
    if not kept:
        return [], stats, skipped
    try:
        pixels = _load_rgb(image["path"], w, h)
    except ImageReadError as e:
        stats["annotations_skipped_unreadable_image"] += len(kept)
        skip("images_skipped_unreadable", f"image {e.reason}")
        return [], stats, skipped
    rows = []
    stem = Path(image["file_name"]).stem
    for ann, bbox in kept:
        box = crop_box(bbox, cfg.margin, cfg.square)
        crop = cut(pixels, box, CLIP_MEAN_RGB)
        if cfg.masked:
            try:
                mask = annotation_mask(ann, h, w)
            except CocoError as e:
                skip("annotations_skipped_invalid", str(e), ann["id"])
                continue
            inside = cut(mask, box, False)
            if not inside.any():
                skip("annotations_skipped_empty_mask", f"annotation {ann['id']}: its segmentation covers no pixel "
                     "(a degenerate polygon), so the --masked crop would be all grey", ann["id"])
                continue
            crop[~inside] = CLIP_MEAN_RGB
        name = names[ann["category_id"]]
        rows.append({
            "image": image_struct(encode_crop(crop, cfg.size), f"{stem}_{ann['id']}.jpg"),
            "text": cfg.template.format(category=name), "category": name, "category_id": int(ann["category_id"]),
            "image_id": int(image_id), "ann_id": int(ann["id"]), "bbox": bbox, "crop_box": list(box),
        })
        stats["crops_padded"] += inside_fraction(box, w, h) < 1
    stats["crops"] = len(rows)
    stats["images_with_crops"] = int(bool(rows))
    return rows, stats, skipped


def default_workers(world_size: int = 1) -> int:
    """One worker per CPU core this process may use, shared between ``world_size`` processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, world_size))


# fork on Linux: workers start in milliseconds, not a second of re-imports; they run PIL, numpy and
# pycocotools only (never torch), so the parent's threads do not matter. Elsewhere spawn, the safe default.
_START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


def parallel_results(tasks: list[dict], work, workers: int) -> Iterator[tuple]:
    """``work(task)`` of every task, in task order, computed by ``workers`` processes.

    A window of at most 4 tasks per worker is in flight. When the consumer stops early (an error while writing a
    shard, Ctrl-C), the pending tasks are cancelled and the pool shuts down cleanly: a ``multiprocessing.Pool``
    terminated mid-``imap`` can hang for ever joining its task thread (seen here, in a process with other threads).
    """
    if workers == 1 or len(tasks) < 2:
        yield from map(work, tasks)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    n = min(workers, len(tasks))
    pending = iter(tasks)
    with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context(_START_METHOD)) as pool:
        window = deque(pool.submit(work, t) for _, t in zip(range(4 * n), pending))
        try:
            while window:
                result = window.popleft().result()
                for t in itertools.islice(pending, 1):
                    window.append(pool.submit(work, t))
                yield result
        finally:
            for future in window:
                future.cancel()


def write_shards(writer: ShardedWriter, todo: list, tasks: list, work, workers: int, label: str, progress: bool,
                 stats_keys: tuple[str, ...] = STATS_KEYS) -> dict:
    """Run ``work`` over ``tasks`` (one per item of the ``todo`` shards, in order; ``work`` returns rows, stats,
    skipped) and write each shard as soon as its items are done; returns the stats summed over the shards."""
    written = dict.fromkeys(stats_keys, 0)
    if not todo:
        return written
    results = parallel_results(tasks, work, workers)
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task(label, total=len(tasks))
            for shard in todo:
                stats, skipped, rows = dict.fromkeys(stats_keys, 0), [], []
                for _ in shard.items:
                    r, s, k = next(results)
                    rows += r
                    skipped += k
                    for key, v in s.items():
                        stats[key] += v
                    bar.advance(task)
                writer.write_shard(shard, rows, stats, skipped)
                for key, v in stats.items():
                    written[key] += v
    finally:
        results.close()  # stops the worker pool, also when a write fails or the run is interrupted
    return written


def run(
    cfg: CropsConfig, rank: int = 0, world_size: int = 1, progress: bool = True, finalize_timeout_s: float = 86400.0
) -> dict:
    """Write the crops dataset of ``cfg``; returns the manifest (rank 0) or this process's summary (others).

    Process ``rank`` writes the shards ``k`` with ``k % world_size == rank``; rank 0 then waits (at most
    ``finalize_timeout_s``) for all of them and writes ``manifest.json``. A rerun keeps the finished shards.
    """
    t0 = time.monotonic()
    check_options(cfg)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
    coco = CocoDataset(cfg.coco_dir, cfg.split, captions=False, instances=True)
    work = partial(image_crops, cfg=cfg, names=dict(coco.categories), wanted=_wanted(cfg, coco))
    ids = coco.ids[: cfg.limit] if cfg.limit is not None else coco.ids
    if not ids:
        raise DatasetError(f"{cfg.coco_dir}: split {cfg.split} lists no images; nothing to write")
    content = content_config(cfg)
    refuse_other_settings(cfg.output, content, "crops")
    workers = cfg.workers or default_workers(world_size)
    run_config = {"coco_dir": str(cfg.coco_dir), "output": str(cfg.output), "world_size": world_size,
                  "workers": workers}
    writer = ShardedWriter(cfg.output, "crops", "crops", content, run_config, cfg.shard_size, rank, world_size)
    todo = writer.pending(len(ids))
    remove_stale_tmp(writer, todo)
    t_work = time.monotonic()
    images = [coco[ids[pos]] for shard in todo for pos in shard.items]
    tasks = [{"id": im.id, "file_name": im.file_name, "width": im.width, "height": im.height,
              "path": str(coco.image_path(im)), "annotations": list(im.annotations)} for im in images]
    with kept_on_interrupt(lambda: shards_kept(writer, len(ids))):  # Ctrl-C: the finished shards stay
        written = write_shards(writer, todo, tasks, work, workers, "crops", progress and rank == 0)
        work_s = time.monotonic() - t_work
        if rank == 0 and world_size > 1:
            wait_for_shards(writer, len(ids), finalize_timeout_s)
    if rank != 0:
        return {"rank": rank, "world_size": world_size, "shards_written": len(todo), "stats": written}
    manifest = writer.finalize(len(ids), elapsed_s=round(time.monotonic() - t0, 3))
    refuse_empty(manifest, writer, f"{cfg.coco_dir} ({cfg.split})", "images")
    if progress:
        from rich.console import Console

        Console(stderr=True).print(summary_line(manifest, cfg.output, written, work_s), highlight=False)
    return manifest


def summary_line(manifest: dict, output: Path | str, written: dict | None = None, work_s: float | None = None) -> str:
    """One line for the end of a run: images, crops, what was skipped and why, and this run's speed."""
    s = manifest["stats"]
    skips = {"small": "annotations_skipped_small", "crowd": "annotations_skipped_crowd",
             "other category": "annotations_skipped_category", "invalid annotation": "annotations_skipped_invalid",
             "empty mask": "annotations_skipped_empty_mask", "unreadable image": "images_skipped_unreadable"}
    tail = ", ".join(f"{k}: {s[v]}" for k, v in skips.items() if s.get(v)) or "nothing"
    speed = ""
    if written and written.get("crops") and work_s:
        speed = f"; this run {written['crops']} crops at {written['crops'] / work_s:.1f} crops/s"
    return f"crops: {manifest['num_rows']} crops from {s.get('images', 0)} images (skipped: {tail}){speed} -> {output}"
