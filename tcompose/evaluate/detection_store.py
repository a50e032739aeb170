"""Per-image detections on disk (MultiGen's and VISOR's), and the detection pass that writes them.

``OUT/detections/`` is a Parquet dataset, one folder per model, each holding part files
``part-r{rank}-p{first prompt id}-i{first image index}-{random}.parquet``; every part is written to a
temporary name and renamed, so it is complete or absent. A row is one image (:data:`DETECTION_SCHEMA`):

    model, prompt_id, image_index, prompt, categories (the names looked for), labels / scores / boxes (every box
    above the storing threshold, labelled with its best query's category, boxes [x0, y0, x1, y1] in pixels),
    image (its path under OUT), width, height, missing (null, or why the image could not be read: then
    labels, scores and boxes are null), colors (GenEval's detector: each box's colour or null; null for the
    other detectors, and in parts written before the column existed)

Resuming: the keys ``(prompt_id, image_index)`` already stored are skipped, whatever process count wrote
them; a rerun writes only the rest. Reading keeps the first row of a key (in part-name order) should two
runs ever have stored one twice. ``pyarrow.dataset.dataset("OUT/detections")``,
``pandas.read_parquet("OUT/detections")`` and ``datasets.load_dataset("parquet", data_dir="OUT/detections")``
read every model at once.
"""

from __future__ import annotations

import os
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq



class Prompt(Protocol):
    """What the detection pass needs of a prompt: its id, its text and the names to look for."""

    prompt_id: int
    text: str
    categories: Sequence[str]

DETECTION_SCHEMA = pa.schema([
    ("model", pa.string()),
    ("prompt_id", pa.int64()),
    ("image_index", pa.int32()),
    ("prompt", pa.string()),
    ("categories", pa.list_(pa.string())),
    ("labels", pa.list_(pa.string())),
    ("scores", pa.list_(pa.float32())),
    ("boxes", pa.list_(pa.list_(pa.float32()))),
    ("image", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("missing", pa.string()),
    ("colors", pa.list_(pa.string())),
])

Key = tuple[int, int]


def part_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


def stored_keys(folder: Path) -> set[Key]:
    """``(prompt_id, image_index)`` of every row stored in a model's detections folder."""
    keys: set[Key] = set()
    for path in part_files(folder):
        t = pq.read_table(path, columns=["prompt_id", "image_index"])
        keys.update(zip(t.column("prompt_id").to_pylist(), t.column("image_index").to_pylist()))
    return keys


def read_records(folder: Path) -> dict[Key, dict]:
    """Every stored row of a model, by key (first occurrence wins)."""
    out: dict[Key, dict] = {}
    for path in part_files(folder):
        for row in pq.read_table(path, schema=DETECTION_SCHEMA).to_pylist():
            out.setdefault((row["prompt_id"], row["image_index"]), row)
    return out


def write_part(folder: Path, rows: list[dict], rank: int) -> Path:
    """Write rows (one image each) as a new part file, atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    first = rows[0]
    name = f"part-r{rank:03d}-p{first['prompt_id']:06d}-i{first['image_index']:03d}-{uuid.uuid4().hex[:8]}.parquet"
    table = pa.Table.from_pylist(rows, schema=DETECTION_SCHEMA)
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, folder / name)
    return folder / name


def _load_rgb(path: Path) -> np.ndarray | str:
    """HxWx3 uint8 pixels, or the reason they cannot be had."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return "image file missing"
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as err:
        return f"unreadable image ({err})"


def _prefetched(paths: Sequence[Path], batch_size: int, workers: int = 4) -> Iterator[list[np.ndarray | str]]:
    """Decode images in threads, two batches ahead of the caller (PNG decoding then overlaps the detector)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        nxt = 0
        while nxt < len(paths) or pending:
            while nxt < len(paths) and len(pending) < 2 * batch_size:
                pending.append(pool.submit(_load_rgb, paths[nxt]))
                nxt += 1
            n = min(batch_size, len(pending))
            yield [pending.popleft().result() for _ in range(n)]


def detect_images(
    detector, model_name: str, out_dir: Path, image_dir: Path, filename: Callable[[int, int], str],
    todo: Sequence[tuple[Prompt, int]], folder: Path, threshold: float, batch_size: int, part_size: int, rank: int,
    advance: Callable[[int], None] = lambda n: None,
) -> int:
    """Detect each ``(prompt, image_index)`` of ``todo`` in its PNG and store the rows, ``part_size`` images per
    part. Returns the number of images stored (missing ones included, as rows saying why)."""
    paths = [image_dir / filename(p.prompt_id, k) for p, k in todo]
    rows: list[dict] = []
    done = 0
    for start, batch in zip(range(0, len(todo), batch_size), _prefetched(paths, batch_size)):
        items = todo[start:start + batch_size]
        ok = [i for i, b in enumerate(batch) if not isinstance(b, str)]
        found = detector.detect([batch[i] for i in ok], [items[i][0].categories for i in ok], threshold) if ok else []
        by_pos = dict(zip(ok, found))
        for i, ((prompt, k), pixels) in enumerate(zip(items, batch)):
            det = by_pos.get(i)
            rows.append({
                "model": model_name, "prompt_id": prompt.prompt_id, "image_index": k, "prompt": prompt.text,
                "categories": list(prompt.categories),
                "labels": det.labels if det else None, "scores": det.scores if det else None,
                "boxes": det.boxes if det else None,
                "image": os.path.relpath(paths[start + i], out_dir),
                "width": None if det is None else int(pixels.shape[1]),
                "height": None if det is None else int(pixels.shape[0]),
                "missing": pixels if isinstance(pixels, str) else None,
                "colors": getattr(det, "colors", None),
            })
        advance(len(items))
        if len(rows) >= part_size:
            write_part(folder, rows, rank)
            done += len(rows)
            rows = []
    if rows:
        write_part(folder, rows, rank)
        done += len(rows)
    return done
