"""Feeding the masks stage: images read, checked, decoded and preprocessed in DataLoader worker processes.

Each image becomes an :class:`Item` in a worker: its captions (whitespace collapsed, empty ones dropped), its
JPEG bytes (kept unchanged for the row), the source prep's ``parse`` of the captions, or the reason it is
skipped (no captions; no instance annotations, for a source that needs them; a file that does not decode or
has another size than annotated). The batch's collate function (also in the worker) decodes nothing again:
it hands the decoded PIL images to the source prep's ``preprocess`` (and to CLIP's image processor for
``--captions clip-best``) and drops them, so only bytes and tensors cross to the main process.

Batches never straddle a shard: :func:`plan_batches` cuts each shard's images (grouped by size) into runs of
``batch_size``, so a batch holds the same images whether a run is fresh, resumed or split over processes.
:func:`select_ids` applies ``--image-ids FILE`` and ``--limit`` to the split's ids.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..data.coco import CocoDataset, CocoImage, ImageReadError
from ..io.errors import UserError
from ..io.datasets import Shard


@dataclass
class Item:
    """One image as the main process receives it; ``skip`` = (stats key, reason) when it gets no rows."""

    pos: int
    image: CocoImage
    captions: list[str]
    data: bytes | None = None
    skip: tuple[str, str] | None = None
    parsed: Any = None
    pil: Any = None  # the decoded image, only between the dataset and the collate function


@dataclass
class Batch:
    """A batch of items; ``inputs`` (source model inputs) and ``clip`` (CLIP pixels) hold a row per ``ok`` item."""

    items: list[Item]
    ok: list[int]
    inputs: dict = field(default_factory=dict)
    clip: torch.Tensor | None = None

    def pin_memory(self) -> "Batch":
        self.inputs = _map_tensors(self.inputs, lambda t: t.pin_memory())
        self.clip = self.clip.pin_memory() if self.clip is not None else None
        return self


def _map_tensors(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def read_image_ids(path: str | Path) -> list[int]:
    """The ids of an ``--image-ids`` file: one integer per line; blank lines and ``#`` comments ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the --image-ids file ({e})") from None
    ids = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            ids.append(int(line))
        except ValueError:
            raise UserError(f"{path}:{n}: {line!r} is not an image id (one integer per line)") from None
    if not ids:
        raise UserError(f"{path}: no image ids in the --image-ids file (one integer per line)")
    return ids


def select_ids(coco: CocoDataset, image_ids: str | Path | None, limit: int | None) -> tuple[Sequence[int], str | None]:
    """(ids, digest): the split's ids in image-id order, only those of the ``image_ids`` file if given, then the
    first ``limit``; ``digest`` names the file's id set (it decides the rows), None without a file."""
    ids, digest = coco.ids, None  # a range for a captioned set: millions of rows are not listed
    if image_ids is not None:
        wanted = set(read_image_ids(image_ids))
        listed = ids if isinstance(ids, range) else set(ids)
        unknown = sorted(i for i in wanted if i not in listed)
        if unknown:
            raise UserError(f"{image_ids}: {len(unknown)} image id(s) are not in {coco.root} split {coco.split} "
                            f"(e.g. {', '.join(map(str, unknown[:5]))}); fix the file or pass the right --split")
        ids = sorted(wanted) if isinstance(ids, range) else [i for i in ids if i in wanted]
        digest = f"{len(ids)}:" + hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]
    return (ids[:limit] if limit is not None else ids), digest


def load_image(coco: CocoDataset, image: CocoImage, decode: bool) -> tuple[bytes, Any]:
    """(JPEG bytes, RGB PIL image or None): :meth:`CocoDataset.read_image`'s checks, then a decode if asked."""
    data = coco.read_image(image)
    if not decode:
        return data, None
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return data, im.convert("RGB")


class ImageSet(torch.utils.data.Dataset):
    """Map-style dataset over positions of ``ids``: position -> :class:`Item`."""

    def __init__(self, coco: CocoDataset, ids: Sequence[int], prep: Any, needs_instances: bool,
                 include_crowd: bool, decode: bool):
        self.coco, self.ids, self.prep = coco, list(ids), prep
        self.needs_instances, self.include_crowd, self.decode = needs_instances, include_crowd, decode

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, pos: int) -> Item:
        image = self.coco[self.ids[pos]]
        captions = [c for c in (" ".join(c.split()) for c in image.captions) if c]
        item = Item(pos, image, captions)
        if not captions:
            item.skip = ("images_skipped_no_captions", "no captions")
        elif self.needs_instances and not self.coco.category_names(image, include_crowd=self.include_crowd):
            crowd = "" if self.include_crowd else " (crowd left out)"
            item.skip = ("images_skipped_no_annotations", "no instance annotations" + crowd)
        else:
            try:
                item.data, item.pil = load_image(self.coco, image, self.decode)
            except ImageReadError as e:
                item.skip = ("images_skipped_unreadable", f"image {e.reason}")
            else:
                item.parsed = self.prep.parse(image, captions)
        return item


class Collate:
    """Items -> :class:`Batch`: the decoded images of the readable ones go through the preprocessors."""

    def __init__(self, prep: Any, clip_processor: Any = None):
        self.prep, self.clip_processor = prep, clip_processor

    def __call__(self, items: list[Item]) -> Batch:
        ok = [i for i, it in enumerate(items) if it.skip is None]
        batch = Batch(items, ok)
        if ok and self.prep.needs_pixels:
            batch.inputs = self.prep.preprocess([items[i].pil for i in ok])
        if ok and self.clip_processor is not None:
            from .caption_choice import ClipScorer

            batch.clip = ClipScorer.preprocess(self.clip_processor, [items[i].pil for i in ok])
        for it in items:
            it.pil = None
        return batch


def plan_batches(shards: Iterable[Shard], batch_size: int, size_of=None) -> list[tuple[int, list[int]]]:
    """(shard index, positions) of every batch, in order; a shard's last batch may be shorter.

    With ``size_of(position) -> (height, width)``, a shard's images are grouped by size first (stable), so
    batches mix sizes as little as possible: less padding to compute, and GroundingDINO, whose Swin backbone
    sees a batch's padding, then sees an image the way it sees it alone. Rows are put back in position order.
    """
    out = []
    for s in shards:
        positions = sorted(s.items, key=size_of) if size_of is not None else list(s.items)
        out += [(s.index, positions[i : i + batch_size]) for i in range(0, len(positions), batch_size)]
    return out


def batches(dataset: ImageSet, collate: Collate, plan: list[tuple[int, list[int]]], workers: int,
            pin_memory: bool = False) -> Iterable[Batch]:
    """The batches of ``plan`` in order, prepared by ``workers`` processes (0: in this process)."""
    if workers == 0:
        return (collate([dataset[p] for p in positions]) for _, positions in plan)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=[positions for _, positions in plan], collate_fn=collate, num_workers=workers,
        pin_memory=pin_memory, prefetch_factor=2,
    )
