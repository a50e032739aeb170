"""GenEval's rules: which detections an image keeps, whether it is correct, and the per-task summary.

A transcription of djghosh13/geneval ``evaluation/evaluate_images.py`` (``evaluate_image``'s keep loop,
``compute_iou``, ``relative_position``, ``evaluate``) and ``evaluation/summary_scores.py`` at commit
af4902f24d3ca90ebbb446dd9891a59e0f82725f, on detections already labelled with GenEval's object names and
colours (:mod:`.detector` makes them):

- keep, per class: score > ``threshold`` (``counting_threshold`` for counting prompts), highest first, at most
  ``max_objects``, then greedy suppression of boxes whose IoU (GenEval's +1 pixel areas) with a kept one is
  >= ``max_overlap`` (1.0: none);
- includes (AND): at least ``count`` kept of the class; of the ``count`` best, at least ``count`` of ``color``;
  each of them ``position`` (``"left of"``, ...) relative to every object of an earlier include group
  (that group unmatched: a miss); excludes (OR): ``count`` or more kept of the class is a miss;
- summary: per tag, the share of correct images; overall = the mean of the task scores.

Two choices where GenEval's code leaves one open: ties in score keep their stored order (GenEval's
``argsort()[::-1]`` puts them in an unspecified order), and a position miss names the relations found in a
fixed order (GenEval joins a set, whose order changes from run to run).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np

from ...io.errors import UserError

#: GenEval's colour names (evaluate_images.py ``COLORS``), the classes of its CLIP zero-shot colour classifier.
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
#: The six tasks of GenEval's prompt file, in its order.
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
#: evaluate_images.py's ``--options`` defaults.
DEFAULTS = {"threshold": 0.3, "counting_threshold": 0.9, "max_objects": 16, "max_overlap": 1.0,
            "position_threshold": 0.1}


def compute_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU of two ``[x0, y0, x1, y1]`` boxes with GenEval's inclusive-pixel areas ((x1 - x0 + 1) x ...)."""
    def area(b):
        return max(b[2] - b[0] + 1, 0) * max(b[3] - b[1] + 1, 0)

    inter = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]),
                  min(box_a[3], box_b[3])])
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0


def relative_position(box_a: Sequence[float], box_b: Sequence[float], position_threshold: float = 0.1) -> list[str]:
    """Where A is relative to B (subset of :data:`RELATIONS`), factoring in the boxes' sizes: each axis' centre
    offset shrinks by ``position_threshold`` x (the two sizes summed), then a relation holds where the shrunk
    offset, over the full offset's length, passes 0.5 on that axis."""
    boxes = np.array([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - position_threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return []
    dx, dy = revised / np.linalg.norm(offset)
    return [rel for rel, holds in zip(RELATIONS, (dx < -0.5, dx > 0.5, dy < -0.5, dy > 0.5)) if holds]


def keep_objects(detections: Iterable[dict], tag: str, threshold: float = 0.3, counting_threshold: float = 0.9,
                 max_objects: int = 16, max_overlap: float = 1.0) -> dict[str, list[dict]]:
    """GenEval's kept objects of one image: class name -> its detections (``label``, ``score``, ``box``,
    ``color``), highest score first. Classes with none kept are absent."""
    thr = counting_threshold if tag == "counting" else threshold
    by_class: dict[str, list[dict]] = {}
    for d in detections:
        by_class.setdefault(d["label"], []).append(d)
    kept: dict[str, list[dict]] = {}
    for name, found in by_class.items():
        order = sorted((d for d in found if d["score"] > thr), key=lambda d: -d["score"])[:max_objects]
        out = []
        while order:
            best = order.pop(0)
            out.append(best)
            order = [d for d in order if max_overlap == 1 or compute_iou(best["box"], d["box"]) < max_overlap]
        if out:
            kept[name] = out
    return kept


def evaluate(objects: dict[str, list[dict]], metadata: dict, position_threshold: float = 0.1) -> tuple[bool, str]:
    """GenEval's ``evaluate``: (correct, reason) of one image's kept ``objects`` against a prompt's metadata
    (includes AND-ed, excludes OR-ed; colour and position judged on each include's ``count`` best objects)."""
    correct = True
    reason: list[str] = []
    groups: list[list[dict] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        matched = True
        found = objects.get(name, [])[:count]
        if len(found) < count:
            correct = matched = False
            reason.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [d.get("color") for d in found]
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    reason.append(f"expected {req['color']} {name}>={count}, found {colors.count(req['color'])} "
                                  f"{req['color']}; and "
                                  + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors))
            if "position" in req and matched:
                expected, target = req["position"]
                if groups[target] is None:
                    correct = matched = False
                    reason.append(f"no target for {name} to be {expected}")
                else:
                    for obj in found:
                        for other in groups[target]:
                            rels = relative_position(obj["box"], other["box"], position_threshold)
                            if expected not in rels:
                                correct = matched = False
                                reason.append(f"expected {name} {expected} target, found {' and '.join(rels)} target")
                                break
                        if not matched:
                            break
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        name = req["class"]
        if len(objects.get(name, [])) >= req["count"]:
            correct = False
            reason.append(f"expected {name}<{req['count']}, found {len(objects[name])}")
    return correct, "\n".join(reason)


def judge(record: dict, threshold: float = 0.3, counting_threshold: float = 0.9, max_objects: int = 16,
          max_overlap: float = 1.0, position_threshold: float = 0.1) -> dict:
    """One image in GenEval's results layout: ``filename``, ``tag``, ``prompt``, ``correct``, ``reason``,
    ``metadata`` (the prompt's record as a JSON string) and ``details`` (JSON: class -> kept boxes, each
    ``[x0, y0, x1, y1, score]``), plus (not GenEval's) ``kept`` (the kept detections, for figures),
    ``prompt_index`` and ``image_index``. ``filename`` defaults to GenEval's
    ``{prompt:05d}/samples/{image:04d}.png``."""
    meta = record["metadata"]
    objects = keep_objects(record["detections"], meta["tag"], threshold, counting_threshold, max_objects, max_overlap)
    correct, reason = evaluate(objects, meta, position_threshold)
    filename = record.get("filename") or f"{record['prompt_index']:05d}/samples/{record['image_index']:04d}.png"
    return {"filename": filename,
            "tag": meta["tag"], "prompt": meta["prompt"], "correct": bool(correct), "reason": reason,
            "metadata": json.dumps(meta),
            "details": json.dumps({name: [[*map(float, d["box"][:4]), float(d["score"])] for d in found]
                                   for name, found in objects.items()}),
            "kept": objects, "prompt_index": record["prompt_index"], "image_index": record["image_index"]}


def summarize_results(rows: Sequence[dict]) -> dict[str, Any]:
    """summary_scores.py's numbers from rows in GenEval's layout: per tag (first-appearance order) the share of
    correct images, overall = their mean, and the image and prompt counts."""
    if not rows:
        raise UserError("no image to score: every image is missing (generate and detect first)")
    tags: dict[str, list[bool]] = {}
    prompts: dict[str, bool] = {}
    for r in rows:
        tags.setdefault(r["tag"], []).append(bool(r["correct"]))
        prompts[r["metadata"]] = prompts.get(r["metadata"], False) or bool(r["correct"])
    tasks = {tag: float(np.mean(v)) for tag, v in tags.items()}
    return {"overall": float(np.mean(list(tasks.values()))), "tasks": tasks, "images": len(rows),
            "prompts": len(prompts), "correct_images": float(np.mean([bool(r["correct"]) for r in rows])),
            "correct_prompts": float(np.mean(list(prompts.values()))),
            "task_counts": {tag: [int(sum(v)), len(v)] for tag, v in tags.items()}}


def judge_all(records: Iterable[dict], threshold: float = 0.3, counting_threshold: float = 0.9,
              max_objects: int = 16, max_overlap: float = 1.0, position_threshold: float = 0.1
              ) -> tuple[list[dict], int]:
    """:func:`judge` of every record whose ``detections`` is not None; returns those rows and the number of
    missing images (``detections`` None). Each (prompt_index, image_index) may come once."""
    records = list(records)
    twice = [k for k, n in Counter((int(r["prompt_index"]), int(r["image_index"])) for r in records).items() if n > 1]
    if twice:
        raise ValueError(f"two records for prompt {twice[0][0]} image {twice[0][1]}; each image is scored once")
    present = [r for r in records if r.get("detections") is not None]
    rows = [judge(r, threshold, counting_threshold, max_objects, max_overlap, position_threshold) for r in present]
    return rows, len(records) - len(present)


def score(records: Iterable[dict], threshold: float = 0.3, counting_threshold: float = 0.9, max_objects: int = 16,
          max_overlap: float = 1.0, position_threshold: float = 0.1) -> dict:
    """GenEval's scores of one model's images, as fractions in [0, 1].

    ``records``: ``{"prompt_index", "image_index", "metadata": <a GenEval prompt record>, "detections":
    [{"label": <GenEval object name>, "score", "box": [x0, y0, x1, y1] (pixels), "color": <one of COLORS>}]}``;
    ``detections`` None: the image is missing (not scored, counted in ``missing``). Returns ``{"overall",
    "tasks": {tag: share correct}, "images", "missing", "prompts", "correct_images", "correct_prompts",
    "task_counts": {tag: [correct, images]}}``."""
    rows, missing = judge_all(records, threshold, counting_threshold, max_objects, max_overlap, position_threshold)
    return {**summarize_results(rows), "missing": missing}
