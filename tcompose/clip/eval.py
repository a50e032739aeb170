"""Did contrastive finetuning help? Zero-shot classification and text-to-image retrieval on held-out crops.

- **Zero-shot top-1 / top-5**: each held-out crop is classified among all of the dataset's categories by cosine
  similarity to the category's prompt (its most frequent caption, e.g. "a photo of a dog"); top-k accuracy over
  crops. Chance is ``k / n_categories``.
- **Text-to-image R@1 / R@5**: each distinct held-out caption queries the held-out crops; a hit when one of
  the K most similar crops has the caption's category (crops share captions, so "the" matching crop is not
  defined; any crop of the category is relevant). Mean over queries.

``compare(before, after)`` gives deltas and a verdict (better / worse / mixed / unchanged); ``format_table``
prints it, ending with a line that says plainly when finetuning made a metric worse.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
METRICS = ("zero_shot_top1", "zero_shot_top5", "t2i_recall@1", "t2i_recall@5")
LABELS = {"zero_shot_top1": "zero-shot top-1", "zero_shot_top5": "zero-shot top-5",
          "t2i_recall@1": "text->image R@1", "t2i_recall@5": "text->image R@5"}


def topk_accuracy(image_emb: Tensor, class_emb: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Share of images whose true class (``labels [N]``, indices into ``class_emb [C, D]``) is among the k most
    similar classes; k is capped at C."""
    sims = _normalise(image_emb) @ _normalise(class_emb).T  # [N, C]
    out = {}
    for k in ks:
        top = sims.topk(min(k, sims.shape[1]), dim=1).indices
        out[k] = float((top == labels[:, None]).any(1).float().mean())
    return out


def recall_at_k(query_emb: Tensor, query_labels: Tensor, image_emb: Tensor, image_labels: Tensor,
                ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Text-to-image recall: share of queries with an image of the query's label among the k most similar."""
    sims = _normalise(query_emb) @ _normalise(image_emb).T  # [Q, N]
    out = {}
    for k in ks:
        top = sims.topk(min(k, sims.shape[1]), dim=1).indices
        out[k] = float((image_labels[top] == query_labels[:, None]).any(1).float().mean())
    return out


def _normalise(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _features(out) -> Tensor:
    """transformers >= 5 returns an output whose ``pooler_output`` is projected; 4.x the tensor itself."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


@torch.no_grad()
def encode_texts(model, input_ids: Tensor, batch_size: int, device) -> Tensor:
    chunks = [_features(model.get_text_features(input_ids=input_ids[i : i + batch_size].to(device))).float().cpu()
              for i in range(0, len(input_ids), batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def encode_images(model, batches, device) -> tuple[Tensor, Tensor]:
    """Image embeddings and labels of collated batches (``pixel_values``, ``labels``)."""
    embs, labels = [], []
    dtype = next(model.vision_model.parameters()).dtype
    for batch in batches:
        px = batch["pixel_values"].to(device, dtype=dtype)
        embs.append(_features(model.get_image_features(pixel_values=px)).float().cpu())
        labels.append(batch["labels"])
    return torch.cat(embs), torch.cat(labels)


def per_category_top1(image_emb: Tensor, class_emb: Tensor, labels: Tensor, names: list[str]) -> dict[str, dict]:
    """Zero-shot top-1 of each category's crops: ``{name: {"top1": share, "crops": count}}`` (present ones)."""
    pred = (_normalise(image_emb) @ _normalise(class_emb).T).argmax(dim=1)
    out = {}
    for c in sorted(set(labels.tolist())):
        hit = pred[labels == c] == c
        out[names[c]] = {"top1": float(hit.float().mean()), "crops": int(hit.numel())}
    return out


def evaluate(model, examples, rows: list[int], class_ids: list[int], class_input_ids: Tensor, batch_size: int,
             device, collate, class_names: list[str] | None = None) -> dict:
    """Zero-shot top-1/5 and text-to-image R@1/5 of ``model`` on ``rows`` of ``examples`` (a CropExamples);
    with ``class_names`` (one per class id) also each category's zero-shot top-1 (``per_category``)."""
    was_training = model.training
    model.eval()
    try:
        batches = (collate([examples[r] for r in rows[i : i + batch_size]]) for i in range(0, len(rows), batch_size))
        image_emb, labels = encode_images(model, batches, device)
        class_emb = encode_texts(model, class_input_ids, batch_size, device)
        position = {cid: i for i, cid in enumerate(class_ids)}
        targets = torch.tensor([position[int(c)] for c in labels])
        acc = topk_accuracy(image_emb, class_emb, targets)
        per_category = per_category_top1(image_emb, class_emb, targets, class_names) if class_names else None
        queries: dict[int, int] = {}
        for r in rows:  # distinct captions of the held-out crops, first row of each as the query
            queries.setdefault(int(examples.caption_of[r]), r)
        q_rows = list(queries.values())
        q_emb = encode_texts(model, examples.input_ids(q_rows), batch_size, device)
        q_labels = torch.tensor([examples.rows.labels[r] for r in q_rows])
        rec = recall_at_k(q_emb, q_labels, image_emb, labels)
    finally:
        model.train(was_training)
    n_cls = len(class_ids)
    return {
        "zero_shot_top1": acc[1], "zero_shot_top5": acc[5], "t2i_recall@1": rec[1], "t2i_recall@5": rec[5],
        "images": len(rows), "categories": n_cls, "queries": len(q_rows),
        "chance_top1": 1 / n_cls, "chance_top5": min(5, n_cls) / n_cls,
    } | ({"per_category": per_category} if per_category is not None else {})


MAX_GROUPS = 12


def category_groups(crops: dict[str, int], max_groups: int = MAX_GROUPS) -> dict[str, list[str]]:
    """Bars of the eval chart: categories (name -> held-out crops) grouped into at most ``max_groups``.

    Up to ``max_groups`` categories: one bar each. More: COCO names under their supercategory (vehicle,
    animal, ...), other names one bar each; past ``max_groups`` bars the smallest (by crops) merge into
    ``other (N)``. Bars in order of crops, largest first."""
    from ..data.categories import COCO_SUPERCATEGORIES

    if len(crops) <= max_groups:
        groups = {n: [n] for n in crops}
    else:
        sup = {n: g for g, members in COCO_SUPERCATEGORIES.items() for n in members}
        groups = {}
        for n in crops:
            groups.setdefault(sup.get(n, n), []).append(n)
    size = {g: sum(crops[n] for n in members) for g, members in groups.items()}
    order = sorted(groups, key=lambda g: (-size[g], g))
    if len(order) > max_groups:
        keep, rest = order[: max_groups - 1], order[max_groups - 1:]
        merged = [n for g in rest for n in groups[g]]
        return {g: groups[g] for g in keep} | {f"other ({len(merged)})": merged}
    return {g: groups[g] for g in order}


def group_top1(per_category: dict[str, dict], groups: dict[str, list[str]]) -> dict[str, float]:
    """Crop-weighted zero-shot top-1 of each group of :func:`category_groups`."""
    out = {}
    for g, members in groups.items():
        n = sum(per_category[m]["crops"] for m in members if m in per_category)
        hits = sum(per_category[m]["top1"] * per_category[m]["crops"] for m in members if m in per_category)
        out[g] = hits / n if n else 0.0
    return out


def write_eval_chart(report: dict, path) -> bool:
    """``eval.png``: zero-shot top-1 before and after finetuning per category group (:func:`category_groups`),
    with chance marked. False (nothing written) when the report has no per-category results."""
    from ..io.figures import draw_bar_chart

    before, after = report.get("before") or {}, report.get("after") or {}
    if "per_category" not in before or "per_category" not in after:
        return False
    crops = {n: v["crops"] for n, v in after["per_category"].items()}
    groups = category_groups(crops)
    labels = [f"{g} ({sum(crops[n] for n in members)})" for g, members in groups.items()]
    draw_bar_chart(labels, {"before": list(group_top1(before["per_category"], groups).values()),
                            "after": list(group_top1(after["per_category"], groups).values())}, path,
                   title=f"zero-shot top-1 on held-out crops: {before['zero_shot_top1']:.1%} -> "
                         f"{after['zero_shot_top1']:.1%} ({after['categories']} categories)",
                   xlabel="zero-shot top-1 (held-out crops per group in brackets)", reference=after["chance_top1"],
                   reference_label="chance")
    return True


def compare(before: dict | None, after: dict | None, tolerance: float = 0.0) -> dict:
    """Deltas (after - before) and a verdict: ``better`` (none worse, some better), ``worse`` (none better, some
    worse), ``mixed``, ``unchanged``; a change within ``tolerance`` counts as unchanged."""
    if not before or not after:
        return {"before": before, "after": after, "delta": None, "verdict": "not evaluated", "worse": [], "better": []}
    delta = {m: after[m] - before[m] for m in METRICS}
    worse = [m for m in METRICS if delta[m] < -tolerance]
    better = [m for m in METRICS if delta[m] > tolerance]
    verdict = "mixed" if worse and better else "worse" if worse else "better" if better else "unchanged"
    return {"before": before, "after": after, "delta": delta, "verdict": verdict, "worse": worse, "better": better}


def verdict_line(report: dict) -> str:
    v = report["verdict"]
    if v == "not evaluated":
        return "not evaluated: no held-out crops (--eval-fraction 0)"
    if report["worse"]:
        what = ", ".join(f"{LABELS[m]} {report['before'][m]:.3f} -> {report['after'][m]:.3f}" for m in report["worse"])
        head = "WORSE after finetuning" if v == "worse" else "MIXED: worse after finetuning on"
        return f"{head}: {what}"
    if v == "better":
        return "better after finetuning: " + ", ".join(LABELS[m] for m in report["better"])
    return "unchanged: no metric moved"


def format_table(report: dict) -> str:
    """The before / after / delta table of :func:`compare`'s report, and its verdict line."""
    if report["delta"] is None:
        return verdict_line(report)
    b, a = report["before"], report["after"]
    lines = [f"{'metric':<18} {'before':>8} {'after':>8} {'delta':>8}"]
    for m in METRICS:
        lines.append(f"{LABELS[m]:<18} {b[m]:>8.4f} {a[m]:>8.4f} {a[m] - b[m]:>+8.4f}")
    lines.append(f"held out: {a['images']} crops, {a['queries']} captions, {a['categories']} categories "
                 f"(chance top-1 {a['chance_top1']:.4f}, top-5 {a['chance_top5']:.4f})")
    lines.append(verdict_line(report))
    return "\n".join(lines)
