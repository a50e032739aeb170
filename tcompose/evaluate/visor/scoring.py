"""VISOR's scores from per-image detections, with the definitions of VISOR's ``visor.py``.

Only two-object spatial prompts count (not "A and B", not single objects). For each of their images, with the
boxes scoring above ``threshold``:

- the image *has both* objects when each of the prompt's two names labels at least one box;
- it is *spatially right* when some detected (A, B) pair of boxes, A labelled object 1 and B object 2, has
  centroids in the relation (image coordinates, y down): left ``x_A < x_B``, right ``x_A > x_B``, above
  ``y_A < y_B``, below ``y_A > y_B``.

``OA`` (Object Accuracy, the TokenCompose paper's column) = 100 x share of images with both objects;
``VISOR_cond`` = 100 x (images right and with both) / (images with both); ``VISOR_uncond`` = OA x VISOR_cond /
100 (the share of all images right and with both); ``VISOR_k`` = 100 x share of prompts with at least k such
images (of 4 per prompt in VISOR's protocol). An image that could not be generated or read (``labels`` null) is
left out and counted as ``missing``, as MultiGen's score does. ``VISOR_cond`` is ``None`` when no image has both
objects (visor.py would divide by zero).
"""

from __future__ import annotations

from typing import Iterable

from ...io.errors import UserError
from .prompts import RELATIONS, _records

LEVELS = ("OA", "VISOR_cond", "VISOR_uncond", "VISOR_1", "VISOR_2", "VISOR_3", "VISOR_4")


def centroid(box) -> tuple[float, float]:
    x0, y0, x1, y1 = box
    return (x0 + x1) / 2, (y0 + y1) / 2


def relation_holds(rel: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether centroid ``a`` (object 1) is ``rel`` centroid ``b`` (object 2), in image coordinates."""
    if rel == "to the left of":
        return a[0] < b[0]
    if rel == "to the right of":
        return a[0] > b[0]
    if rel == "above":
        return a[1] < b[1]
    if rel == "below":
        return a[1] > b[1]
    raise ValueError(f"unknown relation {rel!r}: one of {', '.join(RELATIONS)}")


def judge(record: dict, obj1: str, obj2: str, rel: str, threshold: float) -> tuple[bool, bool]:
    """(both objects detected, spatially right) for one image's detections."""
    kept = [(lab, box) for lab, s, box in zip(record.get("labels") or [], record.get("scores") or [],
                                              record.get("boxes") or []) if s > threshold]
    first = [centroid(b) for lab, b in kept if lab == obj1]
    second = [centroid(b) for lab, b in kept if lab == obj2]
    both = bool(first) and bool(second)
    right = both and any(relation_holds(rel, a, b) for a in first for b in second)
    return both, right


def score(records: Iterable[dict], threshold: float = 0.1) -> dict:
    """``{"OA", "VISOR_cond", "VISOR_uncond", "VISOR_1".."VISOR_4", "images", "prompts", "missing"}`` over
    ``records`` = ``{"unique_id", "image_index", "labels", "scores", "boxes"}`` (labels null: a missing image)."""
    prompts = _records()
    images = both_count = right_count = missing = 0
    per_prompt: dict[int, int] = {}
    seen: set[tuple[int, int]] = set()
    for r in records:
        uid = int(r["unique_id"])
        if not 0 <= uid < len(prompts):
            raise ValueError(f"unique_id {uid} is not an SR2D prompt (0..{len(prompts) - 1})")
        p = prompts[uid]
        if p["num_objects"] != 2 or p["rel_type"] not in RELATIONS:
            continue
        key = (uid, int(r["image_index"]))
        if key in seen:
            raise ValueError(f"image {key[1]} of prompt {uid} appears twice")
        seen.add(key)
        if r.get("labels") is None:
            missing += 1
            continue
        both, right = judge(r, p["obj_1_attributes"][0], p["obj_2_attributes"][0], p["rel_type"], threshold)
        images += 1
        both_count += both
        right_count += right
        per_prompt[uid] = per_prompt.get(uid, 0) + right
    if images == 0:
        raise UserError(f"no image of a two-object spatial prompt to score ({missing} missing)")
    oa = 100 * both_count / images
    cond = 100 * right_count / both_count if both_count else None
    out = {"OA": oa, "VISOR_cond": cond, "VISOR_uncond": 100 * right_count / images}
    for k in range(1, 5):
        out[f"VISOR_{k}"] = 100 * sum(v >= k for v in per_prompt.values()) / len(per_prompt)
    return out | {"images": images, "prompts": len(per_prompt), "missing": missing, "threshold": threshold}
