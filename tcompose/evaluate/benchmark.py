"""What the detection benchmarks (multigen, visor) share: run.json checks, the work split, waiting for other
processes, progress, timing rates and the hub commit a model resolved to.

A benchmark run generates images with :mod:`tcompose.evaluate.generate`, detects objects in them
(:mod:`tcompose.evaluate.detection_store`) and scores on rank 0. The j-th (prompt, image) of the run goes to
rank ``j % world_size`` for generation and detection alike, so a process detects the images it generated; rank 0
waits for every detection before scoring.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence, TypeVar

P = TypeVar("P")


def merge_run_json(path: Path, record: dict, fixed: Sequence[str] = ("prompt_source", "detection")) -> dict:
    """The run.json to write: refuses other ``fixed`` settings (the prompts, the detector) or other settings of
    a model already in the folder; adds new models."""
    if not path.is_file():
        return record
    old = json.loads(path.read_text())
    for key in fixed:
        if old.get(key) != record[key]:
            raise ValueError(f"{path}: this folder was run with other {key.replace('_', ' ')} ({old.get(key)}); "
                             "use a new --output, or the same settings")
    for name, settings in record["models"].items():
        if name in old.get("models", {}) and old["models"][name] != settings:
            raise ValueError(f"{path}: model {name!r} was generated with other settings ({old['models'][name]}); "
                             "give it another NAME= or use a new --output")
    return {**old, **record, "models": {**old.get("models", {}), **record["models"]}}


def my_share(prompts: Sequence[P], images: int, rank: int, world_size: int) -> list[tuple[P, int]]:
    """This process's (prompt, image index) pairs: every world_size-th, as tcompose.evaluate.generate splits them."""
    return [(p, k) for p in prompts for k in range(images)][rank::world_size]


def wait_for_files(paths: list[Path], timeout_s: float) -> None:
    """Wait until every path exists (images other processes generate)."""
    deadline = time.monotonic() + timeout_s
    while missing := [p for p in paths if not p.exists()]:
        if time.monotonic() > deadline:
            raise ValueError(f"{len(missing)} images (e.g. {missing[0]}) did not appear within {timeout_s:g} s; "
                             "run the same command again to finish them")
        time.sleep(1.0)


def wait_for_detections(folder: Path, keys: set, timeout_s: float, poll_s: float = 2.0) -> None:
    """Wait until a model's detections folder holds every (prompt_id, image_index) of ``keys``."""
    from .detection_store import stored_keys

    deadline = time.monotonic() + timeout_s
    while missing := keys - stored_keys(folder):
        if time.monotonic() > deadline:
            raise ValueError(f"{folder}: detections of {len(missing)} images (e.g. prompt {min(missing)[0]}) did not "
                             f"appear within {timeout_s:g} s; run the same command again to finish them")
        time.sleep(poll_s)


def hub_commit(name: str, revision: str | None) -> str | None:
    """The commit a hub id resolved to in the local cache (None for a local folder or an uncached id)."""
    try:
        from huggingface_hub import snapshot_download

        from ..models.loading import local_path

        if local_path(name) is not None:
            return None
        return Path(snapshot_download(name, revision=revision, local_files_only=True)).name
    except Exception:  # noqa: BLE001 (only informative)
        return None


def detection_rates(t: dict) -> dict:
    """Timings rounded, with detection images/s and detection's time over generation's."""
    t = {k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()}
    t["detection_images_per_s"] = round(t["detected"] / t["detection_s"], 4) if t["detection_s"] else None
    t["detection_over_generation"] = round(t["detection_s"] / t["generation_s"], 4) if t["generation_s"] else None
    return t


class CountBar:
    """A rich progress bar (or nothing); ``with CountBar(enabled, label, total) as advance: advance(n)``."""

    def __init__(self, enabled: bool, label: str, total: int):
        self.progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn())
            self.task = self.progress.add_task(label, total=total)

    def __enter__(self):
        if self.progress is None:
            return lambda n: None
        self.progress.__enter__()
        return lambda n: self.progress.advance(self.task, n)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False
