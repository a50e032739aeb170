"""MultiGen's arithmetic: MG1..MG5 from per-image detections (the reference's definitions)."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from ...io.errors import UserError

LEVELS = 5


def score(records: Iterable[dict], threshold: float = 0.1, levels: int = LEVELS) -> dict:
    """MG1..MG{levels} of one model's per-image records, the reference's arithmetic.

    ``records``: ``{"prompt_id", "image_index", "categories", "labels", "scores"}`` per image. An image counts
    the distinct prompt categories among its labels whose score is > ``threshold`` (strictly, compared in
    float32 as the reference's torch post-processing compares; labels not in the prompt are ignored).
    ``MG_k`` = 100 x the share of images with at least k; its std = the population std (ddof 0), over image
    index i, of the per-index MG_k (100 x the share of prompts whose i-th image has at least k).

    An image whose ``labels`` is None is missing (not generated or unreadable): excluded from every share and
    counted in ``missing``; an index with no image left does not enter the std. With nothing missing this is
    exactly the reference's ``get_multigen``. Returns ``{"MG1": (mean, std), ..., "images", "missing",
    "prompts"}``.
    """
    thr = np.float32(threshold)
    counts: dict[tuple[int, int], int | None] = {}
    for r in records:
        key = (int(r["prompt_id"]), int(r["image_index"]))
        if key in counts:
            raise ValueError(f"two records for prompt {key[0]} image {key[1]}; each image is scored once")
        labels = r.get("labels")
        if labels is None:
            counts[key] = None
            continue
        scores = np.asarray(r["scores"], dtype=np.float32)
        if len(labels) != len(scores):
            raise ValueError(f"prompt {key[0]} image {key[1]}: {len(labels)} labels but {len(scores)} scores")
        kept = {lab for lab, above in zip(labels, scores > thr) if above}
        counts[key] = len(kept & set(r["categories"]))
    present = {k: c for k, c in counts.items() if c is not None}
    if not present:
        raise UserError("no image to score: every record is missing (generate and detect first)")
    by_index: dict[int, list[int]] = {}
    for (_, i), c in present.items():
        by_index.setdefault(i, []).append(c)
    out: dict[str, Any] = {}
    for k in range(1, levels + 1):
        mean = 100.0 * sum(c >= k for c in present.values()) / len(present)
        rates = [100.0 * sum(c >= k for c in cs) / len(cs) for _, cs in sorted(by_index.items())]
        out[f"MG{k}"] = (mean, float(np.std(rates)))
    out.update(images=len(present), missing=len(counts) - len(present), prompts=len({p for p, _ in present}))
    return out
