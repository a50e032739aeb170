"""Attention figures as PNG files: rows of an image and its per-word heat maps, with a colour bar.

    rows = [PanelRow("SD", image, [("cat", cat_map), ("wine glass", glass_map)]), ...]
    draw_attention_figure(rows, "fig.png", panel=256, scale="shared")

Each row is labelled on the left; its first panel is the image, the next ones the image with a heat map on top
(``jet`` at 50% opacity, bilinear), optionally with the object's mask outlined in white. ``scale="per-map"``
stretches each map from its own minimum to its maximum (where each word looks, whatever its strength);
``"shared"`` puts every map of the figure on one scale from 0 to the largest value (how strongly, comparable
across rows: SD against TokenCompose, losses off against on).
The colour bar on the right says which. The PNG is exactly :func:`figure_size` pixels; matplotlib's Agg canvas
is used directly (no pyplot state), and the file is written to a temporary name, then renamed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import UserError

DPI = 128  # a power of two: pixel sizes survive the inches round trip exactly
LABEL_PX = 32  # left band holding each row's label
TITLE_PX = 24  # band above each panel holding its title
CBAR_PX = 100  # right band holding the colour bar, its ticks and its label
SCALES = ("per-map", "shared")


@dataclass
class PanelRow:
    """One row: a label, an image (uint8 [H, W, 3]) and its overlays ``(title, map [h, w] or None)``;
    ``outlines`` optionally gives each overlay a boolean mask (at any size) drawn as a white contour."""

    label: str
    image: np.ndarray
    maps: list[tuple[str, Any]] = field(default_factory=list)
    image_title: str = "image"
    outlines: list[Any] | None = None


def figure_size(n_rows: int, n_maps: int, panel: int = 256) -> tuple[int, int]:
    """(width, height) in pixels of a figure with ``n_rows`` rows of an image and ``n_maps`` overlays."""
    return LABEL_PX + (1 + n_maps) * panel + CBAR_PX, n_rows * (TITLE_PX + panel)


def _array(m) -> np.ndarray:
    return np.asarray(m.float().cpu().numpy() if hasattr(m, "float") else m, dtype=np.float32)


def _fit_title(ax, title: str, width_px: float) -> None:
    """The panel's title at 9 pt, else 8 or 7 pt, else cut with an ellipsis until it fits ``width_px`` (measured
    by the renderer)."""
    text = ax.set_title(title, fontsize=9, pad=3)
    renderer = ax.figure.canvas.get_renderer()
    for size in (8, 7):
        if text.get_window_extent(renderer).width <= width_px:
            return
        text.set_fontsize(size)
    cut = len(title)
    while cut > 1 and text.get_window_extent(renderer).width > width_px:
        cut -= 1
        text.set_text(title[:cut].rstrip() + "…")


def _percent(value: float, _pos=None) -> str:
    return f"{100 * value:.3g}%"


def draw_attention_figure(rows: Sequence[PanelRow], path: str | os.PathLike, panel: int = 256,
                          scale: str = "per-map") -> list[tuple[int, int, str]]:
    """Draw ``rows`` into ``path``; returns the drawn panels as ``(row, column, title)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if scale not in SCALES:
        raise UserError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    n_maps = max((len(r.maps) for r in rows), default=0)
    width, height = figure_size(len(rows), n_maps, panel)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    maps = [_array(m) for r in rows for _, m in r.maps if m is not None]
    vmax = max((float(m.max()) for m in maps), default=1.0) if scale == "shared" else 1.0
    vmax = vmax if vmax > 0 else 1.0
    panels = []
    for r, row in enumerate(rows):
        top = r * (TITLE_PX + panel) + TITLE_PX
        h, w = row.image.shape[:2]
        extent = (-0.5, w - 0.5, h - 0.5, -0.5)
        for c, (title, m) in enumerate([(row.image_title, None), *row.maps]):
            ax = fig.add_axes(((LABEL_PX + c * panel) / width, 1 - (top + panel) / height, panel / width,
                               panel / height))
            ax.set_axis_off()
            if c > 0 and m is None:  # a row with fewer words than the widest one
                continue
            ax.imshow(row.image, extent=extent, interpolation="bilinear")
            if c > 0:
                a = _array(m)
                if scale == "per-map":
                    lo, hi = float(a.min()), float(a.max())
                    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
                ax.imshow(a, cmap="jet", alpha=0.5, extent=extent, interpolation="bilinear", vmin=0, vmax=vmax)
                outline = row.outlines[c - 1] if row.outlines else None
                if outline is not None:
                    o = _array(outline)
                    if o.any() and not o.all():
                        ys = (np.arange(o.shape[0]) + 0.5) * h / o.shape[0] - 0.5
                        xs = (np.arange(o.shape[1]) + 0.5) * w / o.shape[1] - 0.5
                        ax.contour(xs, ys, o, levels=[0.5], colors="white", linewidths=1.2)
                        ax.set_xlim(extent[0], extent[1])
                        ax.set_ylim(extent[2], extent[3])
            _fit_title(ax, title, panel - 6)
            panels.append((r, c, title))
        fig.text(LABEL_PX / 2 / width, 1 - (top + panel / 2) / height, row.label, rotation=90, ha="center",
                 va="center", fontsize=9)
    if n_maps:
        bar = fig.add_axes(((width - CBAR_PX + 22) / width, 1 - (height - TITLE_PX) / height, 12 / width,
                            (height - 2 * TITLE_PX) / height))
        colours = ScalarMappable(norm=Normalize(0, vmax), cmap="jet")
        cb = fig.colorbar(colours, cax=bar)
        cb.ax.tick_params(labelsize=7)
        cb.ax.yaxis.set_label_position("left")  # the ticks take the right side
        if scale == "per-map":
            cb.set_ticks([0, 1], labels=["min", "max"])
            cb.set_label("each map", fontsize=8)
        else:
            cb.ax.yaxis.set_major_formatter(_percent)
            cb.set_label("share of the pixel's attention", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, path)
    return panels


BAR_COLOURS = ((0.70, 0.70, 0.70), (0.12, 0.47, 0.71), (1.00, 0.50, 0.05), (0.17, 0.63, 0.17))


def draw_bar_chart(groups: Sequence[str], series: dict[str, Sequence[float]], path: str | os.PathLike,
                   title: str = "", xlabel: str = "", reference: float | None = None,
                   reference_label: str = "") -> tuple[int, int]:
    """Horizontal grouped bars of shares in [0, 1]: one row per group (top to bottom), one bar per series
    (the first grey, as the baseline), each bar labelled with its value in percent; ``reference`` a dashed
    line (chance). Written like :func:`draw_attention_figure`; returns the PNG's (width, height) in pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, k = len(groups), len(series)
    if n == 0 or k == 0:
        raise ValueError("a bar chart needs at least one group and one series")
    if any(len(v) != n for v in series.values()):
        raise ValueError(f"every series needs {n} values, one per group")
    width, height = 768, 96 + n * (14 * k + 12)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((180 / width, 56 / height, 1 - 300 / width, 1 - 92 / height))
    bar = 14 / (14 * k + 12)
    centres = np.arange(n)[::-1].astype(float)
    for i, (name, values) in enumerate(series.items()):
        ys = centres + (k - 1) / 2 * bar - i * bar
        bars = ax.barh(ys, values, height=bar * 0.9, color=BAR_COLOURS[i % len(BAR_COLOURS)], label=name)
        ax.bar_label(bars, labels=[f"{100 * v:.0f}%" for v in values], padding=2, fontsize=7)
    if reference is not None:
        ax.axvline(reference, color="black", linestyle="--", linewidth=0.8, label=reference_label or None)
    ax.set_yticks(centres, labels=list(groups), fontsize=8)
    ax.set_xlim(0, 1.08)
    ax.xaxis.set_major_formatter(_percent)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, path)
    return width, height
