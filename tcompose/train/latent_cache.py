"""Cached VAE latents for ``tcompose train-unet --cache-latents``: the frozen VAE encodes each image once.

Runbook::

    tcompose train-unet --data data/coco-gt --output runs/tc --cache-latents ...   # builds OUT/latent_cache/
    tcompose train-unet ... --cache-latents --resume latest                      # reuses it
    # a kill while building: run again; finished shards are kept. Other data, VAE, resolution, precision or
    # --random-flip: the cache no longer matches, is said so, and is rebuilt.

What is cached: for every image of the masks dataset (rows are deduplicated by ``image_id``, so the captions
of one image share one entry; held-out rows are included, so the cache does not depend on the split) the
parameters of the VAE's latent distribution, ``mean`` and ``std`` (``DiagonalGaussianDistribution``: std =
exp(logvar / 2)), of the resized, center-cropped image (:func:`tcompose.train.geometry.load_pixels`). With
``--random-flip`` both orientations are cached (the flipped image is encoded; the VAE is not flip-equivariant).
Training then samples ``latents = (mean + std * eps) * scaling_factor`` with each example's own ``eps``, as
without the cache (the model family's ``encode_batch``: :func:`tcompose.models.families.sd.vae_latents`).

Precision: the moments are stored in the dtype the VAE runs in, which is the training's ``--mixed-precision``
(float32 with ``no``, bfloat16 with ``bf16``, float16 with ``fp16``; train-unet casts the frozen VAE to it).
They are the very numbers an uncached step computes, so a cached run matches an uncached one up to how the
VAE's kernels round for a different batch composition (the cache encodes 16 images at a time). Size per
image at 512 px: 4 x 64 x 64 x 2 values, 128 KiB in float32, 64 KiB in bf16 (x2 with --random-flip).

Layout of ``OUT/latent_cache/``: ``shard-00000.safetensors``, ... (``moments`` ``[n, orientations, 2, C, h, w]``
and ``sizes`` ``[n, 2]``, the original image's width and height, which the masks' crop needs; 256 images a
shard; written to a temporary name then renamed) and ``cache.json`` (the fingerprint, the row -> entry map,
written last: a cache without it is unfinished). Fingerprint: the dataset's manifest (sha256) and shard files
(name, size, mtime), the VAE's config and encoder weights (sha256 of the weights as used, in their dtype),
the geometry's version, the resolution, the dtype and the orientations. Several processes each build every ``world_size``-th shard,
then the main process writes ``cache.json``; OUT must be on storage every process sees (as for checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from ..io.datasets import MANIFEST, RowReader, shard_files, write_json_atomic
from ..io.files import match_umask
from .geometry import GEOMETRY_VERSION, load_pixels

CACHE_VERSION = 1
INDEX = "cache.json"
SHARD_ENTRIES = 256  # images per shard file
ENCODE_BATCH = 16  # images per VAE call while building


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


# ------------------------------------------------------------------------------------------------ fingerprint


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def vae_weights_sha256(vae) -> str:
    """sha256 over the names and bytes of the VAE's encoder weights (``encoder.*``, ``quant_conv.*``), as used."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def fingerprint(data_dir: str | Path, vae, resolution: int, flipped: bool) -> dict:
    """What the cached moments depend on (see the module docstring)."""
    data_dir = Path(data_dir)
    files = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in shard_files(data_dir)]
    config = json.dumps({k: v for k, v in dict(vae.config).items() if not k.startswith("_")}, sort_keys=True, default=str)
    return {
        "version": CACHE_VERSION,
        "geometry": GEOMETRY_VERSION,  # how images are resized and cropped (tcompose.train.geometry)
        "data": {"manifest_sha256": _sha256((data_dir / MANIFEST).read_bytes()), "shards": files},
        "vae": {"config_sha256": _sha256(config.encode()), "encoder_weights_sha256": vae_weights_sha256(vae)},
        "resolution": resolution,
        "dtype": str(vae.dtype).removeprefix("torch."),
        "orientations": 2 if flipped else 1,
    }


def _digest(fp: dict) -> str:
    return _sha256(json.dumps(fp, sort_keys=True).encode())


def _differences(old: dict, new: dict) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)] or ["?"]


def entries_of(image_ids: list[int]) -> tuple[list[int], list[int]]:
    """Deduplicate rows by image: ``(entry of each row, first row of each entry)``, entries in row order."""
    first: dict[int, int] = {}
    entry_of_row, entry_rows = [], []
    for row, iid in enumerate(image_ids):
        if iid not in first:
            first[iid] = len(entry_rows)
            entry_rows.append(row)
        entry_of_row.append(first[iid])
    return entry_of_row, entry_rows


# ------------------------------------------------------------------------------------------------------ read


class LatentCache:
    """Read access to a finished cache: ``moments(row, flip) -> [2, C, h, w]`` (mean, std) and
    ``image_size(row) -> (width, height)``. Shards are memory-mapped and sliced per example; the object
    pickles to DataLoader workers as paths (each worker opens the files itself)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index = json.loads((self.root / INDEX).read_text())
        self.entry_of_row: list[int] = index["entry_of_row"]
        self.sizes: list[list[int]] = index["sizes"]
        self.shard_entries: int = index["shard_entries"]
        self.flipped: bool = index["fingerprint"]["orientations"] == 2
        self.dtype: str = index["fingerprint"]["dtype"]
        self.latent_shape: list[int] = index["latent_shape"]
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.sizes)

    def _shard(self, k: int):
        if k not in self._handles:
            from safetensors import safe_open

            self._handles[k] = safe_open(str(self.root / shard_name(k)), framework="pt")
        return self._handles[k]

    def moments(self, row: int, flip: bool = False) -> torch.Tensor:
        if flip and not self.flipped:
            raise ValueError(f"{self.root}: cached without --random-flip; no flipped moments")
        k, i = divmod(self.entry_of_row[row], self.shard_entries)
        return self._shard(k).get_slice("moments")[i, int(flip)]

    def image_size(self, row: int) -> tuple[int, int]:
        w, h = self.sizes[self.entry_of_row[row]]
        return w, h

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}


# ----------------------------------------------------------------------------------------------------- build


class _EntryImages(torch.utils.data.Dataset):
    """The VAE input of cache entries: ``[orientations, 3, R, R]`` pixels and the original (width, height)."""

    def __init__(self, data_dir: Path, rows: list[int], resolution: int, flipped: bool):
        self.reader = RowReader(data_dir, ["image"])
        self.rows, self.resolution, self.flipped = rows, resolution, flipped

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        pixels, placement = load_pixels(self.reader[self.rows[i]]["image"]["bytes"], self.resolution)
        # flipping after the resize only reorders pixels: equal to load_pixels(..., flip=True)
        pixels = torch.stack([pixels, pixels.flip(-1)]) if self.flipped else pixels.unsqueeze(0)
        return pixels, torch.tensor(placement.original)


def _shard_done(path: Path, digest: str, n: int) -> bool:
    if not path.exists():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint") == digest and f.get_slice("sizes").get_shape()[0] == n
    except Exception:  # noqa: BLE001 (a truncated or foreign file is simply rebuilt)
        return False


def _index_matches(root: Path, digest: str) -> dict | None:
    """The index if it exists, matches ``digest`` and every shard is there; else None."""
    path = root / INDEX
    if not path.exists():
        return None
    index = json.loads(path.read_text())
    if index.get("fingerprint_sha256") != digest:
        return None
    n_shards = -(-len(index["sizes"]) // index["shard_entries"])
    return index if all((root / shard_name(k)).exists() for k in range(n_shards)) else None


@torch.no_grad()
def _encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """``[b, O, 3, R, R]`` -> ``[b, O, 2, C, h, w]`` (mean, std) in the VAE's dtype, on the CPU."""
    b, o = pixels.shape[:2]
    device = next(vae.parameters()).device
    dist = vae.encode(pixels.flatten(0, 1).to(device, vae.dtype)).latent_dist
    moments = torch.stack([dist.mean, dist.std], dim=1)
    return moments.reshape(b, o, *moments.shape[1:]).cpu()


def prepare_latent_cache(root: str | Path, prep, vae, resolution: int, flipped: bool = False, rank: int = 0,
                         world_size: int = 1, barrier=None, progress: bool = True, log=print,
                         num_workers: int = 0, batch_size: int = ENCODE_BATCH,
                         shard_entries: int = SHARD_ENTRIES) -> LatentCache:
    """Reuse the cache under ``root`` if it matches (see the module docstring), else build it; every process
    calls this (``barrier``: e.g. ``accelerator.wait_for_everyone``) and gets the same :class:`LatentCache`.

    ``prep``: :class:`tcompose.train.examples.PreparedRows` (its ``data_dir`` and ``image_ids``); ``vae`` on
    its device and in its training dtype.
    """
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader

    root, barrier = Path(root), barrier or (lambda: None)
    fp = fingerprint(prep.data_dir, vae, resolution, flipped) | {"shard_entries": shard_entries}
    digest = _digest(fp)
    barrier()  # nobody reads the index while another process could still be writing it
    if _index_matches(root, digest) is not None:
        log(f"latent cache: reusing {root}")
        return LatentCache(root)
    barrier()
    entry_of_row, entry_rows = entries_of(prep.image_ids)
    n_shards = -(-len(entry_rows) // shard_entries)
    if rank == 0:
        old = root / INDEX
        if old.exists():
            prev = json.loads(old.read_text()).get("fingerprint", {})
            log(f"latent cache: {root} was built for other inputs (differs in: {', '.join(_differences(prev, fp))}); rebuilding")
            old.unlink()
        root.mkdir(parents=True, exist_ok=True)
        wanted = {shard_name(k) for k in range(n_shards)}
        for stale in root.glob("shard-*.safetensors"):
            if stale.name not in wanted:
                stale.unlink()
    barrier()

    def shard_rows(k: int) -> list[int]:
        return entry_rows[k * shard_entries : (k + 1) * shard_entries]

    mine = [k for k in range(rank, n_shards, world_size) if not _shard_done(root / shard_name(k), digest, len(shard_rows(k)))]
    total = sum(len(shard_rows(k)) for k in mine)
    t0 = time.perf_counter()
    if mine:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        # Batches never straddle shards and start at a shard's first image: a shard's bytes do not depend on
        # which other shards this run encodes (a resumed or multi-process build equals a fresh one).
        rows, batches = [], []
        for k in mine:
            n, start = len(shard_rows(k)), len(rows)
            batches += [list(range(start + i, start + min(i + batch_size, n))) for i in range(0, n, batch_size)]
            rows += shard_rows(k)
        loader = DataLoader(_EntryImages(prep.data_dir, rows, resolution, flipped), batch_sampler=batches,
                            num_workers=num_workers)
        done = sum(len(shard_rows(k)) for k in range(rank, n_shards, world_size)) - total
        what = "latent cache" + (f" (process {rank}'s {len(mine)} of {n_shards} shards)" if world_size > 1 else "")
        with Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), disable=not progress) as bar:
            task = bar.add_task("", total=total)
            if done:
                log(f"latent cache: {done} images already encoded, {total} to go")
            pending, moments, sizes = list(mine), [], []
            for pixels, size in loader:
                moments.append(_encode(vae, pixels))
                sizes.append(size)
                bar.update(task, advance=len(size))
                have = sum(len(s) for s in sizes)
                while pending and have >= len(shard_rows(pending[0])):
                    k = pending.pop(0)
                    n = len(shard_rows(k))
                    m, s = torch.cat(moments), torch.cat(sizes)
                    tmp = root / f".{shard_name(k)}.{os.getpid()}.tmp"
                    save_file({"moments": m[:n].contiguous(), "sizes": s[:n].contiguous()}, str(tmp),
                              metadata={"fingerprint": digest})
                    match_umask(tmp)
                    os.replace(tmp, root / shard_name(k))
                    moments, sizes = [m[n:]], [s[n:]]
                    have -= n
    barrier()
    if rank == 0:
        all_sizes: list[list[int]] = []
        from safetensors import safe_open

        latent_shape = None
        for k in range(n_shards):
            with safe_open(str(root / shard_name(k)), framework="pt") as f:
                all_sizes += f.get_tensor("sizes").tolist()
                latent_shape = f.get_slice("moments").get_shape()[3:]
        write_json_atomic(root / INDEX, {
            "fingerprint_sha256": digest, "fingerprint": fp, "shard_entries": shard_entries,
            "latent_shape": latent_shape, "sizes": all_sizes, "entry_of_row": entry_of_row,
            "image_ids": [prep.image_ids[r] for r in entry_rows],
        })
        if total:
            log(f"latent cache: encoded {total} images in {time.perf_counter() - t0:.1f} s -> {root}")
    barrier()
    return LatentCache(root)
