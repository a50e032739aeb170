"""The attnviz stage: per-word cross-attention heat maps of several models on one seeded prompt, side by side.

Runbook::

    # the paper's figure: SD1.4 against TokenCompose, one heat map per noun of the prompt
    tcompose attnviz --prompt "A cat and a wine glass" --model SD=CompVis/stable-diffusion-v1-4 \\
        --model TokenCompose=runs/tc --output fig.png
    # chosen words, only the up blocks, only the first 25 denoising steps; a swapped UNet / text encoder
    tcompose attnviz --prompt "A cat and a wine glass" --words cat,"wine glass" --layers up --timesteps 0-24 \\
        --model SD=CompVis/stable-diffusion-v1-4 --model mine=CompVis/stable-diffusion-v1-4,unet=runs/tc \\
        --output fig.png
    # draw the figure again from the saved maps (no model needed)
    tcompose attnviz --from-maps fig.safetensors --output fig2.png

Per model (``--model NAME=ID_OR_PATH[,unet=PATH][,text_encoder=PATH]``, :mod:`tcompose.models.spec`): the
image of :func:`tcompose.evaluate.generate.image_seed` ``(seed, 0, 0)`` (the same image ``tcompose generate`` makes
for prompt 0, image 0 with that seed), generated while :func:`tcompose.grounding.attention.capture_cross_attention`
records the ``--layers``; :mod:`tcompose.grounding.attention_maps` aggregates the conditional maps over the
``--timesteps`` (step indices, default all), layers and heads into per-token maps ``[77, S, S]`` (S: the
largest map side, 64 for SD at 512 px) that sum to 1 over tokens at each pixel; a word's map is the sum over
its token positions (the model family's ``phrase_positions``). Words: ``--words``, or the prompt's
noun phrases (:func:`tcompose.data.text.noun_phrases`).

Outputs: the figure (rows = models, columns = the image and one overlay per word, each map min-max
normalised for display; ``figure_size`` pixels exactly) and, beside it, ``fig.safetensors``: per model
``NAME/image`` (uint8 [H, W, 3]), ``NAME/tokens`` (float32 [77, S, S]), ``NAME/word/I`` (float32 [S, S],
word I of the metadata's ``words``), and metadata ``attnviz`` (JSON: prompt, seed, words, per-model token
positions, layers, timesteps, steps, guidance, scheduler, size, dtype).
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io.errors import MissingPathError, UserError
from ..grounding.attention_maps import accumulate_attention, parse_steps, word_maps
from ..io.figures import SCALES, PanelRow, draw_attention_figure
from ..io.figures import figure_size as _figure_size
from ..io.files import check_output_file, match_umask
from ..io.runs import output_guard
from ..models.spec import ModelSpec, parse_model_spec
from .settings import GenerationSettings

__all__ = ["AttnvizConfig", "Row", "AttnvizResult", "run", "maps_path", "save_maps", "load_maps",
           "draw_figure", "figure_size", "default_words"]

_META_KEY = "attnviz"


@dataclass
class AttnvizConfig:
    """Settings of ``tcompose attnviz``."""

    prompt: str
    models: list[ModelSpec]
    """Rows of the figure; ``NAME=ID_OR_PATH[,unet=...][,text_encoder=...]`` strings are parsed."""
    output: Path
    """Figure PNG; the raw maps go to the same path with ``.safetensors``."""
    words: list[str] | None = None
    """None: the prompt's noun phrases."""
    layers: tuple[str, ...] | None = None
    """Captured attention: UNet blocks or groups, or SD3 / FLUX transformer blocks. None: the layers TokenCompose
    supervises in each model's family (mid and up for the UNets, the published blocks for SD3 / FLUX)."""
    timesteps: str | None = None
    """Denoising step indices (``0-24``, ``10,20,30-``; 0 = the first, noisiest); None = all."""
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    """Seed, steps, guidance, scheduler, size, dtype, device; ``batch_size`` and ``safety_checker`` are not used
    (one image per model, always without the checker)."""
    panel: int = 256
    """Side of each panel in pixels."""
    scale: str = "per-map"
    """per-map: each heat map stretched to its own range; shared: one scale for the whole figure (models comparable)."""

    def __post_init__(self):
        self.output = Path(self.output)
        self.models = [parse_model_spec(m) if isinstance(m, str) else m for m in self.models]
        self.layers = tuple(self.layers) if self.layers is not None else None


@dataclass
class Row:
    """One model's image and maps."""

    name: str
    image: np.ndarray  # uint8 [H, W, 3]
    tokens: torch.Tensor  # float32 [T, S, S]
    words: dict[str, torch.Tensor]  # word -> float32 [S, S]
    positions: dict[str, list[int]]
    layers: tuple[str, ...] = ()  # what was captured (--layers, or the family's default)
    steps: int | None = None  # what the model sampled with (--steps / --guidance, or its own)
    guidance: float | None = None


@dataclass
class AttnvizResult:
    prompt: str
    words: list[str]
    rows: list[Row]
    meta: dict[str, Any] = field(default_factory=dict)


def default_words(prompt: str) -> list[str]:
    """The prompt's noun phrases (:func:`tcompose.data.text.noun_phrases`)."""
    try:
        from ..data.text import noun_phrases
    except ImportError:
        from ..data.nouns import noun_phrases
    words = noun_phrases(prompt)
    if not words:
        raise UserError(f"no noun phrases found in the prompt {prompt!r}; pass --words")
    return list(words)


def maps_path(figure: str | os.PathLike) -> Path:
    return Path(figure).with_suffix(".safetensors")


def figure_size(n_rows: int, n_words: int, panel: int = 256) -> tuple[int, int]:
    """(width, height) in pixels of a figure with ``n_rows`` models and ``n_words`` words."""
    return _figure_size(n_rows, n_words, panel)


def _model_row(spec: ModelSpec, cfg: AttnvizConfig, words: list[str], progress) -> Row:
    from ..models.families import components_of_pipeline
    from ..models.sampling import excite_positions, generate_batch, image_seed
    from .sampling import load_pipeline, settings_for

    pipe = load_pipeline(spec.model, unet=spec.unet, text_encoder=spec.text_encoder, revision=spec.revision,
                         lora=spec.lora, lora_scale=spec.lora_scale, dtype=cfg.settings.dtype, scheduler=cfg.settings.scheduler,
                         device=cfg.settings.device)
    comps = components_of_pipeline(pipe)
    s = settings_for(pipe, cfg.settings)  # the model's steps and guidance where none are given
    positions = {}
    for w, pos in zip(words, comps.phrase_positions(cfg.prompt, words)):
        if pos is None:
            raise UserError(f"--words: {w!r} does not occur as whole words in the prompt {cfg.prompt!r} apart from "
                             f"where longer --words take its tokens, or lies past the "
                             f"{comps.tokenizer.model_max_length}-token limit")
        positions[w] = pos
    n_calls = comps.family.denoiser_calls(pipe, s.steps)  # denoiser evaluations of the sampling loop
    selected = set(parse_steps(cfg.timesteps, n_calls))
    layers = cfg.layers or comps.objective.default_layers(comps.denoiser.config)
    with accumulate_attention(comps.denoiser, layers, s.guidance > 1 and comps.family.classifier_free_guidance, selected,
                              lambda i: progress(i, n_calls), capture=comps.objective.capture) as acc:
        excite = None
        if s.excite is not None:  # --excite-words, else the words drawn
            excite = [excite_positions(comps, cfg.prompt, s.excite.words or words, required=True)]
        images, _ = generate_batch(pipe, [cfg.prompt], [image_seed(s.seed, 0, 0)], s.steps, s.guidance, s.height,
                                   s.width, excite=s.excite, excite_indices=excite)
    tokens = acc.token_maps()[0].float().cpu()
    row = Row(spec.name, images[0], tokens, word_maps(tokens, positions), positions, tuple(layers), s.steps,
              s.guidance)
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def save_maps(result: AttnvizResult, path: str | os.PathLike) -> Path:
    """The raw maps and metadata as safetensors (written to a temporary name, then renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for row in result.rows:
        tensors[f"{row.name}/image"] = torch.from_numpy(np.ascontiguousarray(row.image))
        tensors[f"{row.name}/tokens"] = row.tokens.contiguous()
        for i, w in enumerate(result.words):
            tensors[f"{row.name}/word/{i}"] = row.words[w].contiguous()
    meta = {**result.meta, "prompt": result.prompt, "words": result.words, "models": [r.name for r in result.rows],
            "token_positions": {r.name: r.positions for r in result.rows}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    match_umask(tmp)  # safetensors writes its files 0600
    os.replace(tmp, path)
    return path


def load_maps(path: str | os.PathLike) -> AttnvizResult:
    """What :func:`save_maps` wrote."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"--from-maps {path}: no such file; pass the .safetensors written beside a figure")
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as err:  # noqa: BLE001  (safetensors raises its own error type for a file it cannot read)
        raise UserError(f"--from-maps {path}: not a safetensors file ({err}); pass the .safetensors file that "
                         "tcompose attnviz wrote beside its figure") from None
    with f:
        raw = (f.metadata() or {}).get(_META_KEY)
        if raw is None:
            raise UserError(f"{path}: no attnviz metadata; pass a .safetensors file written by tcompose attnviz")
        meta = json.loads(raw)
        rows = []
        for name in meta["models"]:
            words = {w: f.get_tensor(f"{name}/word/{i}") for i, w in enumerate(meta["words"])}
            rows.append(Row(name, f.get_tensor(f"{name}/image").numpy(), f.get_tensor(f"{name}/tokens"), words,
                            meta["token_positions"][name]))
    extra = {k: v for k, v in meta.items() if k not in ("prompt", "words", "models", "token_positions")}
    return AttnvizResult(meta["prompt"], meta["words"], rows, extra)


def draw_figure(result: AttnvizResult, path: str | os.PathLike, panel: int = 256,
                scale: str = "per-map") -> list[tuple[int, int, str]]:
    """Draw rows = models, columns = image + one overlay per word (:func:`tcompose.io.figures.draw_attention_figure`,
    ``scale`` per-map or shared); returns the panels (row, column, title)."""
    _check_panel(panel)
    check_output_file(path, "--output")
    rows = [PanelRow(row.name, row.image, [(w, row.words[w]) for w in result.words]) for row in result.rows]
    return draw_attention_figure(rows, path, panel, scale)


def run(cfg: AttnvizConfig, progress: bool = True) -> dict:
    """Generate each model's image with capture on, save the maps and draw the figure; returns a summary.
    Every input and output is checked before the first model loads."""
    if not cfg.models:
        raise UserError("no --model given; pass --model NAME=ID_OR_PATH once per row of the figure")
    if len({m.name for m in cfg.models}) != len(cfg.models):
        raise UserError("two --model values share a name; give each a NAME= prefix of its own")
    if cfg.output.suffix.lower() != ".png":
        raise UserError(f"--output {cfg.output}: the figure is a PNG; use a name ending in .png")
    if cfg.scale not in SCALES:
        raise UserError(f"--scale must be one of {', '.join(SCALES)}, got {cfg.scale!r}")
    _check_panel(cfg.panel)
    cfg.settings.validate()
    words = list(dict.fromkeys(cfg.words)) if cfg.words else default_words(cfg.prompt)
    _check_outputs(cfg.output)
    for spec in cfg.models:  # every model's --layers before any image is generated
        _check_layers(spec, cfg)
    with output_guard(cfg.output.parent):
        cfg.output.parent.mkdir(parents=True, exist_ok=True)
        return _run(cfg, words, progress)


def _check_panel(panel: int) -> None:
    if panel < 1:
        raise UserError(f"--panel {panel}: the side of each panel in pixels must be >= 1 (the default is 256)")


def _check_outputs(figure: Path) -> None:
    """The figure and the maps beside it can be written (checked before any model is loaded)."""
    for path in (figure, maps_path(figure)):
        if path.is_dir():
            raise UserError(f"--output {figure}: {path} is a folder; pass a file name ending in .png")
    check_output_file(figure, "--output")  # a file where a folder should be, a folder no file can be made in


def _check_layers(spec: ModelSpec, cfg: AttnvizConfig) -> None:
    """``--layers`` resolved against the model's denoiser at the figure's size, from its config alone."""
    from ..models.families import family_of
    from .sampling import check_image_size, model_facts

    s = cfg.settings
    facts = model_facts(spec.model, spec.unet, spec.revision, s.scheduler)
    check_image_size(s.height, s.width, facts)
    f = facts["vae_factor"]
    h, w = (s.height or facts["size"]) // f, (s.width or facts["size"]) // f
    config = facts["unet_config"]
    family = family_of(config)
    layers = cfg.layers or family.objective.default_layers(config)
    family.objective.resolve_layers(layers, family.attention_groups(config, (h, w)), f" ({spec.name}, at {h}x{w} latents)")
    if s.excite is not None:
        from .generate import check_excite

        check_excite(s, facts)


def _run(cfg: AttnvizConfig, words: list[str], progress: bool) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    rows = []
    bar = Progress(TextColumn("[bold]attnviz {task.description}"), BarColumn(), MofNCompleteColumn(),
                   disable=not progress)
    with bar:
        for spec in cfg.models:
            task = bar.add_task(spec.name, total=None)
            rows.append(_model_row(spec, cfg, words, lambda i, n, t=task: bar.update(t, completed=i, total=n)))
    h, w = rows[0].image.shape[:2]
    s = cfg.settings
    layers = {r.name: list(r.layers) for r in rows}

    def one(values: dict):  # one value when every model has it, else per model
        return next(iter(values.values())) if all(v == next(iter(values.values())) for v in values.values()) else values

    meta = {"seed": s.seed, "layers": one(layers), "timesteps": cfg.timesteps or "all",
            "steps": one({r.name: r.steps for r in rows}), "guidance": one({r.name: r.guidance for r in rows}),
            "scheduler": s.scheduler, "height": h, "width": w, "dtype": s.dtype,
            "model_specs": [vars(m) for m in cfg.models]}
    result = AttnvizResult(cfg.prompt, words, rows, meta)
    maps = save_maps(result, maps_path(cfg.output))
    panels = draw_figure(result, cfg.output, cfg.panel, cfg.scale)
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"attnviz: {len(rows)} models x {len(words)} words ({', '.join(words)}) -> "
                                   f"{cfg.output}, {maps}", highlight=False)
    return {"figure": str(cfg.output), "maps": str(maps), "words": words, "panels": panels,
            "size": figure_size(len(rows), len(words), cfg.panel),
            "token_positions": {r.name: r.positions for r in rows}}
