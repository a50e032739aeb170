"""The masks stage: COCO images + captions -> one segmentation mask per caption noun phrase (a masks dataset).

Runbook::

    # GroundingDINO boxes -> SAM-HQ masks for each caption's noun phrases (the CLI's default source), 1 GPU
    tcompose masks COCO_DIR --split train2017 --captions clip-best --dtype fp16 --batch-size 16 --output DIR
    # 8 GPUs: each process takes every 8th shard of images and writes its own Parquet shards; rank 0 waits for
    # all of them and writes manifest.json
    accelerate launch --num_processes 8 -m tcompose masks COCO_DIR --split train2017 --dtype fp16 --output DIR
    # COCO's own instance masks for the caption nouns that name an annotated category (no models)
    tcompose masks COCO_DIR --source coco-gt --split val2017 --captions all --limit 5000 --output DIR
    # killed? run the same command again: finished shards are kept, the rest is written, rows are identical
    # any captioned image set instead of COCO (imagefolder, Parquet / Arrow folder, cached hub dataset id):
    # tcompose.data.captioned; row numbers are the image ids
    tcompose masks DATA --image-column image --caption-column text --output DIR

Per image (in image-id order; ``--image-ids FILE`` and ``--limit`` select): its caption(s) (``--captions
first|all|clip-best``, :mod:`tcompose.masks.caption_choice`); the caption's phrases and a mask for each, from the
source (:mod:`tcompose.masks.sources`). ``coco-gt``: the noun phrases that name one of the image's annotated
categories (:func:`tcompose.data.vocab.match_categories`), each with the union of that category's instance masks.
``grounded-sam`` (:mod:`tcompose.masks.grounded_sam`): the caption's noun phrases (:mod:`tcompose.data.nouns`), each
with the union of the SAM masks of the GroundingDINO boxes mapped to it, or null when no box was. One row
per (image, caption) with the columns of :data:`tcompose.io.datasets.MASKS_COLUMNS`: the original JPEG bytes,
the caption (whitespace collapsed), ``phrases``, ``categories``, ``masks`` (1-bit PNGs), ``source``.

Images are read, decoded and preprocessed in ``workers`` DataLoader processes (:mod:`tcompose.masks.loader`);
the main process runs the models on batches of ``batch_size`` images (grouped by size within a shard, never
straddling one), so a batch holds the same images in a fresh, resumed or multi-process run; ``workers``
threads encode the masks as PNGs meanwhile. For grounded-sam ``batch_size`` is one of the settings that
decide the rows: GroundingDINO's Swin backbone sees the zero padding of a batch's larger images, so boxes
can move slightly with the batch (a resumed run must use the same ``--batch-size``; it is checked).

Not fatal, but counted in the manifest's ``stats`` and listed in its ``skipped`` (``{image_id, file_name,
caption, reason}``): a caption with no phrase, an image without captions or (coco-gt) without instance
annotations, an image file that does not decode (or whose size differs from its annotation). At the end one
line sums up: rows, images, phrases and how many got a mask, what was skipped and why, and images/s.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..data.captioned import CaptionedDataset, open_images
from ..data.coco import CocoDataset
from ..io.errors import UserError
from ..io.datasets import DatasetError, ShardedWriter
from ..io.runs import kept_on_interrupt, output_guard, shards_kept
from ..io.stages import progress_bar, refuse_empty, refuse_other_settings, remove_stale_tmp, wait_for_shards
from ..models.loading import DTYPES
from .caption_choice import check_mode, static_choice
from .config import MasksConfig, model_dtype, resolve_device
from .interface import Source
from .loader import Collate, ImageSet, batches, plan_batches, select_ids
from .rows import Done, rows_of
from .sources import SOURCES

__all__ = ["STATS_KEYS", "run", "content_config", "summary_line"]

#: Counters every masks manifest has under ``stats`` (summed over shards); a source adds its own
#: (:attr:`Source.stats`; grounded-sam: ``boxes``, ``phrases_no_box``, ``phrases_not_prompted``).
STATS_KEYS = (
    "images",  # images considered (after --image-ids and --limit)
    "images_with_rows",  # images that got at least one row
    "rows",  # rows written (one per image and kept caption)
    "phrases",  # grounded phrases, summed over rows
    "masks_empty",  # phrases whose mask came out empty or missing (stored as null)
    "captions",  # captions considered (--captions first / clip-best: one per image with captions)
    "captions_no_match",  # captions without a phrase (coco-gt: none naming one of the image's categories)
    "images_skipped_no_captions",
    "images_skipped_no_annotations",
    "images_skipped_unreadable",  # image file missing, not decodable, or of another size than annotated
    "images_skipped_no_match",  # every considered caption of the image had no phrase
)


def content_config(cfg: MasksConfig, ids_digest: str | None = None) -> dict:
    """The settings that decide the rows (not paths): a resumed run must match them exactly."""
    out = {
        "split": cfg.split,
        "source": cfg.source,
        "captions": cfg.captions,
        "limit": cfg.limit,
        "shard_size": cfg.shard_size,  # decides which images a shard holds, so resuming needs the same
        **SOURCES[cfg.source].content(cfg),
    }
    if ids_digest is not None:
        out["image_ids"] = ids_digest
    if cfg.captions == "clip-best":
        out.update(clip_model=str(cfg.clip_model), clip_revision=cfg.clip_revision)
    return out


def _check(cfg: MasksConfig) -> None:
    if cfg.source not in SOURCES:
        raise UserError(f"unknown --source {cfg.source!r}: choose one of {', '.join(SOURCES)}")
    check_mode(cfg.captions)
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"--limit must be >= 1 (or left out for all images), got {cfg.limit}")
    for name in ("shard_size", "batch_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.workers < 0:
        raise UserError(f"--workers must be >= 0, got {cfg.workers}")
    for name in ("box_threshold", "text_threshold"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")


def run(
    cfg: MasksConfig, rank: int = 0, world_size: int = 1, progress: bool = True, finalize_timeout_s: float = 86400.0
) -> dict:
    """Write the masks dataset of ``cfg``; returns the manifest (rank 0) or this process's summary (others).

    Under several processes each writes the shards ``k`` with ``k % world_size == rank``; rank 0 then polls
    until every shard file exists (at most ``finalize_timeout_s``) and writes ``manifest.json``, so no
    barrier is needed from the caller. Rerunning after a kill keeps the finished shards. The returned dict
    also holds ``throughput`` (this process's images, seconds and images/s of the work done now).
    """
    _check(cfg)
    _check_rank(rank, world_size)
    with output_guard(cfg.output):  # models that fail to load leave no empty folder behind
        return _run(cfg, rank, world_size, progress, finalize_timeout_s)


def _run(cfg: MasksConfig, rank: int, world_size: int, progress: bool, finalize_timeout_s: float) -> dict:
    t0 = time.monotonic()
    source = SOURCES[cfg.source]
    coco = open_images(cfg.coco_dir, cfg.split, image_column=cfg.image_column, caption_column=cfg.caption_column,
                       captions=True, instances=source.needs_instances)
    ids, digest = select_ids(coco, cfg.image_ids, cfg.limit)
    if not ids:
        raise DatasetError(f"{cfg.coco_dir}: split {cfg.split} lists no images; nothing to write")
    content = content_config(cfg, digest)
    run_config = {"coco_dir": str(cfg.coco_dir), "output": str(cfg.output), "world_size": world_size,
                  "image_ids": str(cfg.image_ids) if cfg.image_ids else None}
    if isinstance(coco, CaptionedDataset):  # a COCO folder's manifest stays as it was
        content["split"] = coco.split_name  # the split read (None: all of it), not the COCO default
        content["input"] = {k: v for k, v in coco.describe().items() if k != "path"}
        run_config["input"] = coco.describe()
    refuse_other_settings(cfg.output, content, "masks")
    writer = ShardedWriter(cfg.output, "masks", "masks", content, run_config, cfg.shard_size, rank, world_size)
    todo = writer.pending(len(ids))
    remove_stale_tmp(writer, todo)  # half-written shards a killed run left behind
    written = dict.fromkeys(STATS_KEYS + source.stats, 0)
    throughput = {"images": 0, "seconds": 0.0, "images_per_s": None}
    with kept_on_interrupt(lambda: shards_kept(writer, len(ids))):  # Ctrl-C: the finished shards stay
        if todo:
            throughput = _write(cfg, source, coco, ids, writer, todo, progress and rank == 0, written)
        if rank == 0 and world_size > 1:
            wait_for_shards(writer, len(ids), finalize_timeout_s)
    if rank != 0:
        return {"rank": rank, "world_size": world_size, "shards_written": len(todo), "stats": written,
                "throughput": throughput}
    manifest = writer.finalize(len(ids), elapsed_s=round(time.monotonic() - t0, 3))
    refuse_empty(manifest, writer, f"{cfg.coco_dir} ({cfg.split}, --source {cfg.source})", "images")
    if progress:
        from rich.console import Console

        Console(stderr=True).print(summary_line(manifest, cfg.output, throughput), highlight=False)
    return {**manifest, "throughput": throughput}


def _write(cfg: MasksConfig, source: Source, coco: CocoDataset, ids: list[int], writer: ShardedWriter, todo: list,
           show: bool, written: dict) -> dict:
    """Load the source's models, then stream this process's pending shards through them and write them."""
    device = resolve_device(cfg.device)
    prep, grounder = source.build(cfg, coco, device)
    dtype, note = model_dtype(cfg)
    scorer = None
    if cfg.captions == "clip-best":
        from .caption_choice import ClipScorer

        scorer = ClipScorer.load(cfg.clip_model, cfg.clip_revision, device, dtype)
    if show and note and (source.name != "coco-gt" or scorer is not None):
        from rich.console import Console

        Console(stderr=True).print(f"note: {note}", highlight=False)
    dataset = ImageSet(coco, ids, prep, source.needs_instances, cfg.include_crowd,
                       decode=prep.needs_pixels or scorer is not None)
    collate = Collate(prep, scorer.image_processor if scorer is not None else None)
    size_of = (lambda pos: (coco[ids[pos]].height, coco[ids[pos]].width, pos)) if prep.needs_pixels else None
    plan = plan_batches(todo, cfg.batch_size, size_of)
    workers = min(cfg.workers, len(plan)) if source.uses_workers else 0
    shards = {s.index: s for s in todo}
    left = {s.index: len(s.items) for s in todo}
    done: dict[int, Any] = {}  # position -> future of (rows, skipped, stats) of the shard being written
    # PNG encoding of the masks runs in threads (Pillow's encoder releases the GIL) while the models go on
    pool = ThreadPoolExecutor(max(1, cfg.workers)) if source.uses_workers else None
    t_start, n_images = time.monotonic(), 0
    with progress_bar(show) as bar:
        task = bar.add_task(f"masks ({cfg.source})", total=sum(left.values()))
        stream = batches(dataset, collate, plan, workers, pin_memory=device.type == "cuda")
        for (shard_index, _), batch in zip(plan, stream):
            ok = [batch.items[i] for i in batch.ok]
            if scorer is None:
                chosen = [static_choice(cfg.captions, len(it.captions)) for it in ok]
            else:
                chosen = [[b] for b in scorer.best(batch.clip, [it.captions for it in ok])] if ok else []
            grounded = dict(zip(batch.ok, grounder.ground(ok, batch.inputs, chosen) if ok else []))
            for i, item in enumerate(batch.items):
                args = (item, grounded.get(i, []), source, list(written))
                done[item.pos] = pool.submit(rows_of, *args) if pool else Done(rows_of(*args))
            bar.advance(task, len(batch.items))
            n_images += len(batch.items)
            left[shard_index] -= len(batch.items)
            if left[shard_index] == 0:
                rows, skipped, stats = [], [], dict.fromkeys(written, 0)
                for pos in sorted(done):
                    r, sk, st = done[pos].result()
                    rows += r
                    skipped += sk
                    for k, v in st.items():
                        stats[k] += v
                writer.write_shard(shards[shard_index], rows, stats, skipped)
                for k, v in stats.items():
                    written[k] += v
                done = {}
    if pool is not None:
        pool.shutdown()
    seconds = time.monotonic() - t_start
    return {"images": n_images, "seconds": round(seconds, 3),
            "images_per_s": round(n_images / seconds, 3) if seconds > 0 else None}


def summary_line(manifest: dict, output: Path | str, throughput: dict | None = None) -> str:
    """One line for the end of a run: rows, phrases (with a mask), what was skipped and why, images/s."""
    s = manifest["stats"]
    skipped = {k: v for k, v in s.items() if v and (k.startswith("images_skipped") or k == "captions_no_match")}
    tail = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in skipped.items()) or "nothing skipped"
    phrases = s.get("phrases", 0)
    no_box = f", {s['phrases_no_box']} without a box" if s.get("phrases_no_box") else ""
    speed = ""
    if throughput and throughput.get("images_per_s"):
        speed = f"; {throughput['images_per_s']:.2f} images/s ({throughput['images']} images this run)"
    return (
        f"masks: {manifest['num_rows']} rows, {phrases} phrases ({phrases - s.get('masks_empty', 0)} with a mask"
        f"{no_box}) from {s.get('images', 0)} images ({tail}){speed} -> {output}"
    )
