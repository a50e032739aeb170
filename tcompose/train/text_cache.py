"""Cached text-encoder states for ``tcompose train-unet --cache-text``: the frozen text encoders encode each caption
once, then are freed for the rest of the run.

Runbook::

    tcompose train-unet --data data/coco-gt --model black-forest-labs/FLUX.1-dev --lora-rank 16 ...  # on by default
    tcompose train-unet ... --cache-text            # SD1.x / SD2.x / SDXL: off by default (their encoders are small)
    tcompose train-unet ... --no-cache-text         # keep the encoders, encode every batch, use no disk
    # a kill while building: run again; finished shards are kept. Other data, tokenizers, --max-sequence-length,
    # text encoders or precision: the cache no longer matches, is said so, and is rebuilt.

What is cached: for every distinct caption of the masks dataset (rows whose token ids are equal share one entry;
held-out rows are included, so the cache does not depend on the split) the family's caption states
(:meth:`tcompose.models.families.ModelFamily.caption_states`): SD1.x / SD2.x ``encoder_hidden_states``; SDXL also
the pooled ``text_embeds``; SD3 ``encoder_hidden_states`` ``[77 + L, 4096]`` and ``pooled_projections``; FLUX.1
T5's states ``[L, 4096]`` and CLIP's pooled output. They are stored in the dtype the encoders run in (the
training's ``--mixed-precision``). An example then carries them as ``text_state.NAME`` batch keys and the family's
``encode_text`` takes them instead of running the encoders: the very numbers an uncached step computes, up to how
the encoders' kernels round for another batch composition (the cache encodes 16 captions at a time).

Size per caption in bf16: SD1.x 77 x 768, 118 KB; SDXL 77 x 2048 and a pooled 1280, 318 KB; SD3.5 (L = 256)
333 x 4096, 2.7 MB; FLUX.1 (L = 512) 512 x 4096, 4.2 MB. ``--max-sequence-length`` shortens T5's part (a longer
caption is cut there, as the pipelines cut it). Every process refuses to start when the cache (and room to write
one more shard) would not fit on OUT's disk, naming the ways out.

What freeing gives back (weights in bf16): FLUX.1's T5-XXL 9.5 GB and CLIP-L 0.25 GB; SD3's T5-XXL 9.5 GB, CLIP-L
0.25 GB and OpenCLIP bigG 1.4 GB. Validation prompts (and the empty prompt, for guidance) are encoded before the
encoders go, so validation grids need no encoder either.

Layout of ``OUT/text_cache/`` (:mod:`.shard_cache`): ``shard-00000.safetensors``, ... (one tensor per state,
``[n, ...]``; 256 captions a shard) and ``cache.json``. Fingerprint: the token ids of every entry (sha256: they
hold the captions, the tokenizers and ``--max-sequence-length``), the family, and each text encoder's class,
config and weights (sha256 of the weights as used, in their dtype).
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
from pathlib import Path

import torch

from ..io.errors import UserError
from ..models.families import TEXT_STATE
from .shard_cache import ShardCache, build_cache, entries_of, sha256_hex, shard_name, weights_sha256

__all__ = ["TextCache", "prepare_text_cache", "free_text_encoders", "caption_bytes", "check_disk_room"]

CACHE_VERSION = 1
SHARD_ENTRIES = 256  # captions per shard file
ENCODE_BATCH = 16  # captions per encoder call while building
ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # Components' (and the pipelines') names
#: Config keys that say how a model was read, not what it computes (the weights' hash and dtype pin the numbers).
UNFINGERPRINTED = ("torch_dtype", "dtype", "transformers_version")


def _entry_keys(token_ids: dict[str, torch.Tensor]) -> list[bytes]:
    """One key per row: the bytes of all its token ids (rows with equal keys share a cache entry)."""
    rows = torch.cat([ids.to(torch.int64) for _, ids in sorted(token_ids.items())], dim=1)
    return [r.numpy().tobytes() for r in rows]


def fingerprint(prep, comps, keys: list[bytes]) -> dict:
    """What the cached states depend on (see the module docstring)."""
    ids = hashlib.sha256()
    for key in keys:
        ids.update(key)
    encoders = {}
    for name in ENCODERS:
        enc = getattr(comps, name)
        if enc is not None:  # the config without where it was read from, in which dtype, by which version
            config = json.dumps({k: v for k, v in enc.config.to_dict().items() if k not in UNFINGERPRINTED
                                 and not k.startswith("_")}, sort_keys=True, default=str)
            encoders[name] = {"class": type(enc).__name__, "config_sha256": sha256_hex(config.encode()),
                              "weights_sha256": weights_sha256(enc), "dtype": str(enc.dtype).removeprefix("torch.")}
    return {"version": CACHE_VERSION, "family": comps.family.name, "token_ids_sha256": ids.hexdigest(),
            "keys": sorted(prep.token_ids), "encoders": encoders}


class TextCache(ShardCache):
    """Read access to a finished cache: ``states(row)``, the row's caption states as ``text_state.NAME`` batch keys."""

    def __init__(self, root: str | Path):
        super().__init__(root)
        self.names: list[str] = self.index["names"]

    def states(self, row: int) -> dict[str, torch.Tensor]:
        return {TEXT_STATE + name: self.tensor(name, row) for name in self.names}


def caption_bytes(comps, prep) -> int:
    """Bytes the cache stores per caption: the caption states of the first row, as the encoders make them."""
    device = next(comps.text_encoders[0].parameters()).device
    states = comps.family.encode_captions(comps, {k: v[:1].to(device) for k, v in prep.token_ids.items()})
    return sum(t.numel() * t.element_size() for t in states.values())


def check_disk_room(root: Path, n: int, per_caption: int, family) -> None:
    """Refuse a cache of ``n`` captions that would not fit on ``root``'s disk, with one shard's room to write the
    next (what the cache already holds counts as free)."""
    root.mkdir(parents=True, exist_ok=True)
    need = per_caption * (n + min(n, SHARD_ENTRIES))
    have = shutil.disk_usage(root).free + sum(f.stat().st_size for f in root.glob("shard-*.safetensors"))
    if need > have:
        shorter = ("" if "--max-sequence-length" in family.unsupported_training
                   else ", or a shorter --max-sequence-length")
        raise UserError(f"--cache-text: {n} captions x {per_caption / 1e6:.2f} MB = {n * per_caption / 1e9:.1f} GB, more "
                        f"than the {have / 1e9:.1f} GB free under {root}; pass --no-cache-text (the text encoders then "
                        f"stay on the device){shorter}")


def prepare_text_cache(root: str | Path, prep, comps, rank: int = 0, world_size: int = 1, barrier=None,
                       progress: bool = True, log=print, batch_size: int = ENCODE_BATCH,
                       shard_entries: int = SHARD_ENTRIES) -> TextCache:
    """Reuse the cache under ``root`` if it matches (see the module docstring), else build it with ``comps``'s text
    encoders (on their device, in their dtype); every process calls this (``barrier``: e.g.
    ``accelerator.wait_for_everyone``) and gets the same :class:`TextCache`. ``prep``:
    :class:`tcompose.train.examples.PreparedRows` (its ``token_ids``)."""
    root = Path(root)
    keys = _entry_keys(prep.token_ids)
    entry_of_row, entry_rows = entries_of(keys)
    per_caption = caption_bytes(comps, prep)
    check_disk_room(root, len(entry_rows), per_caption, comps.family)  # every process: all refuse alike
    device = next(comps.text_encoders[0].parameters()).device

    @torch.no_grad()
    def encode(rows: list[int], batches: list[list[int]]):
        for batch in batches:
            picked = torch.tensor([rows[i] for i in batch])
            ids = {k: v[picked].to(device) for k, v in prep.token_ids.items()}
            states = comps.family.encode_captions(comps, ids)
            yield {name: t.cpu() for name, t in states.items()}

    def index_extra(root: Path, n_shards: int) -> dict:
        from safetensors import safe_open

        with safe_open(str(root / shard_name(0)), framework="pt") as f:
            return {"names": sorted(f.keys()), "bytes_per_caption": per_caption}

    root = build_cache(root, fingerprint(prep, comps, keys), entry_of_row, entry_rows, encode, what="text cache",
                       unit="captions", probe="encoder_hidden_states", rank=rank, world_size=world_size,
                       barrier=barrier, progress=progress, log=log, batch_size=batch_size,
                       shard_entries=shard_entries, index_extra=index_extra)
    return TextCache(root)


def free_text_encoders(comps, *pipes) -> int:
    """Drop every reference train-unet holds to the text encoders (``comps``'s, and the pipelines' built around them),
    collect them and empty the CUDA cache; returns the bytes of their weights. The tokenizers stay."""
    freed = sum(p.numel() * p.element_size() for enc in comps.text_encoders for p in enc.parameters())
    for name in ENCODERS:
        setattr(comps, name, None)
    for pipe in pipes:
        if pipe is not None:
            pipe.register_modules(**{name: None for name in ENCODERS if name in pipe.components})
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return freed
