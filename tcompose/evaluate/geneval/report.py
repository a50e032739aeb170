"""GenEval reports: per-image results in GenEval's JSONL layout, the summary (JSON, Markdown, a rich table) with
GenEval's published rows beside, and a grid per task of the kept boxes with their colours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..published import GENEVAL_SOURCE, GENEVAL_TABLE, PUBLISHED_TAG
from .rules import TASKS, judge_all, summarize_results

KIND = "GenEval (transformers Mask2Former)"
DETECTOR_NOTE = ("The detector is transformers' Mask2Former Swin-S COCO instance model (detectron2's weights), not "
                 "the mmdet checkpoint GenEval's evaluator loads; prompts, thresholds, rules and the CLIP colour "
                 "classifier are GenEval's, so scores can differ from the official evaluator's.")
HEADERS = ["model", "overall", *TASKS, "images", "note"]


def records_of(stored: dict, prompts: Sequence, images: int) -> list[dict]:
    """:func:`.rules.score`'s records of one model's stored detections (a missing image: detections None)."""
    from ..benchmark import image_rows

    out = []
    for p, k, row in image_rows(stored, prompts, images):
        dets = None
        if row is not None and row["labels"] is not None:
            colors = row.get("colors") or [None] * len(row["labels"])
            dets = [{"label": lab, "score": s, "box": b, "color": c}
                    for lab, s, b, c in zip(row["labels"], row["scores"], row["boxes"], colors)]
        out.append({"prompt_index": p.prompt_id, "image_index": k, "metadata": p.metadata, "detections": dets,
                    "filename": row["image"] if row else None})
    return out


def _cell(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def table_rows(results: dict[str, dict]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        note = f"measured; {r['missing']} missing" if r.get("missing") else "measured"
        rows.append([name, _cell(r["overall"]), *(_cell(r["tasks"].get(t)) for t in TASKS), str(r["images"]), note])
    for name, r in GENEVAL_TABLE.items():
        rows.append([f"{name} (GenEval)", _cell(r["overall"]), *(_cell(r["tasks"][t]) for t in TASKS), "2212",
                     PUBLISHED_TAG])
    return rows


def markdown(results: dict[str, dict], title: str) -> str:
    lines = [f"# {title}", "", "Share of correct images per task (GenEval's rules); overall: the mean of the task "
             "scores.", "", DETECTOR_NOTE, "",
             "| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(TASKS) + 2) + ["---"]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    lines += ["", f"Rows marked \"{PUBLISHED_TAG}\": {GENEVAL_SOURCE}."]
    return "\n".join(lines) + "\n"


def print_table(results: dict[str, dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left", caption=DETECTOR_NOTE, caption_justify="left")
    for h in HEADERS:
        table.add_column(h, justify="left" if h in ("model", "note") else "right")
    for row in table_rows(results):
        table.add_row(*row, style="dim" if row[-1] == PUBLISHED_TAG else None)
    Console(stderr=True).print(table)


def write_results(path: Path, rows: Sequence[dict]) -> Path:
    """GenEval's results JSONL: one image a line, its seven fields."""
    from ...io.datasets import write_text_atomic

    keys = ("filename", "tag", "prompt", "correct", "reason", "metadata", "details")
    write_text_atomic(path, "".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in rows))
    return path


def summarize(output: Path, names: Sequence[str], prompts: Sequence, images: int, rules: dict, source: dict,
              grid: int = 4, progress: bool = True, extra: dict | None = None, suffix: str = "") -> dict:
    """Judge every model's stored detections with ``rules``; write ``results_NAME{suffix}.jsonl``,
    ``summary{suffix}.json`` / ``.md`` (and the grids when ``grid``); print the table when ``progress``."""
    from ..benchmark import write_summary
    from ..detection_store import read_records

    results = {}
    for name in names:
        records = records_of(read_records(output / "detections" / name), prompts, images)
        rows, missing = judge_all(records, **rules)
        results[name] = {**summarize_results(rows), "missing": missing}
        write_results(output / f"results_{name}{suffix}.jsonl", rows)
        if grid:
            write_grids(output, name, prompts, images, rows, grid)
    custom = " custom prompts," if source.get("kind") == "custom" else ""
    title = f"{KIND}:{custom} {len(prompts)} prompts x {images} images"
    summary = {"stage": "geneval", "title": title, "detector_note": DETECTOR_NOTE, "prompt_source": source,
               "rules": rules, "threshold": rules["threshold"], "num_prompts": len(prompts),
               "images_per_prompt": images, "models": results,
               "published": {"note": f"{PUBLISHED_TAG} ({GENEVAL_SOURCE})", "rows": GENEVAL_TABLE}, **(extra or {})}
    write_summary(output, summary, markdown(results, title), False, suffix)
    if progress:
        print_table(results, title)
    return summary


def write_grids(output: Path, name: str, prompts: Sequence, images: int, rows: Sequence[dict], per_task: int,
                cols: int = 4) -> list[Path]:
    """``grid_NAME_TAG.png`` per task: its first ``per_task`` prompts, up to ``cols`` images each, with the kept
    boxes labelled "colour name" (the colour where the classifier gave one) and each prompt's correct count."""
    from ..generate import image_filename
    from ..multigen.report import write_grid

    by_key = {(r["prompt_index"], r["image_index"]): r for r in rows}
    image_dir = output / "models" / name / "images"
    paths = []
    for tag in TASKS:
        chosen = [p for p in prompts if p.tag == tag][:per_task]
        if not chosen:
            continue
        texts, cells, boxes = [], [], []
        for p in chosen:
            judged = [by_key.get((p.prompt_id, k)) for k in range(min(images, cols))]
            right = sum(bool(j and j["correct"]) for j in judged)
            texts.append(f"[{right}/{len(judged)} correct] {p.text}")
            cells.append([image_dir / image_filename(p.prompt_id, k) for k in range(len(judged))])
            boxes.append([[(" ".join(x for x in (d.get("color"), d["label"]) if x), d["score"], d["box"])
                           for found in (j["kept"].values() if j else ()) for d in found] for j in judged])
        paths.append(write_grid(output / f"grid_{name}_{tag}.png", texts, cells, boxes))
    return paths
