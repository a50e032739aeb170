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

Layout of ``OUT/latent_cache/`` (:mod:`.shard_cache`): ``shard-00000.safetensors``, ... (``moments``
``[n, orientations, 2, C, h, w]`` and ``sizes`` ``[n, 2]``, the original image's width and height, which the masks'
crop needs; 256 images a shard) and ``cache.json`` (the fingerprint, the row -> entry map, written last: a cache
without it is unfinished). Fingerprint: the dataset's manifest (sha256) and shard files
(name, size, mtime), the VAE's config and encoder weights (sha256 of the weights as used, in their dtype),
the geometry's version, the resolution, the dtype and the orientations. Several processes each build every ``world_size``-th shard,
then the main process writes ``cache.json``; OUT must be on storage every process sees (as for checkpoints).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..io.datasets import MANIFEST, RowReader, shard_files
from .geometry import GEOMETRY_VERSION, load_pixels
from .shard_cache import INDEX, ShardCache, build_cache, entries_of, sha256_hex, shard_name, weights_sha256

__all__ = ["INDEX", "LatentCache", "prepare_latent_cache", "shard_name", "fingerprint", "vae_weights_sha256"]

CACHE_VERSION = 1
SHARD_ENTRIES = 256  # images per shard file
ENCODE_BATCH = 16  # images per VAE call while building


def vae_weights_sha256(vae) -> str:
    """sha256 over the names and bytes of the VAE's encoder weights (``encoder.*``, ``quant_conv.*``), as used."""
    return weights_sha256(vae, ("encoder.", "quant_conv."))


def fingerprint(data_dir: str | Path, vae, resolution: int, flipped: bool) -> dict:
    """What the cached moments depend on (see the module docstring)."""
    data_dir = Path(data_dir)
    files = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in shard_files(data_dir)]
    config = json.dumps({k: v for k, v in dict(vae.config).items() if not k.startswith("_")}, sort_keys=True, default=str)
    return {
        "version": CACHE_VERSION,
        "geometry": GEOMETRY_VERSION,  # how images are resized and cropped (tcompose.train.geometry)
        "data": {"manifest_sha256": sha256_hex((data_dir / MANIFEST).read_bytes()), "shards": files},
        "vae": {"config_sha256": sha256_hex(config.encode()), "encoder_weights_sha256": vae_weights_sha256(vae)},
        "resolution": resolution,
        "dtype": str(vae.dtype).removeprefix("torch."),
        "orientations": 2 if flipped else 1,
    }


# ------------------------------------------------------------------------------------------------------ read


class LatentCache(ShardCache):
    """Read access to a finished cache: ``moments(row, flip) -> [2, C, h, w]`` (mean, std) and
    ``image_size(row) -> (width, height)``."""

    def __init__(self, root: str | Path):
        super().__init__(root)
        self.sizes: list[list[int]] = self.index["sizes"]
        self.flipped: bool = self.index["fingerprint"]["orientations"] == 2
        self.dtype: str = self.index["fingerprint"]["dtype"]
        self.latent_shape: list[int] = self.index["latent_shape"]

    def moments(self, row: int, flip: bool = False) -> torch.Tensor:
        if flip and not self.flipped:
            raise ValueError(f"{self.root}: cached without --random-flip; no flipped moments")
        part, i = self.entry_slice("moments", row)
        return part[i, int(flip)]

    def image_size(self, row: int) -> tuple[int, int]:
        w, h = self.sizes[self.entry_of_row[row]]
        return w, h


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


@torch.no_grad()
def _encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """``[b, O, 3, R, R]`` -> ``[b, O, 2, C, h, w]`` (mean, std) in the VAE's dtype, on the CPU."""
    b, o = pixels.shape[:2]
    device = next(vae.parameters()).device
    dist = vae.encode(pixels.flatten(0, 1).to(device, vae.dtype)).latent_dist
    moments = torch.stack([dist.mean, dist.std], dim=1)
    return moments.reshape(b, o, *moments.shape[1:]).cpu()


def _sizes_and_shape(root: Path, n_shards: int) -> dict:
    """``sizes`` of every entry and the ``latent_shape``, read back from the shards for ``cache.json``."""
    from safetensors import safe_open

    sizes, latent_shape = [], None
    for k in range(n_shards):
        with safe_open(str(root / shard_name(k)), framework="pt") as f:
            sizes += f.get_tensor("sizes").tolist()
            latent_shape = f.get_slice("moments").get_shape()[3:]
    return {"latent_shape": latent_shape, "sizes": sizes}


def prepare_latent_cache(root: str | Path, prep, vae, resolution: int, flipped: bool = False, rank: int = 0,
                         world_size: int = 1, barrier=None, progress: bool = True, log=print,
                         num_workers: int = 0, batch_size: int = ENCODE_BATCH,
                         shard_entries: int = SHARD_ENTRIES) -> LatentCache:
    """Reuse the cache under ``root`` if it matches (see the module docstring), else build it; every process
    calls this (``barrier``: e.g. ``accelerator.wait_for_everyone``) and gets the same :class:`LatentCache`.

    ``prep``: :class:`tcompose.train.examples.PreparedRows` (its ``data_dir`` and ``image_ids``); ``vae`` on
    its device and in its training dtype.
    """
    from torch.utils.data import DataLoader

    def encode(rows: list[int], batches: list[list[int]]):
        loader = DataLoader(_EntryImages(prep.data_dir, rows, resolution, flipped), batch_sampler=batches,
                            num_workers=num_workers)
        for pixels, size in loader:
            yield {"moments": _encode(vae, pixels), "sizes": size}

    entry_of_row, entry_rows = entries_of(prep.image_ids)
    root = build_cache(root, fingerprint(prep.data_dir, vae, resolution, flipped), entry_of_row, entry_rows, encode,
                       what="latent cache", unit="images", probe="sizes", rank=rank, world_size=world_size,
                       barrier=barrier, progress=progress, log=log, batch_size=batch_size,
                       shard_entries=shard_entries,
                       index_extra=lambda root, n: _sizes_and_shape(root, n)
                       | {"image_ids": [prep.image_ids[r] for r in entry_rows]})
    return LatentCache(root)
