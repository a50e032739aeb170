"""What every sharded stage (masks, crops, the TokenCompose import) does around its rows: a progress bar,
refusing a folder written with other settings, cleaning a killed run's temporary files, and the main
process waiting for the other processes' shards before it writes the manifest."""

from __future__ import annotations

import time
from pathlib import Path

from .datasets import MANIFEST, DatasetError, ShardedWriter, config_fingerprint, load_manifest


def progress_bar(enabled: bool):
    """A rich progress bar (``add_task``, ``advance``); it draws nothing unless ``enabled``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, disable=not enabled)


def wait_for_shards(writer: ShardedWriter, n_items: int, timeout_s: float, poll_s: float = 1.0) -> None:
    """Block until every shard of the plan exists (other processes write theirs), or raise after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while missing := [s.index for s in writer.plan(n_items) if not writer.shard_path(s.index).exists()]:
        if time.monotonic() >= deadline:
            raise DatasetError(f"{writer.out_dir}: shards {missing[:5]} did not appear within {timeout_s:g} s; "
                               "run the same command again to finish them")
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))


def refuse_other_settings(output: Path, content: dict, kind: str) -> None:
    """A finished dataset in ``output`` written with other settings is never overwritten or mixed into."""
    if not (output / MANIFEST).exists():
        return
    manifest = load_manifest(output)
    if manifest.get("fingerprint") != config_fingerprint(content):
        changes = setting_changes(manifest.get("config") or {}, content)
        raise DatasetError(
            f"{output} already holds a {manifest.get('kind', kind)} dataset written with other settings "
            f"({changes or manifest.get('config')}); write to a new --output folder or delete it"
        )


def setting_changes(old: dict, new: dict, prefix: str = "") -> str:
    """``"split: val2017 -> train2017; input.rows: 5 -> 7"``: what differs between two settings dicts (nested
    dicts by dotted key); empty when nothing does."""
    out = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = setting_changes(a, b, f"{prefix}{key}.")
            out += [inner] if inner else []
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return "; ".join(out)


def remove_stale_tmp(writer: ShardedWriter, todo) -> None:
    """Delete half-written temporary files that a killed run left for this process's pending shards."""
    for shard in todo:
        name = writer.shard_path(shard.index).name
        for tmp in writer.out_dir.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def refuse_empty(manifest: dict, writer: ShardedWriter, source: str, unit: str) -> None:
    """A run whose input gave no row at all is an error, not an empty dataset: the shards and the manifest are
    removed again (so a fixed input can be written to the same --output) and the skip reasons are named."""
    if manifest["num_rows"]:
        return
    reasons: dict[str, int] = {}
    for s in manifest.get("skipped", []):
        reasons[s.get("reason", "?")] = reasons.get(s.get("reason", "?"), 0) + 1
    top = "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3]) or "nothing was skipped"
    for shard in writer.plan(manifest["num_items"]):
        writer.shard_path(shard.index).unlink(missing_ok=True)
    (writer.out_dir / MANIFEST).unlink(missing_ok=True)
    if writer.out_dir.is_dir() and not any(writer.out_dir.iterdir()):
        writer.out_dir.rmdir()
    raise DatasetError(f"{source}: not one of its {manifest['num_items']} {unit} gave a row ({top}); nothing was "
                       f"written to {writer.out_dir}")
