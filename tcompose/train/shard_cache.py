"""A cache of per-entry tensors in safetensors shards, built once by one or several processes and resumed after a
kill: what ``--cache-latents`` (:mod:`.latent_cache`, VAE moments per image) and ``--cache-text``
(:mod:`.text_cache`, text-encoder states per caption) share.

Layout of a cache folder: ``shard-00000.safetensors``, ... (each tensor ``[n, ...]`` for ``n`` consecutive
entries, ``shard_entries`` a shard; written to a temporary name then renamed; the fingerprint's digest in the
file's metadata) and ``cache.json`` (the fingerprint, the row -> entry map and what the caller adds), written
last by the main process: a cache without it is unfinished. A build reuses a finished cache whose fingerprint
matches, keeps the finished shards of an unfinished one with the same fingerprint, and otherwise says what
differs and rebuilds. Several processes each build every ``world_size``-th shard; the folder must be on storage
every process sees (as for checkpoints). Batches never straddle shards and start at a shard's first entry, so a
shard's bytes do not depend on which other shards a run builds (a resumed or multi-process build equals a fresh
one).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..io.datasets import write_json_atomic
from ..io.files import match_umask

INDEX = "cache.json"

#: ``encode(rows, batches)``: the tensors of the entries whose first rows are ``rows`` (in order), one dict of
#: ``[b, ...]`` tensors per batch of positions in ``rows`` (``batches``: consecutive, in order).
Encoder = Callable[[list[int], list[list[int]]], Iterable[dict[str, torch.Tensor]]]


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest(fp: dict) -> str:
    """The sha256 of a fingerprint (a JSON-able dict)."""
    return sha256_hex(json.dumps(fp, sort_keys=True).encode())


def differences(old: dict, new: dict) -> list[str]:
    """The top-level keys on which two fingerprints differ."""
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)] or ["?"]


def weights_sha256(module: torch.nn.Module, prefixes: tuple[str, ...] | None = None) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a module's weights as used (those starting with one of
    ``prefixes``; all when None)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if prefixes is None or name.startswith(prefixes):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def entries_of(keys: list) -> tuple[list[int], list[int]]:
    """Deduplicate rows by a key (an image id, a caption's token ids): ``(entry of each row, first row of each
    entry)``, entries in row order."""
    first: dict = {}
    entry_of_row, entry_rows = [], []
    for row, key in enumerate(keys):
        if key not in first:
            first[key] = len(entry_rows)
            entry_rows.append(row)
        entry_of_row.append(first[key])
    return entry_of_row, entry_rows


def entry_count(index: dict) -> int:
    """The entries of a cache's index (an index of tcompose before shard_cache.py, a latent cache's, has ``sizes``)."""
    return index["entries"] if "entries" in index else len(index["sizes"])


class ShardCache:
    """Read access to a finished cache: ``tensor(name, row)`` is row ``row``'s entry of tensor ``name``. Shards are
    memory-mapped and sliced per read; the object pickles to DataLoader workers as paths (each worker opens the
    files itself)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.index = json.loads((self.root / INDEX).read_text())
        self.entry_of_row: list[int] = self.index["entry_of_row"]
        self.shard_entries: int = self.index["shard_entries"]
        self.entries: int = entry_count(self.index)
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return self.entries

    def _shard(self, k: int):
        if k not in self._handles:
            from safetensors import safe_open

            self._handles[k] = safe_open(str(self.root / shard_name(k)), framework="pt")
        return self._handles[k]

    def entry_slice(self, name: str, row: int):
        """``(slice of tensor name in the row's shard, index in it)``: index the slice to read."""
        k, i = divmod(self.entry_of_row[row], self.shard_entries)
        return self._shard(k).get_slice(name), i

    def tensor(self, name: str, row: int) -> torch.Tensor:
        part, i = self.entry_slice(name, row)
        return part[i]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}


def _shard_done(path: Path, fp_digest: str, n: int, probe: str) -> bool:
    if not path.exists():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint") == fp_digest and f.get_slice(probe).get_shape()[0] == n
    except Exception:  # noqa: BLE001 (a truncated or foreign file is simply rebuilt)
        return False


def _index_matches(root: Path, fp_digest: str) -> bool:
    """Whether the index exists, matches the digest and every shard is there."""
    path = root / INDEX
    if not path.exists():
        return False
    index = json.loads(path.read_text())
    if index.get("fingerprint_sha256") != fp_digest:
        return False
    n_shards = -(-entry_count(index) // index["shard_entries"])
    return all((root / shard_name(k)).exists() for k in range(n_shards))


def _batches(mine: list[int], shard_rows: Callable[[int], list[int]], batch_size: int) -> tuple[list[int], list[list[int]]]:
    """The entries of shards ``mine`` in order, and batches of positions in that list that start at each shard's
    first entry and never straddle two shards."""
    entries, batches = [], []
    for k in mine:
        n, start = len(shard_rows(k)), len(entries)
        batches += [list(range(start + i, start + min(i + batch_size, n))) for i in range(0, n, batch_size)]
        entries += shard_rows(k)
    return entries, batches


def _write_shards(root: Path, mine: list[int], sizes: list[int], encoded: Iterator[dict[str, torch.Tensor]],
                  fp_digest: str, advance: Callable[[int], None]) -> None:
    """Concatenate the encoded batches and write each shard of ``mine`` (``sizes[i]`` entries) as it fills."""
    from safetensors.torch import save_file

    pending, parts, have = list(zip(mine, sizes)), [], 0
    for out in encoded:
        parts.append(out)
        n_batch = len(next(iter(out.values())))
        have += n_batch
        advance(n_batch)
        while pending and have >= pending[0][1]:
            k, n = pending.pop(0)
            full = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
            tmp = root / f".{shard_name(k)}.{os.getpid()}.tmp"
            save_file({name: t[:n].contiguous() for name, t in full.items()}, str(tmp), metadata={"fingerprint": fp_digest})
            match_umask(tmp)
            os.replace(tmp, root / shard_name(k))
            parts, have = [{name: t[n:] for name, t in full.items()}], have - n


def build_cache(root: str | Path, fp: dict, entry_of_row: list[int], entry_rows: list[int], encode: Encoder, *,
                what: str, unit: str, probe: str, rank: int = 0, world_size: int = 1, barrier=None,
                progress: bool = True, log=print, batch_size: int = 16, shard_entries: int = 256,
                index_extra: Callable[[Path, int], dict] | None = None) -> Path:
    """Reuse the cache under ``root`` if its fingerprint is ``fp``, else build it (see the module docstring); every
    process calls this (``barrier``: e.g. ``accelerator.wait_for_everyone``) and gets the finished folder.

    ``entry_rows``: the first row of each entry (:func:`entries_of`); ``encode``: the tensors of entries
    (:data:`Encoder`); ``what`` names the cache in messages, ``unit`` its entries ("images", "captions");
    ``probe``: a tensor name whose first dimension counts a shard's entries; ``index_extra(root, n_shards)``: more
    keys for ``cache.json``, computed by the main process once every shard is written.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    root, barrier = Path(root), barrier or (lambda: None)
    fp = fp | {"shard_entries": shard_entries}
    fp_digest = digest(fp)
    barrier()  # nobody reads the index while another process could still be writing it
    if _index_matches(root, fp_digest):
        log(f"{what}: reusing {root}")
        return root
    barrier()
    n_shards = -(-len(entry_rows) // shard_entries)
    if rank == 0:
        old = root / INDEX
        if old.exists():
            prev = json.loads(old.read_text()).get("fingerprint", {})
            log(f"{what}: {root} was built for other inputs (differs in: {', '.join(differences(prev, fp))}); rebuilding")
            old.unlink()
        root.mkdir(parents=True, exist_ok=True)
        wanted = {shard_name(k) for k in range(n_shards)}
        for stale in root.glob("shard-*.safetensors"):
            if stale.name not in wanted:
                stale.unlink()
        for orphan in root.glob(".shard-*.tmp"):  # a write a kill interrupted (every process waits below)
            orphan.unlink()
    barrier()

    def shard_rows(k: int) -> list[int]:
        return entry_rows[k * shard_entries : (k + 1) * shard_entries]

    ours = range(rank, n_shards, world_size)
    mine = [k for k in ours if not _shard_done(root / shard_name(k), fp_digest, len(shard_rows(k)), probe)]
    total = sum(len(shard_rows(k)) for k in mine)
    t0 = time.perf_counter()
    if mine:
        rows, batches = _batches(mine, shard_rows, batch_size)
        done = sum(len(shard_rows(k)) for k in ours) - total
        label = what + (f" (process {rank}'s {len(mine)} of {n_shards} shards)" if world_size > 1 else "")
        with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), disable=not progress) as bar:
            task = bar.add_task("", total=total)
            if done:
                log(f"{what}: {done} {unit} already encoded, {total} to go")
            _write_shards(root, mine, [len(shard_rows(k)) for k in mine], iter(encode(rows, batches)), fp_digest,
                          lambda n: bar.update(task, advance=n))
    barrier()
    if rank == 0:
        write_json_atomic(root / INDEX, {
            "fingerprint_sha256": fp_digest, "fingerprint": fp, "shard_entries": shard_entries,
            "entries": len(entry_rows), "entry_of_row": entry_of_row,
            **(index_extra(root, n_shards) if index_extra else {}),
        })
        if total:
            log(f"{what}: encoded {total} {unit} in {time.perf_counter() - t0:.1f} s -> {root}")
    barrier()
    return root
