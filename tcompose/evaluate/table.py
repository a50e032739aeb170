"""``tcompose table``: the TokenCompose paper's Table 1 from the output folders of the benchmark stages.

    tcompose table --multigen-coco mg/coco --multigen-ade20k mg/ade20k --visor visor/full --fid fid/ \\
        --latency latency/ --geneval ge/full --output table.md

Each folder holds any number of models (by NAME); a model's row gathers its cells from every folder that
measured it. Columns, as the paper's: Object Accuracy (VISOR's OA), MultiGen MG2 / MG3 / MG4 / MG5 on COCO
and on ADE20K, FID on COCO and Flickr30K, latency (s/img); CLIP score (COCO) is added beside FID. A cell no
folder gives reads "not run". The paper's published rows follow, marked "published, not measured", never
mixed with measured ones. Below the table, each source's protocol (prompts x images, or images), so a quick
run is never mistaken for the paper's protocol. Writes Markdown (``--output``, default printed only) and JSON
beside it (the same name with ``.json``: ``--output tab.md`` writes ``tab.json``). Each option takes one folder
(given twice, refused), or the summary file itself (``summary_threshold-0.2.json`` of a ``--score-only``).
A folder of another stage, or a summary missing a field the table reads, is refused
in one line naming the file and what it lacks; a table with no measured row says so above the published rows.

``--geneval`` adds two columns, GenEval's overall score and its six task scores (fractions,
:mod:`tcompose.evaluate.geneval`), and GenEval's published rows (its README), marked as such. The overall of a
partial run (not all six tasks, or fewer than GenEval's 553 prompts) is marked "partial" with what it covers.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io.errors import UserError
from .published import GENEVAL_SOURCE, GENEVAL_TABLE, PUBLISHED_TAG, TABLE1

NOT_RUN = "not run"
COLUMNS = ("OA", "MG COCO (2/3/4/5)", "MG ADE20K (2/3/4/5)", "FID COCO", "FID Flickr30K", "CLIP score COCO",
           "latency (s/img)")
MG = ("MG2", "MG3", "MG4", "MG5")
NO_MEASURED_ROW = ("No measured row: the given folders hold no model's results (no model was scored there); "
                   "only the paper's published rows follow.")


#: What each stage's summary must hold: (its file, its top-level fields, the fields of every model's entry).
#: A summary of another stage, or one missing a field, is refused in one line naming the file and what it lacks.
SOURCES = {
    "multigen": ("summary.json", ("dataset", "prompt_source", "num_prompts", "images_per_prompt", "threshold",
                                  "models"), MG),
    "visor": ("summary.json", ("prompts", "images_per_prompt", "threshold", "models"), ("OA",)),
    "fid": ("summary.json", ("network", "sets", "models"), ()),
    "latency": ("latency.json", ("models",), ("s_per_image", "steps", "dtype", "height", "width", "images",
                                              "device_name")),
}
FID_FIELDS = ("fid", "images", "reference_images")
SOURCES["geneval"] = ("summary.json", ("prompt_source", "num_prompts", "images_per_prompt", "threshold", "models"),
                      ("overall", "tasks"))
GENEVAL_COLUMNS = ("GenEval overall", "GenEval tasks (single/two/counting/colors/position/color_attr)")
#: A model's cell (not a column): what a partial GenEval run covers; its overall is then marked, not comparable.
GENEVAL_PARTIAL = "GenEval partial"


def _lacks(path: Path, option: str, what: str, lacks: str) -> UserError:
    return UserError(f"{option} {path.parent}: {path} lacks {lacks}; it is not the summary of a finished tcompose "
                     f"{what} run: pass the --output folder of `tcompose {what}`")


def _summary(folder: Path, what: str, option: str | None = None) -> dict:
    """The summary of a ``what`` run's folder, checked to hold every field the table reads."""
    name, fields, per_model = SOURCES[what]
    option = option or f"--{what}"
    path = Path(folder) / name
    if Path(folder).is_file() and Path(folder).suffix == ".json" and Path(folder).name.startswith(name[:-5]):
        path = Path(folder)  # a summary file itself, e.g. the summary_<rules>.json of a --score-only rescoring
    elif not Path(folder).exists():
        raise UserError(f"{option} {folder}: no such folder; pass the --output folder of a finished tcompose {what} "
                        "run")
    if not path.is_file():
        raise UserError(f"{option} {folder}: no {name}; pass the --output folder of a finished tcompose {what} run"
                        f" (or one of its {name[:-5]}*.json files)")
    try:
        s = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{option} {folder}: {path} is not readable JSON ({err}); pass the --output folder of a "
                        f"finished tcompose {what} run") from None
    if not isinstance(s, dict):
        raise _lacks(path, option, what, "the fields of a summary (it holds no JSON object)")
    if s.get("stage") not in (None, what):
        raise UserError(f"{option} {folder}: {path} is the summary of a tcompose {s['stage']} run, not of a {what} "
                        f"run; pass the --output folder of `tcompose {what}`")
    missing = [f for f in fields if f not in s]
    if missing:
        raise _lacks(path, option, what, ", ".join(repr(f) for f in missing))
    if not isinstance(s["models"], dict):
        raise _lacks(path, option, what, "a 'models' object (model name -> results)")
    for model, r in s["models"].items():
        if what == "fid":
            if not isinstance(r, dict):
                raise _lacks(path, option, what, f"results for model {model!r}")
            for set_name, entry in r.items():
                gone = [f for f in FID_FIELDS if not isinstance(entry, dict) or f not in entry]
                if gone:
                    raise _lacks(path, option, what, f"{', '.join(repr(f) for f in gone)} of model {model!r} on "
                                                     f"{set_name!r}")
            continue
        gone = [f for f in per_model if not isinstance(r, dict) or f not in r]
        if gone:
            raise _lacks(path, option, what, f"{', '.join(repr(f) for f in gone)} of model {model!r}")
    return s


def _mg(value: dict | None) -> list[float] | None:
    if not value:
        return None
    return [float(v[0]) if isinstance(v, (list, tuple)) else float(v) for v in (value.get(k) for k in MG)]


def collect(multigen_coco: Path | None = None, multigen_ade20k: Path | None = None, visor: Path | None = None,
            fid: Path | None = None, latency: Path | None = None, geneval: Path | None = None) -> dict:
    """``{"models": {NAME: {column: value}}, "protocols": {source: text}, "columns": [...]}`` from the given
    folders (the GenEval columns only with ``geneval``)."""
    models: dict[str, dict] = {}
    protocols: dict[str, str] = {}

    def cell(name: str, column: str, value) -> None:
        models.setdefault(name, {})[column] = value

    for folder, dataset, column in ((multigen_coco, "coco", COLUMNS[1]), (multigen_ade20k, "ade20k", COLUMNS[2])):
        if folder is None:
            continue
        s = _summary(folder, "multigen", f"--multigen-{dataset}")
        source = s.get("prompt_source") or {}
        if s.get("dataset") != dataset or source.get("kind") != "paper":
            what = f"{source.get('kind', 'unknown')} {s.get('dataset')!r}"
            raise UserError(f"--multigen-{dataset} {folder}: that run used {what} prompts, not the paper's "
                            f"{dataset!r} set; Table 1's MultiGen columns take the paper's prompts only")
        protocols[f"MultiGen {dataset}"] = (f"{s['num_prompts']} prompts x {s['images_per_prompt']} images, "
                                            f"threshold {s['threshold']:g}")
        for name, r in s["models"].items():
            cell(name, column, _mg(r))
    if visor is not None:
        s = _summary(visor, "visor")
        protocols["VISOR"] = (f"{s['prompts']} spatial prompts x {s['images_per_prompt']} images, "
                              f"threshold {s['threshold']:g}")
        for name, r in s["models"].items():
            cell(name, COLUMNS[0], r["OA"])
    if fid is not None:
        s = _summary(fid, "fid")
        for name, sets in s["models"].items():
            for key, column in (("coco", COLUMNS[3]), ("flickr30k", COLUMNS[4])):
                if key in sets:
                    cell(name, column, sets[key]["fid"])
                    r = sets[key]
                    protocols[f"FID {key}"] = f"{r['images']} generated images vs {r['reference_images']} reference images"
            if "coco" in sets and sets["coco"].get("clip_score") is not None:
                cell(name, COLUMNS[5], sets["coco"]["clip_score"])
    if latency is not None:
        s = _summary(latency, "latency")
        for name, r in s["models"].items():
            cell(name, COLUMNS[6], r["s_per_image"])
            protocols[f"latency {name}"] = (f"{r['steps']} steps, batch 1, {r['dtype']}, {r['height']}x{r['width']}, "
                                            f"mean of {r['images']} images on {r['device_name']}")
    columns = list(COLUMNS)
    if geneval is not None:
        from .geneval.rules import TASKS

        from .geneval.report import coverage

        s = _summary(geneval, "geneval")
        columns += GENEVAL_COLUMNS
        detector = f"Mask2Former {s['detector']}" if s.get("detector") else "Mask2Former"
        protocols["GenEval"] = (f"{s['num_prompts']} prompts x {s['images_per_prompt']} images, "
                                f"{(s.get('prompt_source') or {}).get('kind', 'unknown')} prompts, transformers "
                                f"{detector} (not the mmdet checkpoint of GenEval's evaluator)")
        if s.get("rules"):
            protocols["GenEval"] += ", rules " + ", ".join(f"{k} {v:g}" for k, v in s["rules"].items())
        for name, r in s["models"].items():
            cell(name, GENEVAL_COLUMNS[0], r["overall"])
            cell(name, GENEVAL_COLUMNS[1], [r["tasks"].get(t) for t in TASKS])
            part = coverage(r, s["num_prompts"], s.get("prompt_source"))
            if part is not None:
                cell(name, GENEVAL_PARTIAL, part)
    return {"models": models, "protocols": protocols, "columns": columns}


def _fmt(column: str, value, partial: str | None = None) -> str:
    if value is None:
        return NOT_RUN
    if column == GENEVAL_COLUMNS[0] and partial is not None:
        return f"{value:.2f} (partial: {partial})"
    if column.startswith("MG") or column == GENEVAL_COLUMNS[1]:
        return " / ".join("–" if v is None else f"{v:.2f}" for v in value)
    return f"{value:.2f}"


def published_rows(geneval: bool = False) -> dict[str, dict]:
    """The paper's rows in :data:`COLUMNS` (None where it gives no number); with ``geneval``, GenEval's published
    rows too (``"NAME (GenEval)"``), and every row gets the :data:`GENEVAL_COLUMNS`."""
    out = {}
    for name, r in TABLE1.items():
        out[name] = {COLUMNS[0]: r.get("OA"), COLUMNS[1]: _mg(r.get("MG_coco")), COLUMNS[2]: _mg(r.get("MG_ade20k")),
                     COLUMNS[3]: r.get("FID_coco"), COLUMNS[4]: r.get("FID_flickr30k"), COLUMNS[5]: None,
                     COLUMNS[6]: r.get("latency_s")}
    if geneval:
        from .geneval.rules import TASKS

        out = {name: {**cells, **dict.fromkeys(GENEVAL_COLUMNS)} for name, cells in out.items()}
        for name, r in GENEVAL_TABLE.items():
            out[f"{name} (GenEval)"] = {**dict.fromkeys(COLUMNS), GENEVAL_COLUMNS[0]: r["overall"],
                                        GENEVAL_COLUMNS[1]: [r["tasks"][t] for t in TASKS]}
    return out


def markdown(table: dict) -> str:
    columns = table.get("columns", COLUMNS)
    head = ["model", *columns, "note"]
    rule = "|" + "|".join(["---"] + ["---:"] * len(columns) + ["---"]) + "|"
    lines = ["# Table 1", ""]
    if not table["models"]:
        lines += [NO_MEASURED_ROW, ""]
    lines += ["| " + " | ".join(head) + " |", rule]
    for name, cells in table["models"].items():
        row = [_fmt(c, cells.get(c), cells.get(GENEVAL_PARTIAL)) for c in columns]
        lines.append("| " + " | ".join([name, *row, "measured"]) + " |")
    geneval = GENEVAL_COLUMNS[0] in columns
    for name, cells in published_rows(geneval).items():
        label = name if name.endswith("(GenEval)") else f"{name} (paper)"
        row = [label, *(("–" if cells[c] is None else _fmt(c, cells[c])) for c in columns), PUBLISHED_TAG]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "OA: VISOR's Object Accuracy (%); MG k: % of MultiGen images showing at least k of the prompt's 5 "
              "objects; FID: lower is better; CLIP score: 100 x max(cos, 0) of image and caption (not in the paper's "
              "table); latency: seconds per image, 50 steps, batch 1. Paper rows: 25,280 x 4 VISOR images, 1,000 x 10 "
              "MultiGen images per set, 10k COCO / 1k Flickr30K FID images; \"–\": the paper gives no number."]
    if geneval:
        lines += ["", "GenEval: share of correct images per task (fractions), overall = their mean; measured with "
                  "transformers' Mask2Former, not the mmdet checkpoint of GenEval's evaluator, so measured and "
                  f"published GenEval numbers can differ. Rows \"(GenEval)\": {GENEVAL_SOURCE}."]
        partial = {name: cells[GENEVAL_PARTIAL] for name, cells in table["models"].items() if GENEVAL_PARTIAL in cells}
        if partial:
            lines += ["", "GenEval overall marked \"partial\" (" + ", ".join(partial) + "): the mean of the measured "
                      "tasks only, not comparable with a full run's or the published overall; the task scores are."]
    if table["protocols"]:
        lines += ["", "Measured with:", ""] + [f"- {k}: {v}" for k, v in table["protocols"].items()]
    return "\n".join(lines) + "\n"


def run(multigen_coco: Path | None = None, multigen_ade20k: Path | None = None, visor: Path | None = None,
        fid: Path | None = None, latency: Path | None = None, output: Path | None = None,
        geneval: Path | None = None) -> dict:
    """Collect, print the Markdown table and, with ``output``, write it and the JSON beside it (``tab.md`` ->
    ``tab.json``)."""
    from ..io.datasets import write_json_atomic, write_text_atomic

    if not any(p is not None for p in (multigen_coco, multigen_ade20k, visor, fid, latency, geneval)):
        raise UserError("pass at least one run folder: --multigen-coco, --multigen-ade20k, --visor, --fid, "
                        "--latency or --geneval")
    table = collect(multigen_coco, multigen_ade20k, visor, fid, latency, geneval)
    text = markdown(table)
    result = {**table, "published": {"note": PUBLISHED_TAG, "rows": published_rows(geneval is not None)}}
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output, text)
        write_json_atomic(output.with_suffix(".json"), result)
    print(text, end="")
    return result
