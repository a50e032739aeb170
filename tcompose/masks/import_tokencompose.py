"""Import the original TokenCompose training data (grounded-SAM masks of COCO caption nouns) as a masks dataset.

Runbook::

    # the original layout: data/coco_gsam_img/train/{metadata.jsonl,*.jpg}, data/coco_gsam_seg/<id>/mask_*.png
    tcompose masks --from-tokencompose data/coco_gsam_img/train/metadata.jsonl \\
        --images data/coco_gsam_img/train --seg-root data/coco_gsam_seg --output DIR
    # killed? run the same command again: finished shards are kept, the rest is written, rows are identical

``metadata.jsonl`` holds one JSON object per line::

    {"file_name": "000000000370.jpg", "text": "A little girl holds a piece of broccoli towards the camera.",
     "attn_list": [["girl", "seg/000000000370/mask_000000000370_girl.png"], ["piece", null], ...]}

Each line becomes one row of :data:`tcompose.io.datasets.MASKS_COLUMNS` (source ``tokencompose``): the image
file's own bytes, ``caption`` = ``text`` with whitespace collapsed, ``phrases`` in ``attn_list`` order,
``categories`` empty strings (the original knows no COCO category), and per phrase its mask as a 1-bit PNG
(grey PNG > 0 is foreground; of an RGB(A) PNG, as the original's ``plt.imsave`` wrote them, the first
channel, as the original's loader read it). A phrase whose path is null keeps a null mask (counted in
``masks_null``); an all-black mask is stored as null too (``masks_empty``). ``image_id`` is the number in
a COCO file name (``000000123456.jpg``, ``COCO_train2014_000000123456.jpg``), else the line number.

Mask paths are resolved under ``seg_root``: ``seg_root/<path>``, or, for a path starting with ``seg/``,
``seg_root/<path without seg/>`` (the original's ``coco_gsam_seg`` folder holds the ``<id>/`` folders
directly). Not fatal, but counted in ``stats`` and listed in ``skipped`` (``{line, file_name, reason}``): a
line that is not valid JSON or lacks ``file_name``/``text``/``attn_list``, a row without phrases, an image
that is missing or does not decode, a mask file that is missing, does not decode or has another size than
its image (the whole row is skipped: a misaligned mask would teach the wrong place). Shards cover
``shard_size`` consecutive lines; several processes and resuming work as in :mod:`tcompose.masks`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.errors import MissingPathError, NotAFolderError, UserError
from ..io.datasets import DatasetError, ShardedWriter, encode_mask, image_struct
from ..io.stages import progress_bar, refuse_empty, refuse_other_settings, remove_stale_tmp, wait_for_shards

SOURCE = "tokencompose"

#: Counters every import manifest has under ``stats`` (summed over shards).
STATS_KEYS = (
    "lines",  # non-blank metadata lines considered (after --limit)
    "rows",  # rows written
    "phrases",  # phrases of the written rows
    "masks_null",  # phrases whose mask path is null (kept, mask null)
    "masks_empty",  # phrases whose mask file is all black (kept, mask null)
    "lines_skipped_bad_json",  # not JSON, or lacking file_name / text / attn_list
    "rows_skipped_no_phrases",  # empty attn_list or empty text
    "rows_skipped_unreadable_image",  # image missing or not decodable
    "rows_skipped_bad_mask",  # a mask file missing, not decodable or of another size than the image
)

_COCO_NAME = re.compile(r"^(?:COCO_[A-Za-z]+\d*_)?(\d+)$")


@dataclass
class ImportConfig:
    """Settings of ``tcompose masks --from-tokencompose``."""

    metadata: Path
    """The original ``metadata.jsonl`` (one ``{"file_name", "text", "attn_list"}`` object per line)."""
    output: Path
    """Dataset folder to write (Parquet shards + manifest.json); rerunning into it resumes."""
    images: Path | None = None
    """Folder of the images named by ``file_name`` (None: the metadata file's folder, as in the original)."""
    seg_root: Path | None = None
    """Folder the mask paths are relative to (None: the metadata file's folder); see the module docstring."""
    limit: int | None = None
    """Only the first N lines of the metadata file (None: all)."""
    shard_size: int = 1000
    """Metadata lines per Parquet shard; the unit of resuming and of splitting work between processes."""

    def __post_init__(self):
        self.metadata = Path(self.metadata)
        self.output = Path(self.output)
        self.images = Path(self.images) if self.images is not None else self.metadata.parent
        self.seg_root = Path(self.seg_root) if self.seg_root is not None else self.metadata.parent


def image_id_for(file_name: str, line: int) -> int:
    """The COCO image id in ``file_name`` (``000000123456.jpg`` -> 123456), else ``line`` (1-based)."""
    m = _COCO_NAME.match(Path(file_name).stem)
    return int(m.group(1)) if m else line


def mask_path(seg_root: Path, path: str) -> Path:
    """Where a mask path of ``attn_list`` lies: ``seg_root/path``, else ``seg_root/path-without-seg/``."""
    direct = seg_root / path
    parts = Path(path).parts
    if not direct.exists() and len(parts) > 1 and parts[0] == "seg":
        return seg_root.joinpath(*parts[1:])
    return direct


def read_mask(path: Path) -> np.ndarray:
    """A mask PNG as a boolean HxW array (> 0 is foreground; RGB(A): the first channel). OSError etc. on failure."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        band = im.getchannel(0) if im.mode in ("RGB", "RGBA") else im.convert("L")
        return np.asarray(band) > 0


def _failure(e: Exception) -> str:
    return "is missing" if isinstance(e, FileNotFoundError) else f"does not decode ({type(e).__name__})"


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise MissingPathError(f"{path}: cannot be read ({e.strerror or e}); pass the original metadata.jsonl") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); is it a metadata.jsonl?") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def content_config(cfg: ImportConfig, lines: list[str]) -> dict:
    """The settings that decide the rows: the metadata's content (not its path), ``limit`` and ``shard_size``."""
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    return {"source": SOURCE, "metadata_sha256": digest, "limit": cfg.limit, "shard_size": cfg.shard_size}


def _check(cfg: ImportConfig) -> None:
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"--limit must be >= 1 (or left out for all lines), got {cfg.limit}")
    if cfg.shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {cfg.shard_size}")
    for name, folder in (("--images", cfg.images), ("--seg-root", cfg.seg_root)):
        if not folder.is_dir():
            raise NotAFolderError(f"{name} {folder} is not a folder: pass the folder of the original data")


def line_row(text: str, number: int, cfg: ImportConfig, stats: dict, skipped: list) -> dict | None:
    """The row of metadata line ``number`` (1-based), or None (counted in ``stats``, listed in ``skipped``)."""
    from PIL import Image

    if not text.strip():
        return None
    stats["lines"] += 1
    file_name = None

    def skip(key: str, reason: str) -> None:
        stats[key] += 1
        skipped.append({"line": number, "file_name": file_name, "reason": reason})

    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        return skip("lines_skipped_bad_json", f"not valid JSON ({e.msg} at column {e.colno})")
    pairs = d.get("attn_list") if isinstance(d, dict) else None
    if (not isinstance(d, dict) or not isinstance(d.get("file_name"), str) or not isinstance(d.get("text"), str)
            or not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs)
            or not all(isinstance(p[0], str) and (p[1] is None or isinstance(p[1], str)) for p in pairs)):
        return skip("lines_skipped_bad_json", 'not {"file_name": str, "text": str, "attn_list": [[phrase, path|null]]}')
    file_name = d["file_name"]
    caption = " ".join(d["text"].split())
    if not pairs or not caption:
        return skip("rows_skipped_no_phrases", "empty attn_list" if not pairs else "empty text")
    try:
        data = (cfg.images / file_name).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            width, height = im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return skip("rows_skipped_unreadable_image", f"image {file_name} {_failure(e)}")
    masks, null, empty = [], 0, 0
    for phrase, rel in pairs:
        if rel is None:
            null += 1
            masks.append(None)
            continue
        try:
            mask = read_mask(mask_path(cfg.seg_root, rel))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            return skip("rows_skipped_bad_mask", f"mask of {phrase!r}: {rel} {_failure(e)}")
        if mask.shape != (height, width):
            size = f"{mask.shape[1]}x{mask.shape[0]}"
            return skip("rows_skipped_bad_mask", f"mask of {phrase!r}: {rel} is {size} but the image is {width}x{height}")
        empty += not mask.any()
        masks.append(image_struct(encode_mask(mask)) if mask.any() else None)
    for key, n in (("rows", 1), ("phrases", len(pairs)), ("masks_null", null), ("masks_empty", empty)):
        stats[key] += n
    return {
        "image_id": image_id_for(file_name, number), "file_name": file_name, "image": image_struct(data, file_name),
        "width": width, "height": height, "caption": caption, "phrases": [p for p, _ in pairs],
        "categories": [""] * len(pairs), "masks": masks, "source": SOURCE,
    }


def run(
    cfg: ImportConfig, rank: int = 0, world_size: int = 1, progress: bool = True, finalize_timeout_s: float = 86400.0
) -> dict:
    """Write the masks dataset of the original data; returns the manifest (rank 0) or this process's summary.

    Under several processes each writes the shards ``k`` with ``k % world_size == rank``; rank 0 then waits
    until every shard file exists (at most ``finalize_timeout_s``) and writes ``manifest.json``.
    """
    t0 = time.monotonic()
    _check(cfg)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
    lines = _read_lines(cfg.metadata)
    lines = lines[: cfg.limit] if cfg.limit is not None else lines
    if not any(line.strip() for line in lines):
        raise DatasetError(f"{cfg.metadata}: holds no lines; nothing to write")
    content = content_config(cfg, lines)
    refuse_other_settings(cfg.output, content, "masks")
    run_config = {"metadata": str(cfg.metadata), "images": str(cfg.images), "seg_root": str(cfg.seg_root),
                  "output": str(cfg.output), "world_size": world_size}
    writer = ShardedWriter(cfg.output, "masks", "import-tokencompose", content, run_config, cfg.shard_size, rank,
                           world_size)
    todo = writer.pending(len(lines))
    remove_stale_tmp(writer, todo)
    written = dict.fromkeys(STATS_KEYS, 0)
    with progress_bar(progress and rank == 0) as bar:
        task = bar.add_task("import tokencompose", total=sum(len(s.items) for s in todo))
        for shard in todo:
            stats, skipped, rows = dict.fromkeys(STATS_KEYS, 0), [], []
            for pos in shard.items:
                row = line_row(lines[pos], pos + 1, cfg, stats, skipped)
                if row is not None:
                    rows.append(row)
                bar.advance(task)
            writer.write_shard(shard, rows, stats, skipped)
            for k, v in stats.items():
                written[k] += v
    if rank != 0:
        return {"rank": rank, "world_size": world_size, "shards_written": len(todo), "stats": written}
    if world_size > 1:
        wait_for_shards(writer, len(lines), finalize_timeout_s)
    manifest = writer.finalize(len(lines), elapsed_s=round(time.monotonic() - t0, 3))
    refuse_empty(manifest, writer, str(cfg.metadata), "lines")
    if progress:
        from rich.console import Console

        Console(stderr=True).print(summary_line(manifest, cfg.output), highlight=False)
    return manifest


def summary_line(manifest: dict, output: Path | str) -> str:
    """One line for the end of a run: rows, phrases, null masks and what was skipped."""
    s = manifest["stats"]
    skips = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in s.items() if v and "skipped" in k) or "nothing skipped"
    return (
        f"import tokencompose: {manifest['num_rows']} rows, {s.get('phrases', 0)} phrases "
        f"({s.get('masks_null', 0)} without mask) from {s.get('lines', 0)} lines ({skips}) -> {output}"
    )
