"""A masks dataset as training examples: pixels, token ids, per-word masks and token positions.

What the text side is (the tokenizers, which positions a phrase supervises) is the model family's: the
functions here take a model's :class:`tcompose.models.families.Components` as ``text``.

Randomness is a pure function of (seed, global example number): the order of the examples in epoch ``e``
is a permutation drawn from ``seed + e``, and each example's diffusion noise, timestep and VAE sample come
from a generator seeded with its global number. So a run resumed at step ``s`` sees exactly the batches an
uninterrupted run would, and an example's noise does not depend on the batch size or on which process
draws it. Images and masks are placed as the original implementation placed them (:mod:`.geometry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from ..io.errors import UserError
from ..io.datasets import RowReader, check_columns, decode_mask, load_manifest
from .geometry import load_mask, load_pixels, resize_crop


@dataclass
class PreparedRows:
    """A masks dataset with each supervised word's token positions resolved; images stay on disk."""

    reader: RowReader  # image and masks of a row, read when an example is built
    token_ids: dict[str, torch.Tensor]  # batch key -> [N, L]: "input_ids" (SDXL: also "input_ids_2"; SD3 "_3")
    words: list[list[list[int]]]  # per row, per supervised word: token positions
    mask_slots: list[list[int]]  # per row, per supervised word: its index in the row's masks
    image_ids: list[int]
    stats: dict[str, int] = field(default_factory=dict)
    dropped: list[dict] = field(default_factory=list)  # phrases left out, with reasons
    data_dir: Path | None = None  # the masks dataset folder

    def __len__(self) -> int:
        return len(self.image_ids)


def prepare_rows(data_dir: str | Path, text) -> PreparedRows:
    """Read a masks dataset's captions and phrases and resolve each phrase to caption token positions.

    ``text``: the model's components; ``text.tokenize(captions)`` gives every text encoder's ids and
    ``text.phrase_positions(caption, phrases)`` the positions each phrase supervises (SDXL checks there that
    one set of positions serves both of its tokenizers).

    Phrases without a mask, or whose words cannot be found among the caption's tokens (e.g. truncated),
    are left out of the supervision and counted; the row still trains the denoising loss. Reads shard by
    shard; images are not kept in memory.
    """
    load_manifest(data_dir)  # a clear error if the stage that wrote it did not finish
    stats = {"rows": 0, "phrases": 0, "words_supervised": 0, "phrase_no_mask": 0, "phrase_not_in_tokens": 0}
    dropped, captions, image_ids, words, slots = [], [], [], [], []
    for f in check_columns(data_dir, "masks"):
        for r in pq.read_table(f, columns=["image_id", "caption", "phrases", "masks"]).to_pylist():
            stats["rows"] += 1
            ws, ss = [], []
            # every phrase of the row claims its tokens (longest first), so "dog" never lands inside "hot dog"
            located = text.phrase_positions(r["caption"], r["phrases"])
            for slot, (phrase, mask, pos) in enumerate(zip(r["phrases"], r["masks"], located)):
                stats["phrases"] += 1
                if mask is None or mask.get("bytes") is None:
                    stats["phrase_no_mask"] += 1
                    continue
                if pos is None:
                    stats["phrase_not_in_tokens"] += 1
                    dropped.append({"image_id": r["image_id"], "caption": r["caption"], "phrase": phrase, "reason": "not in tokens"})
                    continue
                ws.append(pos)
                ss.append(slot)
            stats["words_supervised"] += len(ws)
            captions.append(r["caption"])
            image_ids.append(r["image_id"])
            words.append(ws)
            slots.append(ss)
    return PreparedRows(
        reader=RowReader(data_dir, ["image", "masks"]),
        token_ids=text.tokenize(captions),
        words=words,
        mask_slots=slots,
        image_ids=image_ids,
        stats=stats,
        dropped=dropped,
        data_dir=Path(data_dir),
    )


def split_heldout(prep: PreparedRows, fraction: float, seed: int, max_examples: int | None = None) -> tuple[list[int], list[int]]:
    """Train and held-out row indices; all captions of one image fall on the same side."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"--eval-fraction must be in [0, 1), got {fraction}")
    ids = sorted(set(prep.image_ids))
    n_eval = math.ceil(fraction * len(ids)) if fraction > 0 else 0
    if n_eval >= len(ids):
        n_eval = len(ids) - 1
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    heldout_ids = {ids[i] for i in perm[:n_eval]}
    train = [i for i, iid in enumerate(prep.image_ids) if iid not in heldout_ids]
    heldout = [i for i, iid in enumerate(prep.image_ids) if iid in heldout_ids and prep.words[i]]
    if max_examples is not None:
        heldout = heldout[:max_examples]
    return train, heldout


def check_batch_fits(data_dir: str | Path, fraction: float, seed: int, per_process: int, world_size: int) -> None:
    """Refuse, from the dataset's ``image_id`` column alone (before any model loads), a global micro-batch
    (``--batch-size`` x processes) larger than the training rows that :func:`split_heldout` leaves."""
    ids = [i for f in check_columns(data_dir, "masks") for i in pq.read_table(f, columns=["image_id"])["image_id"].to_pylist()]
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"--eval-fraction must be in [0, 1), got {fraction}")
    images = sorted(set(ids))  # as split_heldout splits them
    held = min(math.ceil(fraction * len(images)) if fraction > 0 else 0, max(len(images) - 1, 0))
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()
    heldout = {images[i] for i in perm[:held]}
    train = sum(1 for i in ids if i not in heldout)
    need = per_process * world_size
    if train < need:
        procs = f" x {world_size} processes" if world_size > 1 else ""
        raise UserError(
            f"--batch-size {per_process}{procs}: {data_dir} has {train} training examples ({len(ids)} rows, the "
            f"captions of {held} of its {len(images)} images held out by --eval-fraction {fraction:g}), too few "
            f"for one batch of {need}; lower --batch-size (or --eval-fraction), or add data"
        )


class TrainingExamples(Dataset):
    """Indexed by ``(row, global_example_number)``; returns one example with its own noise and timestep.

    With ``latents`` (a :class:`tcompose.train.latent_cache.LatentCache`) an example carries the VAE's cached
    ``latent_moments`` ``[2, C, h, w]`` (mean, std of the chosen orientation) instead of ``pixel_values``;
    its image is then not read at all (only its masks), and everything random stays the same. With ``text`` (a
    :class:`tcompose.train.text_cache.TextCache`) it carries its caption's cached states (``text_state.NAME``)
    instead of its token ids.
    ``draw_timestep(generator)``: the training objective's timestep draw (``objective.draw_timestep`` bound to the
    training scheduler, e.g. flow matching's density sampling); None: uniform over ``num_train_timesteps`` (what
    the UNets' objective draws). ``noise_offset`` (diffusers' ``--noise_offset``) adds ``offset * randn(C, 1, 1)`` to the example's noise, drawn
    from its generator after everything else; 0 leaves the noise exactly as without it.
    """

    def __init__(self, prep: PreparedRows, resolution: int, latent_shape: tuple[int, int, int], num_train_timesteps: int, seed: int, random_flip: bool = False, latents=None, noise_offset: float = 0.0,
                 draw_timestep: Callable[[torch.Generator], torch.Tensor] | None = None, text=None):
        self.prep = prep
        self.text = text
        self.draw_timestep = draw_timestep
        self.noise_offset = noise_offset
        self.resolution = resolution
        self.latent_shape = latent_shape
        self.num_train_timesteps = num_train_timesteps
        self.seed = seed
        self.random_flip = random_flip
        self.latents = latents
        if latents is not None and random_flip and not latents.flipped:
            raise ValueError("random_flip needs a latent cache with both orientations")
        self.masks_reader = RowReader(prep.data_dir, ["masks"]) if latents is not None else None

    def __len__(self) -> int:
        return len(self.prep)

    def generator(self, number: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + number) % (2**63))

    def __getitem__(self, key: tuple[int, int]) -> dict:
        row, number = key
        g = self.generator(number)
        noise = torch.randn(self.latent_shape, generator=g)
        latent_eps = torch.randn(self.latent_shape, generator=g)
        if self.draw_timestep is None:
            timestep = torch.randint(0, self.num_train_timesteps, (), generator=g)
        else:  # the objective's draw (flow matching: density sampling), from the same generator at the same point
            timestep = self.draw_timestep(g)
        flip = self.random_flip and bool(torch.rand((), generator=g) < 0.5)
        if self.noise_offset:  # diffusers' --noise_offset, drawn last: everything else stays as without it
            noise = noise + self.noise_offset * torch.randn((self.latent_shape[0], 1, 1), generator=g)

        r = self.resolution
        if self.latents is None:
            record = self.prep.reader[row]
            pixels, placement = load_pixels(record["image"]["bytes"], r, flip)
            image = {"pixel_values": pixels}
        else:
            record = self.masks_reader[row]
            placement = resize_crop(*self.latents.image_size(row), r)
            image = {"latent_moments": self.latents.moments(row, flip)}
        masks = [load_mask(decode_mask(record["masks"][slot]), placement, flip) for slot in self.prep.mask_slots[row]]
        (w, h), r = placement.original, placement.size
        text = self.text.states(row) if self.text is not None else {
            key: ids[row] for key, ids in self.prep.token_ids.items()}
        return {
            **image,
            **text,
            # SDXL's micro-conditioning: original (h, w), the crop's top-left in the resized image, target (h, w)
            "time_ids": torch.tensor([h, w, placement.top, placement.left, r, r], dtype=torch.float32),
            "masks": torch.stack(masks) if masks else torch.zeros(0, r, r),
            "words": self.prep.words[row],
            "noise": noise,
            "latent_eps": latent_eps,
            "timestep": timestep,
        }


def collate(examples: list[dict]) -> dict:
    """Stack examples (``pixel_values`` or cached ``latent_moments``; token ids or cached caption states); words are
    padded to ``[B, W, K]`` (see :func:`tcompose.grounding.losses.pad_words`)."""
    from ..grounding.losses import pad_words
    from ..models.families import TEXT_STATE

    index, valid = pad_words([e["words"] for e in examples])
    b, w = index.shape[:2]
    r = examples[0]["masks"].shape[-1]
    masks = torch.zeros(b, w, r, r)
    for i, e in enumerate(examples):
        masks[i, : e["masks"].shape[0]] = e["masks"]
    image = "latent_moments" if "latent_moments" in examples[0] else "pixel_values"
    text = {k: torch.stack([e[k] for e in examples]) for k in examples[0] if k.startswith(("input_ids", TEXT_STATE))}
    return {
        image: torch.stack([e[image] for e in examples]),
        **text,
        "time_ids": torch.stack([e["time_ids"] for e in examples]),
        "masks": masks,
        "word_index": index,
        "word_valid": valid,
        "noise": torch.stack([e["noise"] for e in examples]),
        "latent_eps": torch.stack([e["latent_eps"] for e in examples]),
        "timesteps": torch.stack([e["timestep"] for e in examples]),
    }


