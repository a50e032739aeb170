"""The rows of one image of the masks stage (the columns of :data:`tcompose.io.datasets.MASKS_COLUMNS`).

:func:`rows_of` turns an :class:`~tcompose.masks.loader.Item` and its groundings into rows (masks encoded as
1-bit PNGs; a missing or empty mask stored as null), the skips to list in the manifest and the counters to
add to its ``stats``. It touches no shared state, so the stage runs it in threads while the models go on.
"""

from __future__ import annotations

from typing import Any

from ..io.datasets import encode_mask, image_struct
from .interface import Grounding, Source
from .loader import Item


class Done:
    """An already computed result, with the `result()` of a future."""

    def __init__(self, value: Any):
        self.value = value

    def result(self) -> Any:
        return self.value


def rows_of(item: Item, groundings: list[Grounding], source: Source, keys: list[str]) -> tuple[list, list, dict]:
    """(rows, skipped, stats) of one image (stats over ``keys``)."""
    stats: dict[str, int] = dict.fromkeys(keys, 0)
    skipped: list[dict] = []
    return item_rows(item, groundings, source, stats, skipped), skipped, stats


def item_rows(item: Item, groundings: list[Grounding], source: Source, stats: dict, skipped: list) -> list[dict]:
    """The rows of one image; skips are counted in ``stats`` and listed in ``skipped``."""

    def skip(key: str, reason: str, caption: str | None = None) -> None:
        stats[key] += 1
        image = item.image
        skipped.append({"image_id": image.id, "file_name": image.file_name, "caption": caption, "reason": reason})

    stats["images"] += 1
    if item.skip is not None:
        skip(*item.skip)
        return []
    image, rows = item.image, []
    for g in groundings:
        stats["captions"] += 1
        for k, v in g.stats.items():
            stats[k] += v
        if not g.phrases:
            skip("captions_no_match", source.no_match, g.caption)
            continue
        encoded = []
        for m in g.masks:
            if m is None or not m.any():
                stats["masks_empty"] += 1
                encoded.append(None)
            else:
                encoded.append(image_struct(encode_mask(m)))
        rows.append({
            "image_id": image.id, "file_name": image.file_name, "image": image_struct(item.data, image.file_name),
            "width": image.width, "height": image.height, "caption": g.caption, "phrases": g.phrases,
            "categories": g.categories, "masks": encoded, "source": source.name,
        })
        stats["phrases"] += len(g.phrases)
    stats["rows"] += len(rows)
    stats["images_with_rows" if rows else "images_skipped_no_match"] += 1
    return rows
