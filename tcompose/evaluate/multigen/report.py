"""MultiGen reports: the results table (rich on the terminal, Markdown in ``summary.md``) with the paper's
published rows beside the measured ones, and a grid of sample images per model (``grid_NAME.png``).

The published rows are from the TokenCompose paper's main results table (1,000 prompts x 10 images, OWLv2-L,
threshold 0.1; MG1 is not reported there): marked "published, not measured", never mixed with measured rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ...io.errors import UserError
from ..published import PUBLISHED_TAG, multigen_rows

LEVELS = ("MG1", "MG2", "MG3", "MG4", "MG5")

#: The paper's numbers (means over 1,000 prompts x 10 images), by prompt set, then model (tcompose.evaluate.published).
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {d: multigen_rows(d) for d in ("coco", "ade20k")}
PUBLISHED_NOTE = "published, not measured (paper: 1,000 prompts x 10 images)"


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, (tuple, list)):
        return f"{value[0]:.2f} ± {value[1]:.2f}"
    return f"{value:.2f}"


def table_rows(results: dict[str, dict], dataset: str | None) -> list[list[str]]:
    """``[name, MG1..MG5, images, note]`` per measured model, then the published rows of ``dataset``."""
    rows = []
    for name, r in results.items():
        note = f"measured; {r['missing']} missing" if r.get("missing") else "measured"
        rows.append([name, *(_cell(r[k]) for k in LEVELS), str(r["images"]), note])
    for name, values in PUBLISHED.get(dataset or "", {}).items():
        rows.append([f"{name} (paper)", *(_cell(values.get(k)) for k in LEVELS), "10000", PUBLISHED_TAG])
    return rows


HEADERS = ["model", *LEVELS, "images", "note"]


def markdown(results: dict[str, dict], dataset: str | None, title: str) -> str:
    """The table as Markdown (``summary.md``): MG_k as ``mean ± std`` in percent."""
    lines = [f"# {title}", "", "MG_k: % of images in which at least k of the prompt's 5 categories were detected "
             "(mean ± population std over image index).", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---"] + ["---:"] * 6 + ["---"]) + "|"]
    rows = table_rows(results, dataset)
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if any(row[-1] == PUBLISHED_TAG for row in rows):
        lines += ["", f"Rows marked \"{PUBLISHED_TAG}\": the TokenCompose paper's main results table (1,000 prompts "
                  "x 10 images, threshold 0.1; MG1 not reported), copied for reference."]
    return "\n".join(lines) + "\n"


def print_table(results: dict[str, dict], dataset: str | None, title: str) -> None:
    """The table on stderr, with rich."""
    from rich.console import Console
    from rich.table import Table

    rows = table_rows(results, dataset)
    caption = PUBLISHED_NOTE if any(row[-1] == PUBLISHED_TAG for row in rows) else None
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for h in HEADERS:
        table.add_column(h, justify="right" if h in LEVELS or h == "images" else "left")
    for row in rows:
        style = "dim" if row[-1] == PUBLISHED_TAG else None
        table.add_row(*row, style=style)
    Console(stderr=True).print(table)


#: Box and label colours, one per category in the order a row's labels first appear (tab10).
PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def _overlap(a: tuple, b: tuple) -> float:
    """Area shared by two rectangles ``(x0, y0, x1, y1)``."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def place_labels(boxes: Sequence[Sequence[float]], sizes: Sequence[tuple[float, float]], width: float,
                 height: float) -> list[tuple[float, float]]:
    """Top-left corners of one label per box, each label ``sizes[i]`` = (w, h), inside the ``width`` x ``height``
    image and not on top of an earlier label where any candidate allows: above the box's top-left corner, just
    inside it, below it, inside its bottom, then the same at its right edge, then sliding down inside the box.
    Where every candidate collides, the one overlapping the placed labels least. Boxes in order of priority."""
    placed: list[tuple] = []
    corners = []
    for (x0, y0, x1, y1), (w, h) in zip(boxes, sizes):
        w, h = min(w, width), min(h, height)
        starts = [(x0, y0 - h), (x0, y0), (x0, y1), (x0, y1 - h), (x1 - w, y0 - h), (x1 - w, y0), (x1 - w, y1)]
        starts += [(x0, y0 + k * h) for k in range(1, max(1, int((y1 - y0) // max(h, 1))))]
        best, best_cost = None, None
        for sx, sy in starts:
            sx, sy = min(max(sx, 0.0), width - w), min(max(sy, 0.0), height - h)
            rect = (sx, sy, sx + w, sy + h)
            cost = sum(_overlap(rect, q) for q in placed)
            if best_cost is None or cost < best_cost:
                best, best_cost = rect, cost
            if cost == 0:
                break
        placed.append(best)
        corners.append((best[0], best[1]))
    return corners


def _fit_text(draw, text: str, font, width: float) -> str:
    """``text``, cut with an ellipsis until it is at most ``width`` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "…"


def write_grid(path: Path, prompts: Sequence[str], images: Sequence[Sequence[Path]],
               boxes: Sequence[Sequence[list[tuple[str, float, list[float]]]]] | None = None, cell: int = 256) -> Path:
    """A PNG grid: one row per prompt (its text above), one column per image, detected boxes drawn on top
    (``boxes[row][col]`` = ``[(label, score, [x0, y0, x1, y1]), ...]``). Each category has its colour in a row;
    labels sit on a filled background, inside the image, clear of each other (:func:`place_labels`), the most
    confident first. Missing images stay grey."""
    from PIL import Image, ImageDraw, ImageFont

    cols = max((len(r) for r in images), default=0)
    text_h = 22
    sheet = Image.new("RGB", (max(cols * cell, 640), len(images) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    for r, (text, row) in enumerate(zip(prompts, images)):
        y = r * (cell + text_h)
        draw.text((4, y + 4), _fit_text(draw, text, font, sheet.width - 8), fill="black", font=font)
        colours: dict[str, tuple] = {}
        for c, img_path in enumerate(row):
            x = c * cell
            if not Path(img_path).is_file():
                draw.rectangle([x, y + text_h, x + cell - 1, y + text_h + cell - 1], fill=(200, 200, 200))
                continue
            with Image.open(img_path) as im:
                im = im.convert("RGB")
                scale = cell / max(im.size)
                thumb = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
            sheet.paste(thumb, (x, y + text_h))
            w, h = thumb.size
            found = sorted(boxes[r][c] if boxes else [], key=lambda d: -d[1])
            rects, labels = [], []
            for label, score, (x0, y0, x1, y1) in found:
                x0, x1 = (min(max(v * scale, 0), w - 1) for v in (x0, x1))
                y0, y1 = (min(max(v * scale, 0), h - 1) for v in (y0, y1))
                rects.append((x0, y0, x1, y1))
                labels.append(_fit_text(draw, f"{label} {score:.2f}", small, w - 4))
                colour = colours.setdefault(label, PALETTE[len(colours) % len(PALETTE)])
                draw.rectangle([x + x0, y + text_h + y0, x + x1, y + text_h + y1], outline=colour, width=2)
            sizes = []
            for t in labels:
                left, top, right, bottom = draw.textbbox((0, 0), t, font=small)
                sizes.append((right + 4, bottom + 3))
            for (label, _, _), t, (lx, ly), (lw, lh) in zip(found, labels, place_labels(rects, sizes, w, h), sizes):
                colour = colours[label]
                ink = "black" if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 150 else "white"
                draw.rectangle([x + lx, y + text_h + ly, x + lx + lw - 1, y + text_h + ly + lh - 1], fill=colour)
                draw.text((x + lx + 2, y + text_h + ly + 1), t, fill=ink, font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    sheet.save(tmp)
    tmp.replace(path)
    return path


def summarize(output: Path, names: Sequence[str], prompts: Sequence, images: int, threshold: float, source: dict,
              grid: int = 4, progress: bool = True, extra: dict | None = None, suffix: str = "") -> dict:
    """Score every model's stored detections over ``prompts`` x ``images``; write ``summary{suffix}.json`` and
    ``.md`` (and ``grid_NAME.png`` when ``grid``); print the table when ``progress``. An image without a stored
    row is scored as missing."""
    from ..benchmark import image_rows, write_summary
    from ..detection_store import read_records
    from .scoring import score

    dataset = None if source.get("kind") == "custom" else source.get("dataset")
    results = {}
    for name in names:
        stored = read_records(output / "detections" / name)
        records = []
        for p, k, row in image_rows(stored, prompts, images):
            if row is not None and tuple(row["categories"]) != tuple(p.categories):
                raise UserError(f"{output / 'detections' / name}: prompt {p.prompt_id} is stored with categories "
                                f"{row['categories']}, not {list(p.categories)}; the folder holds another run")
            records.append(row or {"prompt_id": p.prompt_id, "image_index": k, "categories": list(p.categories),
                                   "labels": None, "scores": None})
        results[name] = score(records, threshold)
        if grid:
            _grid(output, name, prompts[:grid], min(images, 5), stored, threshold)
    kind = {"sampled": f" sampled (seed {source.get('sample_seed')})", "custom": " custom"}.get(source.get("kind"), "")
    title = (f"MultiGen ({source.get('dataset')}{kind}, {len(prompts)} prompts x {images} images, "
             f"OWLv2 threshold {threshold:g})")
    summary = {"title": title, "dataset": source.get("dataset"), "prompt_source": source, "threshold": threshold,
               "num_prompts": len(prompts), "images_per_prompt": images, "models": results,
               "published": {"note": PUBLISHED_NOTE, "rows": PUBLISHED.get(dataset or "", {})}, **(extra or {})}
    write_summary(output, summary, markdown(results, dataset, title), False, suffix)
    if progress:
        print_table(results, dataset, title)  # a rich table rather than the Markdown
    return summary


def _grid(output: Path, name: str, prompts: Sequence, cols: int, stored: dict, threshold: float) -> None:
    from ..generate import image_filename

    image_dir = output / "models" / name / "images"
    paths = [[image_dir / image_filename(p.prompt_id, k) for k in range(cols)] for p in prompts]
    boxes = []
    for p in prompts:
        row_boxes = []
        for k in range(cols):
            r = stored.get((p.prompt_id, k)) or {}
            row_boxes.append([(lab, s, b) for lab, s, b in zip(r.get("labels") or [], r.get("scores") or [],
                                                                r.get("boxes") or []) if s > threshold])
        boxes.append(row_boxes)
    write_grid(output / f"grid_{name}.png", [p.text for p in prompts], paths, boxes)
