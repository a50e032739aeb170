"""Any captioned image set, presented to the masks stage the way :class:`tcompose.data.coco.CocoDataset` is.

Two layouts besides a COCO folder (:func:`open_images` picks one from the folder's contents, and the split of a
split layout, by :mod:`.captioned_layout`):

- an **imagefolder** (the Hugging Face convention): images under the folder and a ``metadata.jsonl`` or
  ``metadata.csv`` whose rows hold ``file_name`` (relative to the metadata file) and a caption column
  (``caption_column``; ``text`` by default, ``caption`` is accepted too when ``text`` is absent);
- a **Parquet dataset** folder (``*.parquet``, searched recursively, in path order), or one of Arrow files
  (``*.arrow``: what ``datasets.Dataset.save_to_disk`` writes, memory-mapped): ``image_column``
  holds the image as bytes, as a Hugging Face ``Image`` struct ``{bytes, path}``, or as a path (relative to
  the folder); ``caption_column`` holds a caption string (or a list of captions).

Rows are numbered 0, 1, ... in file order; that number is the image id, so shards are deterministic and a
rerun resumes. Read as a stream: one pass at start notes each row's place (the byte offset of its metadata record;
for tables, the row count of each row group, from the file metadata), and a row's caption and image are read when
it is asked for. A set of millions of rows costs 8 bytes a row of memory (imagefolder) or nothing per row
(Parquet / Arrow), never its captions or images; a table's last two row groups are kept for the rows that follow.
Image width and height come from the image header (0 x 0 for one that does not open: it is then skipped as
unreadable).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from array import array
from bisect import bisect_right
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from .captioned_layout import (COCO_DEFAULT_SPLIT, HUB_ID, choose_split, detect_kind, hub_snapshot, metadata_file,
                               split_folders, table_files)
from .coco import CocoError, CocoImage, ImageReadError

__all__ = ["CaptionedDataset", "detect_kind", "open_images"]

def open_images(root: str | Path, split: str, *, image_column: str = "image", caption_column: str = "text",
                captions: bool = True, instances: bool = True):
    """A :class:`CocoDataset` for a COCO folder, else a :class:`CaptionedDataset` (which has no instances) of
    ``split`` (:func:`choose_split`; masks' COCO default :data:`COCO_DEFAULT_SPLIT` counts as none asked for). A
    ``root`` that is no path but an ``owner/name`` hub dataset id in the local hub cache reads that snapshot."""
    hub_id = None
    if not Path(root).exists() and HUB_ID.fullmatch(str(root)):
        snapshot = hub_snapshot(str(root))
        if snapshot is None:
            raise CocoError(f"{root} is neither a folder nor a hub dataset in the local cache: pass a folder, or "
                            f"download it first (huggingface-cli download --repo-type dataset {root})")
        hub_id, root = str(root), snapshot
    kind = detect_kind(root)
    if kind == "coco":
        from .coco import CocoDataset

        return CocoDataset(root, split, captions=captions, instances=instances)
    if instances:
        what = "an imagefolder" if kind == "imagefolder" else f"a folder of {kind.capitalize()} files"
        raise CocoError(f"{root} is {what}, without instance annotations: --source coco-gt needs a COCO folder "
                        "(use --source grounded-sam)")
    data = CaptionedDataset(root, kind, image_column=image_column, caption_column=caption_column,
                            split=None if split == COCO_DEFAULT_SPLIT else split)
    data.hub_id = hub_id
    return data


def _captions(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value if v is not None)
    return (str(value),)


class CaptionedDataset:
    """The rows of an imagefolder or a Parquet / Arrow folder, image id = row number; the CocoDataset calls the
    masks stage makes (``ids``, ``[id]``, ``read_image``, ``category_names``, ``root``, ``split``).

    Read as a stream: what stays in memory is 8 bytes per row (the byte offset of its metadata record) for an
    imagefolder and the row count of each row group for a table, never captions or images. A row's caption and
    image are read when the row is asked for (tables: the row group holding it, the last two kept)."""

    def __init__(self, root: str | Path, kind: str, image_column: str = "image", caption_column: str = "text",
                 split: str | None = None):
        self.source, self.kind = Path(root), kind
        self.root = self.source  # where file names and image paths are relative to (a split's folder)
        self.image_column, self.caption_column = image_column, caption_column
        self.categories: dict[int, str] = {}
        self._offsets = array("q")  # imagefolder: byte offset of each row's record in the metadata file
        self._header: list[str] | None = None  # metadata.csv's columns
        self._meta: Path | None = None
        self._files: list[Path] = []  # tables: the files, and the first row of each (file, row group)
        self._groups: list[tuple[int, int]] = []
        self._starts = array("q")
        self._digest = hashlib.sha256()  # of what decides the rows: metadata bytes, or table files' layout
        if kind == "imagefolder":
            if image_column != "image":
                raise CocoError(f"--image-column {image_column}: an imagefolder's images are the files its metadata "
                                "names (file_name); --image-column is for Parquet / Arrow input")
            n = self._index_imagefolder(split)
        elif kind in ("parquet", "arrow"):
            n = self._index_tables(split)
        else:
            raise ValueError(f"unknown kind {kind!r}")
        self.split = self.split_name or kind
        self.ids = range(n)
        self.digest = self._digest.hexdigest()[:16]
        self._pid = None
        self.hub_id: str | None = None

    def describe(self) -> dict:
        """What the manifest records about the input: its kind, path, split, columns, and its row count and a
        digest of what decides the rows, so a changed input is not mixed into an older run's shards."""
        out = {"kind": self.kind, "path": str(self.source), "split": self.split_name,
               "caption_column": self.caption_column, "rows": len(self.ids), "digest": self.digest}
        if self.hub_id:
            out["hub_id"] = self.hub_id
        if self.kind != "imagefolder":
            out["image_column"] = self.image_column
        return out

    # ----- indexing

    def _index_imagefolder(self, split: str | None) -> int:
        meta = metadata_file(self.source)
        if meta is None:
            folders = split_folders(self.source)
            self.split_name = choose_split(self.source, list(folders), split)
            self.root = folders[self.split_name]
            meta = metadata_file(self.root)
        else:
            self.split_name = choose_split(self.source, [], split)
        self._meta = meta
        column = None
        for n, (offset, record) in enumerate(self._metadata_records(meta, digest=True), 1):
            if column is None:
                column = self._caption_column(record, meta)
            if not record.get("file_name"):
                raise CocoError(f"{meta}:{n}: the row has no file_name")
            self._offsets.append(offset)
        self.caption_column = column or self.caption_column
        return len(self._offsets)

    def _caption_column(self, columns, where: Path) -> str:
        """``caption_column``, or ``caption`` where the default ``text`` is absent (Hugging Face sets use both)."""
        column = self.caption_column
        if column not in columns and column == "text" and "caption" in columns:
            column = "caption"
        if column not in columns:
            hint = "pass --caption-column" if self.caption_column == "text" else "pass another --caption-column"
            raise CocoError(f"{where}: no caption column {self.caption_column!r} (columns: {', '.join(columns)}); "
                            f"{hint}")
        return column

    def _metadata_records(self, meta: Path, start: int | None = None, digest: bool = False
                          ) -> Iterator[tuple[int, dict]]:
        """(byte offset, record) of each row of metadata.jsonl / metadata.csv, from ``start`` (one record) or all
        (``digest``: hashing every byte read). A CSV record may span lines (a quoted field with a newline): it
        ends where its quotes balance."""
        try:
            with meta.open("rb") as f:
                if meta.suffix == ".csv" and self._header is None:
                    header = _csv_record(f)
                    if digest:
                        self._digest.update(header)
                    self._header = next(csv.reader([header.decode("utf-8-sig")]), []) if header else []
                if start is not None:
                    f.seek(start)
                n = 0
                while True:
                    offset = f.tell()
                    raw = _csv_record(f) if meta.suffix == ".csv" else f.readline()
                    if not raw:
                        return
                    if digest:
                        self._digest.update(raw)
                    n += 1
                    text = raw.decode("utf-8-sig" if offset == 0 else "utf-8")
                    if not text.strip():
                        continue
                    yield offset, self._parse(meta, text, n)
                    if start is not None:
                        return
        except (OSError, UnicodeDecodeError) as e:
            raise CocoError(f"{meta} cannot be read ({e})") from None

    def _parse(self, meta: Path, text: str, n: int) -> dict:
        if meta.suffix == ".csv":
            values = next(csv.reader(io.StringIO(text)), [])
            return dict(zip(self._header or [], values))
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise CocoError(f"{meta}:{n}: not a JSON object ({e.msg})") from None
        if not isinstance(record, dict):
            raise CocoError(f"{meta}:{n}: not a JSON object")
        return record

    def _record(self, image_id: int) -> dict:
        return next(self._metadata_records(self._meta, self._offsets[image_id]))[1]

    def _index_tables(self, split: str | None) -> int:
        self._files, self.split_name = table_files(self.source, self.kind, split)
        total = 0
        for fi, path in enumerate(self._files):
            try:
                names, sizes = _table_layout(path)
            except Exception as e:  # noqa: BLE001 - any pyarrow error: name the file
                raise CocoError(f"{path} is not a readable {self.kind.capitalize()} file ({e})") from None
            if self.image_column not in names:
                raise CocoError(f"{path}: no column {self.image_column!r} (columns: {', '.join(names)}); pass "
                                f"{'another ' if self.image_column != 'image' else ''}--image-column")
            self.caption_column = self._caption_column(names, path)
            self._digest.update(json.dumps([str(path.relative_to(self.source)), path.stat().st_size, sizes]).encode())
            for rg, size in enumerate(sizes):
                self._groups.append((fi, rg))
                self._starts.append(total)
                total += size
        return total

    # ----- the CocoDataset calls

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[CocoImage]:
        return (self[i] for i in self.ids)

    def __getitem__(self, image_id: int) -> CocoImage:
        if not 0 <= image_id < len(self.ids):
            raise KeyError(f"image id {image_id} is not in {self.root} ({len(self.ids)} rows)")
        if self.kind == "imagefolder":
            record = self._record(image_id)
            name, caps = str(record["file_name"]), _captions(record.get(self.caption_column))
        else:
            cell, caption = self._cells(image_id)
            name, caps = self._table_name(image_id, cell), _captions(caption)
        width = height = 0
        try:
            from PIL import Image

            with Image.open(io.BytesIO(self._bytes(image_id, name))) as im:
                width, height = im.size
        except Exception:  # noqa: BLE001 - read_image says why
            pass
        return CocoImage(id=image_id, file_name=name, width=width, height=height, captions=caps)

    @staticmethod
    def _table_name(image_id: int, cell: Any) -> str:
        if isinstance(cell, dict) and cell.get("path"):
            return str(cell["path"])
        if isinstance(cell, str) and cell:
            return cell
        return f"{image_id:09d}.jpg"

    def image_path(self, image: CocoImage) -> Path:
        return self.root / image.file_name

    def category_names(self, image: CocoImage, include_crowd: bool = True) -> list[str]:
        return []

    def read_image(self, image: CocoImage, check_size: bool = True) -> bytes:
        """The image's bytes after checking that they decode fully; :class:`ImageReadError` if not."""
        from PIL import Image

        path = self.image_path(image)
        try:
            data = self._bytes(image.id, image.file_name)
        except ImageReadError:
            raise
        except OSError as e:
            raise ImageReadError(path, f"cannot be read ({e.strerror or e})") from None
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            detail = re.sub(r"\s*<[^>]*>", "", str(e))
            raise ImageReadError(path, f"does not decode ({type(e).__name__}: {detail})") from None
        return data

    # ----- bytes

    def _bytes(self, image_id: int, name: str) -> bytes:
        if self.kind == "imagefolder":
            return self._inside(name).read_bytes()
        value = self._cells(image_id)[0]
        if isinstance(value, dict):
            if value.get("bytes"):
                return bytes(value["bytes"])
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str) and value:
            return self._inside(value).read_bytes()
        raise ImageReadError(self.root / f"row {image_id}", "is missing (the row has no image)")

    def _inside(self, name: str) -> Path:
        """The image file ``name`` names, relative to the folder; one outside it is not read (unreadable row)."""
        path = (self.root / name).resolve()
        if Path(name).is_absolute() or not path.is_relative_to(self.root.resolve()):
            raise ImageReadError(self.root / name, "is outside the dataset folder (file names are relative to it)")
        return path

    def _cells(self, image_id: int) -> tuple[Any, Any]:
        """(image cell, caption cell) of a table row."""
        g = bisect_right(self._starts, image_id) - 1
        if self._pid != os.getpid():  # a DataLoader worker: its own cache
            self._pid = os.getpid()
            self._group = lru_cache(maxsize=2)(self._read_group)
        images, captions = self._group(g)
        r = image_id - self._starts[g]
        return images[r], captions[r]

    def _read_group(self, g: int) -> tuple[list, list]:
        fi, rg = self._groups[g]
        return _read_group(self._files[fi], rg, [self.image_column, self.caption_column])

    def __getstate__(self) -> dict:  # no cache crosses to worker processes
        state = dict(self.__dict__)
        state.pop("_group", None)
        state["_pid"] = None
        return state


def _csv_record(f) -> bytes:
    """One CSV record from binary file ``f``: lines up to the one where the record's double quotes balance."""
    raw = f.readline()
    while raw and raw.count(b'"') % 2:
        more = f.readline()
        if not more:
            break
        raw += more
    return raw


def _arrow_batches(path: Path) -> list:
    """The record batches of an Arrow IPC file (stream format, as ``datasets.save_to_disk`` writes, or file
    format), memory-mapped: nothing is copied into memory until a column of a batch is converted."""
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        return list(pa.ipc.open_stream(source))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        return [reader.get_batch(i) for i in range(reader.num_record_batches)]


def _table_layout(path: Path) -> tuple[list[str], list[int]]:
    """(column names, rows of each row group / record batch) of a Parquet or Arrow file (metadata only)."""
    if path.suffix == ".arrow":
        batches = _arrow_batches(path)
        return (batches[0].schema.names if batches else []), [b.num_rows for b in batches]
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    return pf.schema_arrow.names, [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]


def _read_group(path: Path, group: int, columns: list[str]) -> tuple[list, ...]:
    """Columns of one row group (Parquet) or record batch (Arrow) as lists of Python values."""
    if path.suffix == ".arrow":
        batch = _arrow_batches(path)[group]
        return tuple(batch.column(c).to_pylist() for c in columns)
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path).read_row_group(group, columns=list(dict.fromkeys(columns)))
    return tuple(table.column(c).to_pylist() for c in columns)
