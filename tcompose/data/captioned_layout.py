"""Where a captioned image set's rows are: which kind of folder it is (COCO, imagefolder, Parquet, Arrow), which
split to read in a hub-style layout (``data/train-00000-of-00002.parquet`` beside ``test-*``, ``train/`` and
``test/`` folders) and a hub dataset id's snapshot in the local cache. :mod:`.captioned` reads the rows."""

from __future__ import annotations

import re
from pathlib import Path

from .coco import CocoError

__all__ = ["COCO_DEFAULT_SPLIT", "HUB_ID", "METADATA", "choose_split", "detect_kind", "file_split", "hub_snapshot",
           "metadata_file", "split_folders", "table_files"]

METADATA = ("metadata.jsonl", "metadata.csv")
#: masks' ``--split`` default, a COCO split: on a captioned set it means that no split was asked for.
COCO_DEFAULT_SPLIT = "train2017"
#: Split names recognised in a table's file paths (``data/train-00000-of-00002.parquet``, ``test/x.arrow``).
SPLIT_NAMES = ("train", "validation", "valid", "val", "test", "dev")
WHAT = ("a COCO folder, an imagefolder (metadata.jsonl or metadata.csv with file_name and a caption column), a "
        "folder of Parquet or Arrow files, or a hub dataset id in the local cache")


def metadata_file(folder: Path) -> Path | None:
    """The imagefolder metadata file of ``folder``, None if it has none; both kinds at once are refused (as the
    Hugging Face imagefolder loader refuses them)."""
    found = [folder / m for m in METADATA if (folder / m).is_file()]
    if len(found) > 1:
        raise CocoError(f"{folder} holds both metadata.jsonl and metadata.csv: keep one")
    return found[0] if found else None


def split_folders(root: Path) -> dict[str, Path]:
    """An imagefolder split into subfolders (``train/metadata.jsonl``, ``test/metadata.jsonl``): name -> folder."""
    return {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and metadata_file(d) is not None}


def detect_kind(root: str | Path) -> str:
    """``coco`` (a folder with annotations/), ``imagefolder`` (metadata.jsonl/csv, in the folder or in split
    subfolders), ``parquet`` (*.parquet) or ``arrow`` (*.arrow), searched in that order."""
    root = Path(root)
    if not root.exists():
        raise CocoError(f"{root} does not exist: pass {WHAT}")
    if not root.is_dir():
        raise CocoError(f"{root} is not a folder: pass {WHAT}")
    if (root / "annotations").is_dir():
        return "coco"
    if metadata_file(root) is not None or split_folders(root):
        return "imagefolder"
    if next(iter(root.rglob("*.parquet")), None) is not None:
        return "parquet"
    if next(iter(root.rglob("*.arrow")), None) is not None:
        return "arrow"
    raise CocoError(f"{root} holds neither annotations/ (COCO), metadata.jsonl / metadata.csv (imagefolder, also in "
                    "split subfolders) nor *.parquet / *.arrow files: nothing to read captions and images from")


def file_split(relative: Path) -> str | None:
    """The split a table file belongs to by the Hugging Face layouts: a folder named like a split
    (``train/data-00000-of-00001.arrow``) or a file name starting with one (``data/test-00000-of-00001.parquet``)."""
    for part in relative.parts[:-1]:
        if part.lower() in SPLIT_NAMES:
            return part
    m = re.match(r"([A-Za-z]+)(?:[-_.])", relative.name)
    return m.group(1) if m and m.group(1).lower() in SPLIT_NAMES else None


def choose_split(root: Path, splits: list[str], split: str | None) -> str | None:
    """The split to read among those found: the one asked for, else ``train``, else the only one; UserError
    when that does not decide it or names a split that is not there."""
    listed = ", ".join(splits)
    if not splits:
        if split is not None:
            raise CocoError(f"--split {split}: {root} is not split (no train / test files or folders); leave "
                            "--split out to read all of it")
        return None
    if split is not None:
        if split not in splits:
            raise CocoError(f"--split {split}: {root} has the splits {listed}; pass one of them")
        return split
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise CocoError(f"{root} has the splits {listed} and none is train: pass --split with one of them")


def table_files(root: Path, kind: str, split: str | None) -> tuple[list[Path], str | None]:
    """The ``*.parquet`` / ``*.arrow`` files of ``split`` (see :func:`choose_split`), in path order."""
    files = sorted(root.rglob(f"*.{kind}"))
    by_split: dict[str | None, list[Path]] = {}
    for f in files:
        by_split.setdefault(file_split(f.relative_to(root)), []).append(f)
    named = sorted(s for s in by_split if s is not None)
    if named and None in by_split:
        odd = by_split[None][0].relative_to(root)
        raise CocoError(f"{root} holds files of the splits {', '.join(named)} and files of none (e.g. {odd}): move "
                        "or remove those, or pass the folder of one split")
    chosen = choose_split(root, named, split)
    return by_split[chosen], chosen


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of hub dataset ``repo_id`` (offline: only what is in the cache), or None."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a valid id): the caller says what to pass
        return None
