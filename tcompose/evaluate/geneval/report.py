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
HEADERS = ["model", "overall", *TASKS, "images", "note"]
#: Short task names for the terminal table (rows there: it must read at 80 columns).
SHORT = {"single_object": "single obj", "two_object": "two obj", "counting": "counting", "colors": "colors",
         "position": "position", "color_attr": "color attr"}
PARTIAL_MARK = "†"


def detector_note(detector: str | None = None) -> str:
    """What the scores were measured with: the default names transformers' Swin-S port (detectron2's weights);
    another ``--detector`` is named as given."""
    from ...models.defaults import MASK2FORMER

    if detector in (None, MASK2FORMER):
        used = f"transformers' Mask2Former Swin-S COCO instance model ({MASK2FORMER}, detectron2's weights)"
    else:
        used = f"the Mask2Former {detector} (transformers)"
    return (f"The detector is {used}, not the mmdet checkpoint GenEval's evaluator loads; prompts, thresholds, rules "
            "and the CLIP colour classifier are GenEval's, so scores can differ from the official evaluator's.")


DETECTOR_NOTE = detector_note()


def coverage(result: dict, num_prompts: int, source: dict | None) -> str | None:
    """None when ``result``'s overall is GenEval's (all six tasks over every prompt of GenEval's file; a custom
    file: all six tasks), else what it covers: ``"1 of 6 tasks, 3 of 553 prompts"``. Such an overall is the mean
    of the measured tasks only, not comparable with a full run's or the published rows'."""
    source = source or {}
    measured = [t for t in TASKS if t in result.get("tasks", {})]
    total = source.get("file_prompts")
    short = source.get("kind") != "custom" and total is not None and num_prompts < total
    if len(measured) == len(TASKS) and not short:
        return None
    prompts = f"{num_prompts} of {total} prompts" if total is not None else f"{num_prompts} prompts"
    return f"{len(measured)} of {len(TASKS)} tasks, {prompts}"


def overall_cell(result: dict, num_prompts: int, source: dict | None) -> str:
    """The overall score, or, for a partial run, ``"0.25 (partial: 1 of 6 tasks, 3 of 553 prompts)"``."""
    part = coverage(result, num_prompts, source)
    value = _cell(result.get("overall"))
    return value if part is None else f"{value} (partial: {part})"


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


def table_rows(results: dict[str, dict], num_prompts: int = 0, source: dict | None = None) -> list[list[str]]:
    """``[name, overall, six tasks, images, note]`` per measured model (a partial overall marked as such), then
    GenEval's published rows."""
    rows = []
    for name, r in results.items():
        note = f"measured; {r['missing']} missing" if r.get("missing") else "measured"
        rows.append([name, overall_cell(r, num_prompts, source), *(_cell(r["tasks"].get(t)) for t in TASKS),
                     str(r["images"]), note])
    for name, r in GENEVAL_TABLE.items():
        rows.append([f"{name} (GenEval)", _cell(r["overall"]), *(_cell(r["tasks"][t]) for t in TASKS), "2212",
                     PUBLISHED_TAG])
    return rows


def partial_note(results: dict[str, dict], num_prompts: int, source: dict | None) -> str | None:
    """A line saying which models' overall is partial, or None."""
    parts = {name: coverage(r, num_prompts, source) for name, r in results.items()}
    parts = {k: v for k, v in parts.items() if v is not None}
    if not parts:
        return None
    return ("Partial run: " + "; ".join(f"{name}: {part}" for name, part in parts.items()) + ". Such an overall is "
            "the mean of the measured tasks only, not comparable with GenEval's overall (six tasks, 553 prompts); the "
            "task scores are.")


def markdown(results: dict[str, dict], title: str, num_prompts: int = 0, source: dict | None = None,
             detector: str | None = None) -> str:
    lines = [f"# {title}", "", "Share of correct images per task (GenEval's rules); overall: the mean of the task "
             "scores.", "", detector_note(detector), ""]
    if (note := partial_note(results, num_prompts, source)) is not None:
        lines += [note, ""]
    lines += ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(TASKS) + 2) + ["---"]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results, num_prompts, source)]
    lines += ["", f"Rows marked \"{PUBLISHED_TAG}\": {GENEVAL_SOURCE}."]
    return "\n".join(lines) + "\n"


def rich_table(results: dict[str, dict], title: str, num_prompts: int = 0, source: dict | None = None,
               detector: str | None = None):
    """The terminal table, transposed so that it reads at 80 columns: one row per score (overall, the six tasks,
    images), one column per measured model, then GenEval's published rows as dim columns marked ``*``. A
    partial overall is marked ``†`` and explained below."""
    from rich.table import Table

    notes = [detector_note(detector), f"* {PUBLISHED_TAG}: {GENEVAL_SOURCE}."]
    if (note := partial_note(results, num_prompts, source)) is not None:
        notes.insert(0, f"{PARTIAL_MARK} {note}")
    table = Table(title=title, title_justify="left", caption="\n".join(notes), caption_justify="left")
    table.add_column("score", justify="left", no_wrap=True)
    for name in results:
        table.add_column(name, justify="right")
    for name in GENEVAL_TABLE:
        table.add_column(f"{name}*", justify="right", style="dim")
    overall = []
    for r in results.values():
        mark = PARTIAL_MARK if coverage(r, num_prompts, source) is not None else ""
        overall.append(_cell(r.get("overall")) + mark)
    table.add_row("overall", *overall, *(_cell(r["overall"]) for r in GENEVAL_TABLE.values()))
    for t in TASKS:
        table.add_row(SHORT[t], *(_cell(r["tasks"].get(t)) for r in results.values()),
                      *(_cell(r["tasks"][t]) for r in GENEVAL_TABLE.values()))
    table.add_row("images", *(str(r["images"]) for r in results.values()), *(["2212"] * len(GENEVAL_TABLE)))
    if any(r.get("missing") for r in results.values()):
        table.add_row("missing", *(str(r.get("missing") or 0) for r in results.values()),
                      *(["–"] * len(GENEVAL_TABLE)))
    return table


def print_table(results: dict[str, dict], title: str, num_prompts: int = 0, source: dict | None = None,
                detector: str | None = None) -> None:
    from rich.console import Console

    Console(stderr=True).print(rich_table(results, title, num_prompts, source, detector))


def write_results(path: Path, rows: Sequence[dict]) -> Path:
    """GenEval's results JSONL: one image a line, its seven fields."""
    from ...io.datasets import write_text_atomic

    keys = ("filename", "tag", "prompt", "correct", "reason", "metadata", "details")
    write_text_atomic(path, "".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in rows))
    return path


def summarize(output: Path, names: Sequence[str], prompts: Sequence, images: int, rules: dict, source: dict,
              grid: int = 4, progress: bool = True, extra: dict | None = None, suffix: str = "",
              detector: str | None = None) -> dict:
    """Judge every model's stored detections with ``rules``; write ``results_NAME{suffix}.jsonl``,
    ``summary{suffix}.json`` / ``.md`` (and the grids when ``grid``); print the table when ``progress``.
    ``detector``: the Mask2Former the detections came from (named in the notes)."""
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
    partial = {name: coverage(r, len(prompts), source) for name, r in results.items()}
    summary = {"stage": "geneval", "title": title, "detector": detector, "detector_note": detector_note(detector),
               "prompt_source": source, "rules": rules, "threshold": rules["threshold"], "num_prompts": len(prompts),
               "images_per_prompt": images, "models": results,
               "partial": {name: part for name, part in partial.items() if part is not None},
               "published": {"note": f"{PUBLISHED_TAG} ({GENEVAL_SOURCE})", "rows": GENEVAL_TABLE}, **(extra or {})}
    write_summary(output, summary, markdown(results, title, len(prompts), source, detector), False, suffix)
    if progress:
        print_table(results, title, len(prompts), source, detector)
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
