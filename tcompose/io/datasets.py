"""Datasets on disk: the schemas stages exchange, sharded atomic writing, resumable reading.

A dataset is a folder of Parquet shards (``train-00000.parquet``, ...) plus ``manifest.json``. Each shard
covers a fixed, deterministic slice of the stage's input items, so a killed run that is started again
skips the shards already on disk and writes exactly the rows an uninterrupted run would have: a shard is
written to a temporary name and renamed, so it is either complete or absent. Under several processes,
shard ``k`` belongs to rank ``k % world_size``; each process writes its own shards and the main process
merges their statistics into the manifest.

Images are embedded as the ``datasets.Image()`` struct ``{bytes, path}``; the schema carries Hugging Face
feature metadata, so ``datasets.load_dataset("parquet", data_dir=DIR)`` decodes them as PIL images, and
plain ``pyarrow.parquet.read_table`` reads the same files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError

MANIFEST = "manifest.json"
# "train-" (not "part-"): datasets' default file patterns then pick the shards as the train split and leave
# manifest.json out; with any other name load_dataset("parquet", data_dir=DIR) also reads manifest.json and fails.
SHARD_PATTERN = "train-{:05d}.parquet"
SHARD_GLOB = "train-*.parquet"
_META_KEY = b"tcompose"

ROW_GROUP_SIZE = 16

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

#: One row per (image, caption). ``phrases[i]`` is grounded by ``masks[i]`` (a 1-bit PNG at image
#: resolution, or null where no mask was found); ``categories[i]`` is the dataset category it names
#: (empty where the source does not know one).
MASKS_COLUMNS = {
    "image_id": pa.int64(),
    "file_name": pa.string(),
    "image": IMAGE_STRUCT,
    "width": pa.int32(),
    "height": pa.int32(),
    "caption": pa.string(),
    "phrases": pa.list_(pa.string()),
    "categories": pa.list_(pa.string()),
    "masks": pa.list_(IMAGE_STRUCT),
    "source": pa.string(),
}

#: One row per COCO instance annotation: ``image`` is the crop (JPEG), ``text`` its caption ("a photo of a
#: {category}"), ``bbox`` the annotation's box ``[x, y, w, h]`` in source-image pixels (COCO convention), and
#: ``crop_box`` the region cut, ``[x0, y0, x1, y1]`` in source-image pixels (it may reach past the image edge,
#: where the crop is padded).
CROPS_COLUMNS = {
    "image": IMAGE_STRUCT,
    "text": pa.string(),
    "category": pa.string(),
    "category_id": pa.int64(),
    "image_id": pa.int64(),
    "ann_id": pa.int64(),
    "bbox": pa.list_(pa.float32()),
    "crop_box": pa.list_(pa.int32()),
}

#: Columns of each dataset kind.
COLUMNS = {"masks": MASKS_COLUMNS, "crops": CROPS_COLUMNS}

_HF_FEATURES = {
    "crops": {
        "image": {"_type": "Image"},
        "text": {"dtype": "string", "_type": "Value"},
        "category": {"dtype": "string", "_type": "Value"},
        "category_id": {"dtype": "int64", "_type": "Value"},
        "image_id": {"dtype": "int64", "_type": "Value"},
        "ann_id": {"dtype": "int64", "_type": "Value"},
        "bbox": {"feature": {"dtype": "float32", "_type": "Value"}, "_type": "List"},
        "crop_box": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"},
    },
    "masks": {
        "image_id": {"dtype": "int64", "_type": "Value"},
        "file_name": {"dtype": "string", "_type": "Value"},
        "image": {"_type": "Image"},
        "width": {"dtype": "int32", "_type": "Value"},
        "height": {"dtype": "int32", "_type": "Value"},
        "caption": {"dtype": "string", "_type": "Value"},
        "phrases": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "List"},
        "categories": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "List"},
        "masks": {"feature": {"_type": "Image"}, "_type": "List"},
        "source": {"dtype": "string", "_type": "Value"},
    }
}


class DatasetError(UserError):
    """A dataset folder that cannot be read or written as asked; the message names the fix."""


def schema_for(kind: str) -> pa.Schema:
    """The Arrow schema of a dataset kind (``"masks"``, ``"crops"``), with Hugging Face feature metadata."""
    if kind not in COLUMNS:
        raise DatasetError(f"unknown dataset kind {kind!r}: one of {', '.join(COLUMNS)}")
    columns = COLUMNS[kind]
    meta = {b"huggingface": json.dumps({"info": {"features": _HF_FEATURES[kind]}}).encode()}
    return pa.schema(list(columns.items()), metadata=meta)


# ----------------------------------------------------------------------------------------------------------
# Images and masks as bytes


def encode_mask(mask: np.ndarray) -> bytes:
    """Encode a boolean HxW mask as 1-bit PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool)).convert("1").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def decode_mask(data: bytes | dict) -> np.ndarray:
    """Decode PNG bytes (or an image struct ``{bytes, path}``) into a boolean HxW array (> 0 = foreground)."""
    from PIL import Image

    if isinstance(data, dict):
        data = data["bytes"]
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("L"))
    return arr > 0


def image_struct(data: bytes, path: str | None = None) -> dict:
    return {"bytes": data, "path": path}


# ----------------------------------------------------------------------------------------------------------
# Writing


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes a dataset's contents."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("tcompose", "torch", "diffusers", "transformers", "pyarrow", "numpy", "pillow", "pycocotools"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def config_fingerprint(config: dict) -> str:
    """A short hash of the settings that decide a dataset's rows (not of paths or performance knobs)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Shard:
    index: int
    items: range  # positions in the stage's ordered input list


class ShardedWriter:
    """Write a dataset shard by shard, atomically, resumably and per process.

    ``content_config`` holds the settings that decide the rows; a shard written with other settings is
    refused on resume (the caller must pick a new ``--output``), never silently mixed in.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        kind: str,
        stage: str,
        content_config: dict,
        run_config: dict | None = None,
        shard_size: int = 1000,
        rank: int = 0,
        world_size: int = 1,
    ):
        if shard_size < 1:
            raise DatasetError(f"shard size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.kind = kind
        self.schema = schema_for(kind)
        self.stage = stage
        self.content_config = content_config
        self.run_config = run_config or {}
        self.fingerprint = config_fingerprint(content_config)
        self.shard_size = shard_size
        self.rank = rank
        self.world_size = world_size
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def shard_path(self, index: int) -> Path:
        return self.out_dir / SHARD_PATTERN.format(index)

    def plan(self, n_items: int) -> list[Shard]:
        """All shards of the input, in order (every process sees the same plan)."""
        return [
            Shard(i, range(start, min(start + self.shard_size, n_items)))
            for i, start in enumerate(range(0, n_items, self.shard_size))
        ]

    def pending(self, n_items: int) -> list[Shard]:
        """This process's shards that are not on disk yet; finished ones are checked against the settings."""
        todo = []
        for shard in self.plan(n_items):
            if shard.index % self.world_size != self.rank:
                continue
            path = self.shard_path(shard.index)
            if path.exists():
                meta = read_shard_meta(path)
                if meta.get("fingerprint") != self.fingerprint:
                    raise DatasetError(
                        f"{path} was written with other settings ({meta.get('config')}); "
                        f"write to a new --output folder or delete {self.out_dir}"
                    )
                continue
            todo.append(shard)
        return todo

    def write_shard(self, shard: Shard, rows: list[dict], stats: dict[str, int], skipped: list[dict]) -> Path:
        """Write one shard (rows may be empty) with its statistics, atomically."""
        table = pa.Table.from_pylist(rows, schema=self.schema)
        meta = {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "config": self.content_config,
            "shard": shard.index,
            "items": [shard.items.start, shard.items.stop],
            "rows": len(rows),
            "stats": stats,
            "skipped": skipped,
        }
        schema_meta = dict(table.schema.metadata or {})
        schema_meta[_META_KEY] = json.dumps(meta, default=str).encode()
        table = table.replace_schema_metadata(schema_meta)
        path = self.shard_path(shard.index)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        # Small row groups: a training loader reads one example by decoding only its row group.
        if rows:
            pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_SIZE)
        else:  # no row group at all: datasets' reader fails on a 0-row group ("BatchSize must be greater than 0")
            pq.ParquetWriter(tmp, table.schema, compression="zstd").close()
        os.replace(tmp, path)
        return path

    def finalize(self, n_items: int, elapsed_s: float | None = None) -> dict:
        """Merge every shard's statistics into ``manifest.json`` (main process, after all shards exist)."""
        shards = self.plan(n_items)
        missing = [s.index for s in shards if not self.shard_path(s.index).exists()]
        if missing:
            raise DatasetError(f"{self.out_dir}: shards {missing[:5]} are missing; run the command again to finish them")
        stats: dict[str, int] = {}
        skipped: list[dict] = []
        files = []
        total = 0
        for s in shards:
            meta = read_shard_meta(self.shard_path(s.index))
            for k, v in meta.get("stats", {}).items():
                stats[k] = stats.get(k, 0) + v
            skipped.extend(meta.get("skipped", []))
            files.append({"file": self.shard_path(s.index).name, "rows": meta["rows"]})
            total += meta["rows"]
        manifest = {
            "stage": self.stage,
            "kind": self.kind,
            "num_rows": total,
            "num_items": n_items,
            "shards": files,
            "stats": stats,
            "skipped": skipped,
            "config": self.content_config,
            "run": self.run_config,
            "fingerprint": self.fingerprint,
            "versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "elapsed_s": elapsed_s,
        }
        write_json_atomic(self.out_dir / MANIFEST, manifest)
        return manifest


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file: a reader never sees half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_shard_meta(path: str | os.PathLike) -> dict:
    meta = pq.read_schema(path).metadata or {}
    if _META_KEY not in meta:
        return {}
    return json.loads(meta[_META_KEY])


# ----------------------------------------------------------------------------------------------------------
# Reading


def shard_files(data_dir: str | os.PathLike) -> list[Path]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir}: no such dataset folder (make one with `tcompose masks ... --output {data_dir}`)")
    files = sorted(data_dir.glob(SHARD_GLOB))
    if not files:
        raw = any((data_dir / m).is_file() for m in ("metadata.jsonl", "metadata.csv")) or (data_dir / "annotations").is_dir() \
            or next(data_dir.rglob("*.parquet"), None) is not None or next(data_dir.rglob("*.arrow"), None) is not None
        hint = (f"it looks like captioned images, not a tcompose dataset: make one from them first with `tcompose "
                f"masks {data_dir} --output MASKS` and pass MASKS") if raw else "is it a tcompose dataset folder?"
        raise DatasetError(f"{data_dir}: holds no {SHARD_GLOB} shards; {hint}")
    return files


def load_manifest(data_dir: str | os.PathLike) -> dict:
    shard_files(data_dir)  # a missing or empty folder says so first
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise DatasetError(f"{path} is missing: the stage that writes {data_dir} did not finish; run it again")
    return json.loads(path.read_text())


def read_table(data_dir: str | os.PathLike, kind: str = "masks", columns: list[str] | None = None) -> pa.Table:
    """All rows of a dataset folder as one Arrow table, checking that the columns of ``kind`` are there."""
    files = shard_files(data_dir)
    tables = [pq.read_table(f, columns=columns) for f in files]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    wanted = columns or list(COLUMNS[kind])
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise DatasetError(f"{data_dir}: columns {missing} are missing; expected a {kind} dataset")
    return table


def check_columns(data_dir: str | os.PathLike, kind: str = "masks") -> list[Path]:
    """The shard files of a dataset folder, after checking (from the schemas alone) that ``kind``'s columns are there."""
    files = shard_files(data_dir)
    for f in files:
        missing = [c for c in COLUMNS[kind] if c not in pq.read_schema(f).names]
        if missing:
            raise DatasetError(f"{f}: columns {missing} are missing; expected a {kind} dataset")
    return files


def iter_rows(data_dir: str | os.PathLike, columns: list[str] | None = None) -> Iterator[dict]:
    for f in shard_files(data_dir):
        yield from pq.read_table(f, columns=columns).to_pylist()


class RowReader:
    """Random access to the rows of a dataset folder, decoding one Parquet row group at a time.

    Rows are numbered in shard order (as :func:`read_table` concatenates them). Only the last row group read
    is kept in memory, so a loader can index a dataset far larger than RAM; the object pickles to worker
    processes as paths and offsets, and each worker opens the files itself.
    """

    def __init__(self, data_dir: str | os.PathLike, columns: list[str]):
        self.files = shard_files(data_dir)
        self.columns = columns
        self.starts: list[int] = []  # first global row of each (file, row group)
        self.groups: list[tuple[int, int]] = []
        total = 0
        for fi, f in enumerate(self.files):
            meta = pq.read_metadata(f)
            for rg in range(meta.num_row_groups):
                self.starts.append(total)
                self.groups.append((fi, rg))
                total += meta.row_group(rg).num_rows
        self.num_rows = total
        self._handles: dict[int, pq.ParquetFile] = {}
        self._cache: tuple[int, list[dict]] | None = None

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, row: int) -> dict:
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} out of range for {self.num_rows} rows")
        import bisect

        g = bisect.bisect_right(self.starts, row) - 1
        if self._cache is None or self._cache[0] != g:
            fi, rg = self.groups[g]
            if fi not in self._handles:
                self._handles[fi] = pq.ParquetFile(self.files[fi])
            self._cache = (g, self._handles[fi].read_row_group(rg, columns=self.columns).to_pylist())
        return self._cache[1][row - self.starts[g]]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"], state["_cache"] = {}, None
        return state

