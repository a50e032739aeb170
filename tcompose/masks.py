"""The masks stage: COCO images + captions -> one segmentation mask per caption noun (a masks dataset).

Runbook::

    # COCO's own instance masks for the caption nouns that name an annotated category
    tcompose masks COCO_DIR --source coco-gt --split val2017 --output DIR
    # one row per caption instead of one per image, first 5,000 images only
    tcompose masks COCO_DIR --source coco-gt --split train2017 --captions all --limit 5000 --output DIR
    # several processes (each writes its own shards; the main one writes manifest.json at the end)
    accelerate launch -m tcompose masks COCO_DIR --source coco-gt --split train2017 --output DIR
    # killed? run the same command again: finished shards are kept, the rest is written, rows are identical

Per image (in image-id order): its caption(s) (``--captions first|all``); the caption's noun phrases that
name one of the image's annotated categories (:func:`tcompose.vocab.match_categories`: ``"men"`` ->
person, ``"wine glass"`` -> wine glass); for each such phrase a mask from the source. Source ``coco-gt``
takes the union of that category's instance masks in the image, at image resolution. One row per
(image, caption) with the columns of :data:`tcompose.datasets.MASKS_COLUMNS`: the original JPEG bytes, the
caption (whitespace collapsed), ``phrases``, ``categories``, ``masks`` (1-bit PNGs), ``source``.

Not fatal, but counted in the manifest's ``stats`` and listed in its ``skipped`` (``{image_id, file_name,
caption, reason}``): a caption with no phrase naming an annotated category, an image without captions or
without instance annotations, an image file that does not decode (or whose size differs from its
annotation). A new source (grounded SAM) is one more entry in :data:`SOURCES`: a function building a
``ground(image, captions) -> [Grounding]`` callable, plus the settings that decide its rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tcompose.coco import CocoDataset, CocoImage, ImageReadError
from tcompose.datasets import MANIFEST, DatasetError, ShardedWriter, encode_mask, image_struct
from tcompose.vocab import default_vocabulary, match_categories

#: Counters every masks manifest has under ``stats`` (summed over shards).
STATS_KEYS = (
    "images",  # images considered (after --limit)
    "images_with_rows",  # images that got at least one row
    "rows",  # rows written (one per image and kept caption)
    "phrases",  # grounded phrases, summed over rows
    "masks_empty",  # phrases whose mask came out empty (stored as null)
    "captions",  # captions considered (--captions first: one per image with captions)
    "captions_no_match",  # captions without a phrase naming one of the image's categories (skipped)
    "images_skipped_no_captions",
    "images_skipped_no_annotations",
    "images_skipped_unreadable",  # image file missing, not decodable, or of another size than annotated
    "images_skipped_no_match",  # every considered caption of the image had no match
)


@dataclass
class MasksConfig:
    """Settings of ``tcompose masks``."""

    coco_dir: Path
    """COCO-format folder: ``annotations/{captions,instances}_{split}.json`` and the images in ``{split}/``."""
    output: Path
    """Dataset folder to write (Parquet shards + manifest.json); rerunning into it resumes."""
    split: str = "train2017"
    """Which annotation files and image folder to read (``val2017`` for the 5k validation images)."""
    source: str = "coco-gt"
    """Where masks come from: ``coco-gt`` = union of COCO's instance masks of the named category."""
    captions: str = "first"
    """``first``: one row per image, for its first caption; ``all``: one row per caption."""
    limit: int | None = None
    """Only the first N images in image-id order (None: all)."""
    shard_size: int = 1000
    """Images per Parquet shard; the unit of resuming and of splitting work between processes."""
    include_crowd: bool = True
    """Use COCO crowd regions (``iscrowd=1``: a crowd of people, a pile of bananas) in a category's mask.
    On by default: a caption's "people" or "bananas" refers to the crowd too, and leaving it out would teach
    the model that part of the phrase's region is background. Off: crowd-only categories count as absent."""

    def __post_init__(self):
        self.coco_dir = Path(self.coco_dir)
        self.output = Path(self.output)


@dataclass
class Grounding:
    """One caption's grounded phrases: ``masks[i]`` (bool HxW, or None) grounds ``phrases[i]``."""

    caption: str
    phrases: list[str]
    categories: list[str]
    masks: list[np.ndarray | None]


GroundFn = Callable[[CocoImage, Sequence[str]], list[Grounding]]


@dataclass(frozen=True)
class Source:
    """A way to get masks: ``build(cfg, coco)`` returns the per-image ``ground`` function (load models
    there, once); ``content(cfg)`` the settings that decide its rows (they go into the dataset fingerprint)."""

    name: str
    needs_instances: bool
    build: Callable[[MasksConfig, CocoDataset], GroundFn]
    content: Callable[[MasksConfig], dict]


def _coco_gt_build(cfg: MasksConfig, coco: CocoDataset) -> GroundFn:
    def ground(image: CocoImage, captions: Sequence[str]) -> list[Grounding]:
        names = coco.category_names(image, include_crowd=cfg.include_crowd)
        masks: dict[str, np.ndarray] = {}
        out = []
        for caption in captions:
            pairs = match_categories(caption, names)
            for _, cat in pairs:
                if cat not in masks:
                    masks[cat] = coco.category_mask(image, cat, include_crowd=cfg.include_crowd)
            out.append(Grounding(caption, [p for p, _ in pairs], [c for _, c in pairs], [masks[c] for _, c in pairs]))
        return out

    return ground


def _coco_gt_content(cfg: MasksConfig) -> dict:
    return {"include_crowd": cfg.include_crowd, "vocab": default_vocabulary().fingerprint()}


SOURCES: dict[str, Source] = {
    "coco-gt": Source("coco-gt", needs_instances=True, build=_coco_gt_build, content=_coco_gt_content),
}


def content_config(cfg: MasksConfig) -> dict:
    """The settings that decide the rows (not paths): a resumed run must match them exactly."""
    return {
        "split": cfg.split,
        "source": cfg.source,
        "captions": cfg.captions,
        "limit": cfg.limit,
        "shard_size": cfg.shard_size,  # decides which images a shard holds, so resuming needs the same
        **SOURCES[cfg.source].content(cfg),
    }


def _check(cfg: MasksConfig) -> None:
    if cfg.source not in SOURCES:
        raise ValueError(f"unknown --source {cfg.source!r}: choose one of {', '.join(SOURCES)}")
    if cfg.captions not in ("first", "all"):
        raise ValueError(f"--captions must be 'first' or 'all', got {cfg.captions!r}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"--limit must be >= 1 (or left out for all images), got {cfg.limit}")
    if cfg.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {cfg.shard_size}")


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")


def _image_rows(
    coco: CocoDataset, image: CocoImage, cfg: MasksConfig, ground: GroundFn, needs_instances: bool,
    stats: dict, skipped: list,
) -> list[dict]:
    """The rows of one image; skips are counted in ``stats`` and listed in ``skipped``."""

    def skip(key: str, reason: str, caption: str | None = None) -> None:
        stats[key] += 1
        skipped.append({"image_id": image.id, "file_name": image.file_name, "caption": caption, "reason": reason})

    stats["images"] += 1
    captions = [" ".join(c.split()) for c in image.captions]
    captions = [c for c in captions if c]
    if not captions:
        skip("images_skipped_no_captions", "no captions")
        return []
    if needs_instances and not coco.category_names(image, include_crowd=cfg.include_crowd):
        crowd = "" if cfg.include_crowd else " (crowd left out)"
        skip("images_skipped_no_annotations", "no instance annotations" + crowd)
        return []
    try:
        data = coco.read_image(image)
    except ImageReadError as e:
        skip("images_skipped_unreadable", f"image {e.reason}")
        return []
    if cfg.captions == "first":
        captions = captions[:1]
    rows = []
    for g in ground(image, captions):
        stats["captions"] += 1
        if not g.phrases:
            skip("captions_no_match", "no caption noun names an annotated category", g.caption)
            continue
        encoded = []
        for m in g.masks:
            if m is None or not m.any():
                stats["masks_empty"] += 1
                encoded.append(None)
            else:
                encoded.append(image_struct(encode_mask(m)))
        rows.append(
            {
                "image_id": image.id,
                "file_name": image.file_name,
                "image": image_struct(data, image.file_name),
                "width": image.width,
                "height": image.height,
                "caption": g.caption,
                "phrases": g.phrases,
                "categories": g.categories,
                "masks": encoded,
                "source": cfg.source,
            }
        )
        stats["phrases"] += len(g.phrases)
    stats["rows"] += len(rows)
    if rows:
        stats["images_with_rows"] += 1
    else:
        stats["images_skipped_no_match"] += 1
    return rows


def wait_for_shards(writer: ShardedWriter, n_items: int, timeout_s: float, poll_s: float = 1.0) -> None:
    """Block until every shard of the plan exists (other processes write theirs), or raise after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [s.index for s in writer.plan(n_items) if not writer.shard_path(s.index).exists()]
        if not missing:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise DatasetError(
                f"{writer.out_dir}: shards {missing[:5]} did not appear within {timeout_s:g} s; "
                "run the same command again to finish them"
            )
        time.sleep(min(poll_s, left))


def run(
    cfg: MasksConfig, rank: int = 0, world_size: int = 1, progress: bool = True, finalize_timeout_s: float = 86400.0
) -> dict:
    """Write the masks dataset of ``cfg``; returns the manifest (rank 0) or this process's summary (others).

    Under several processes each writes the shards ``k`` with ``k % world_size == rank``; rank 0 then polls
    until every shard file exists (at most ``finalize_timeout_s``) and writes ``manifest.json``, so no
    barrier is needed from the caller. Rerunning after a kill keeps the finished shards.
    """
    t0 = time.monotonic()
    _check(cfg)
    _check_rank(rank, world_size)
    source = SOURCES[cfg.source]
    coco = CocoDataset(cfg.coco_dir, cfg.split, captions=True, instances=source.needs_instances)
    ids = coco.ids[: cfg.limit] if cfg.limit is not None else coco.ids
    if not ids:
        raise DatasetError(f"{cfg.coco_dir}: split {cfg.split} lists no images; nothing to write")
    content = content_config(cfg)
    _refuse_other_settings(cfg.output, content)
    run_config = {"coco_dir": str(cfg.coco_dir), "output": str(cfg.output), "world_size": world_size}
    writer = ShardedWriter(cfg.output, "masks", "masks", content, run_config, cfg.shard_size, rank, world_size)
    todo = writer.pending(len(ids))
    written = dict.fromkeys(STATS_KEYS, 0)
    if todo:
        ground = source.build(cfg, coco)
        with _progress_bar(progress and rank == 0) as bar:
            task = bar.add_task(f"masks ({cfg.source})", total=sum(len(s.items) for s in todo))
            for shard in todo:
                stats, skipped, rows = dict.fromkeys(STATS_KEYS, 0), [], []
                for pos in shard.items:
                    rows += _image_rows(coco, coco[ids[pos]], cfg, ground, source.needs_instances, stats, skipped)
                    bar.advance(task)
                writer.write_shard(shard, rows, stats, skipped)
                for k, v in stats.items():
                    written[k] += v
    if rank != 0:
        return {"rank": rank, "world_size": world_size, "shards_written": len(todo), "stats": written}
    if world_size > 1:
        wait_for_shards(writer, len(ids), finalize_timeout_s)
    manifest = writer.finalize(len(ids), elapsed_s=round(time.monotonic() - t0, 3))
    if progress:
        from rich.console import Console

        Console(stderr=True).print(summary_line(manifest, cfg.output))
    return manifest


def summary_line(manifest: dict, output: Path | str) -> str:
    """One line for the end of a run: rows written and what was skipped."""
    s = manifest["stats"]
    skipped = {k: v for k, v in s.items() if v and (k.startswith("images_skipped") or k == "captions_no_match")}
    tail = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in skipped.items()) or "nothing skipped"
    return (
        f"masks: {manifest['num_rows']} rows, {s.get('phrases', 0)} phrases from {s.get('images', 0)} images "
        f"({tail}) -> {output}"
    )


def _refuse_other_settings(output: Path, content: dict) -> None:
    """A finished dataset in ``output`` written with other settings is never overwritten or mixed into."""
    from tcompose.datasets import config_fingerprint, load_manifest

    if not (output / MANIFEST).exists():
        return
    manifest = load_manifest(output)
    if manifest.get("fingerprint") != config_fingerprint(content):
        raise DatasetError(
            f"{output} already holds a masks dataset written with other settings ({manifest.get('config')}); "
            "write to a new --output folder or delete it"
        )


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def advance(self, *args, **kwargs):
        pass


def _progress_bar(enabled: bool):
    if not enabled:
        return _NoBar()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
