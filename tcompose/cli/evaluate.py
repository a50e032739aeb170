"""Evaluation: `generate`, the benchmarks (`multigen`, `visor`, `geneval`, `fid`, `latency`, and `table` of them
all), `attnviz`.

Every generating command takes the generation options (``--steps``, ``--guidance``, ...) as one ``settings``
argument, and multigen, visor and geneval their detection options as one ``detection`` argument
(:mod:`tcompose.cli.option_groups`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..io.errors import UserError
from ..evaluate.settings import GenerationSettings
from ..models import defaults
from ._app import _friendly, _split, app
from .option_groups import FROM_OPTIONS, detection_options, generation_options


@app.command()
@_friendly
@generation_options("generate", seed="Base seed; image k of prompt p uses a seed derived from (seed, p, k).")
def generate(
    model: str = typer.Option(..., help="Hub id or local diffusers folder (a train-unet OUT is one)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder: images/*.png, generations.parquet, run.json."),
    prompt: Optional[list[str]] = typer.Option(None, help="A prompt (repeatable); with --prompts too, these come first (ids 0, 1, ...), then the file's."),
    prompts: Optional[Path] = typer.Option(None, help="Prompts file: one per line (# comments), or a .json list."),
    images_per_prompt: int = typer.Option(1, help="Images per prompt."),
    unet: Optional[str] = typer.Option(None, help="UNet folder, or a folder with unet/ (train-unet OUT), replacing the model's."),
    text_encoder: Optional[str] = typer.Option(None, help="Another CLIP text model (hub id or folder)."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of --model."),
    lora: Optional[str] = typer.Option(None, help="LoRA adapters (a train-unet --lora-rank OUT) merged into --model's UNet."),
    lora_scale: float = typer.Option(1.0, help="Weight of the --lora adapters."),
    name: Optional[str] = typer.Option(None, help="Model label stored in the table (default: --model)."),
    settings: GenerationSettings = FROM_OPTIONS,
) -> None:
    """Images from prompts: seeded per image (batch size and process count do not change them), resumable."""
    from ..evaluate.generate import GenerateConfig, read_prompts, run
    from ._app import process_state, run_sharded

    texts = list(prompt or []) + (read_prompts(prompts) if prompts is not None else [])
    if not texts:
        raise UserError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    state = process_state()
    cfg = GenerateConfig(model=model, output=output, prompts=texts, images_per_prompt=images_per_prompt, unet=unet,
                         text_encoder=text_encoder, revision=revision, lora=lora, lora_scale=lora_scale, name=name,
                         settings=settings.replace(device=str(state.device)))
    run_sharded(run, cfg, state)


@app.command()
@_friendly
@generation_options("visor", seed="Base seed; image k of prompt unique_id has the same seed for every model.")
@detection_options(detector=(defaults.OWLVIT, "OWL-ViT checkpoint (hub id or folder; VISOR's own by default)."),
                   detector_dtype=("fp32", "fp32 (as VISOR ran it), auto (fp16 on CUDA), fp16 or bf16."),
                   detector_batch_size=16)
def visor(
    model: Optional[list[str]] = typer.Option(None, help="NAME=ID_OR_PATH[,unet=PATH][,text_encoder=PATH][,lora=DIR[,lora_scale=S]] (repeatable; same seeds for all)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder: run.json, prompts.json, models/, detections/, summary.json/.md."),
    prompts: Optional[int] = typer.Option(None, help="N of the 25,280 spatial prompts, drawn with --prompt-seed (default: all, VISOR's protocol)."),
    prompt_seed: int = typer.Option(0, help="Seed of the --prompts draw (prompts.json lists the ids drawn)."),
    images: int = typer.Option(4, help="Images per prompt (VISOR: 4)."),
    settings: GenerationSettings = FROM_OPTIONS,
    detection: dict = FROM_OPTIONS,
    score_only: Optional[Path] = typer.Option(None, help="Rescore the stored detections of this run folder; loads no model."),
) -> None:
    """VISOR: SR2D two-object spatial prompts -> images -> OWL-ViT -> Object Accuracy and VISOR scores. Resumable."""
    from ..evaluate.visor import stage

    _detection_benchmark(stage, stage.VisorConfig, model, output, score_only, settings, detection, prompts=prompts,
                         prompt_seed=prompt_seed, images=images)


def _refuse_typed(flag: str, honoured: set[str], what: str) -> None:
    """Refuse the options typed on the command line that ``flag`` cannot honour (every one but the parameters
    ``honoured``), naming them, rather than ignore them; ``what``: what ``flag`` does."""
    import importlib

    for name in ("typer._click", "click"):  # typer >= 0.29 runs its own copy of click
        try:
            core = importlib.import_module(f"{name}.core")
            ctx = importlib.import_module(f"{name}.globals").get_current_context(silent=True)
        except ImportError:
            continue
        if ctx is not None:
            break
    else:
        return  # called as a library function: no command line
    typed = [p.secondary_opts[0] if getattr(p, "secondary_opts", None) and ctx.params.get(p.name) is False
             else p.opts[0] for p in ctx.command.params
             if p.name not in honoured and ctx.get_parameter_source(p.name) == core.ParameterSource.COMMANDLINE]
    if typed:
        them = "it" if len(typed) == 1 else "them"
        raise UserError(f"{flag} {what}: it does not take {', '.join(typed)}; drop {them}, or run without {flag}")


def _detection_benchmark(stage, config_cls, model: Optional[list[str]], output: Optional[Path],
                         score_only: Optional[Path], settings: GenerationSettings, detection: dict,
                         default_threshold: float = 0.1, rules: Optional[dict] = None, **fields) -> None:
    """multigen, visor and geneval: ``stage.rescore`` the ``--score-only`` folder (loads no model; with the
    ``rules`` options, geneval's), or ``stage.run`` a ``config_cls`` of the options on every process (the
    threshold ``default_threshold`` unless given)."""
    threshold = detection.pop("threshold")
    rules = rules or {}
    if score_only is not None:
        _refuse_typed("--score-only", {"score_only", "threshold", *rules},
                      "rescores the stored detections of a finished run (at --threshold, if given)")
        stage.rescore(score_only, threshold, **rules)
        return
    if not model or output is None:
        raise UserError("pass --model NAME=ID_OR_PATH (one or more) and --output DIR, or --score-only DIR")
    from ._app import process_state, run_sharded

    state = process_state()
    cfg = config_cls(models=list(model), output=output, settings=settings.replace(device=str(state.device)),
                     threshold=default_threshold if threshold is None else threshold, **detection, **rules, **fields)
    run_sharded(stage.run, cfg, state)


@app.command()
@_friendly
@generation_options("fid", seed="Base seed of the generated images.")
def fid(
    model: Optional[list[str]] = typer.Option(None, help="NAME=ID_OR_PATH[,unet=PATH][,text_encoder=PATH][,lora=DIR[,lora_scale=S]] (repeatable; same seeds for all)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder: run.json, sets/, models/, stats/, summary.json/.md."),
    coco: Optional[Path] = typer.Option(None, help="COCO folder with annotations/captions_val2017.json and val2017/."),
    coco_captions: int = typer.Option(10_000, help="Captions drawn from COCO val2017 (the protocol: 10,000)."),
    flickr30k: Optional[Path] = typer.Option(None, help="Flickr30K folder: results_20130124.token (or results.csv) and the images."),
    flickr30k_pairs: int = typer.Option(1_000, help="Caption-image pairs drawn from Flickr30K (the protocol: 1,000)."),
    flickr30k_split: Optional[Path] = typer.Option(None, help="Image ids to draw from, one per line (Flickr30K Entities' val.txt)."),
    set_seed: int = typer.Option(0, help="Seed of the caption and pair draws (OUT/sets/ lists them)."),
    settings: GenerationSettings = FROM_OPTIONS,
    reference_size: int = typer.Option(512, help="Reference images: shorter side resized to this, centre-cropped."),
    inception: Optional[Path] = typer.Option(None, help="Inception weights file (default: the cache of `tcompose download fid`)."),
    clip_model: str = typer.Option(defaults.CLIP, help="CLIP of the CLIP score (hub id or folder); 'none' skips it."),
    feature_batch_size: int = typer.Option(32, help="Images per Inception / CLIP call."),
    cache_dir: Optional[Path] = typer.Option(None, help="Where reference statistics are cached (default ~/.cache/tcompose/fid)."),
) -> None:
    """FID on COCO (10k captions) and Flickr30K (1k pairs), CLIP score beside. Resumable."""
    if not model or output is None:
        raise UserError("pass --model NAME=ID_OR_PATH (one or more), --output DIR and --coco and/or --flickr30k")
    from ..evaluate.fid.stage import FidConfig, run
    from ._app import process_state, run_sharded

    state = process_state()
    cfg = FidConfig(models=list(model), output=output, coco=coco, coco_captions=coco_captions, flickr30k=flickr30k,
                    flickr30k_pairs=flickr30k_pairs, flickr30k_split=flickr30k_split, set_seed=set_seed,
                    settings=settings.replace(device=str(state.device)), reference_size=reference_size,
                    inception=inception, clip_model=None if clip_model.lower() == "none" else clip_model,
                    feature_batch_size=feature_batch_size, cache_dir=cache_dir)
    run_sharded(run, cfg, state)


@app.command()
@_friendly
@generation_options("latency", steps="Denoising steps (the paper: 50).",
                    seed="Seed of the timed images (image i: the seed of prompt 0, image i).")
def latency(
    model: list[str] = typer.Option(..., help="NAME=ID_OR_PATH[,unet=PATH][,text_encoder=PATH][,lora=DIR[,lora_scale=S]] (repeatable)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder: latency.json (a rerun adds or replaces models)."),
    images: int = typer.Option(5, help="Timed images per model (batch 1)."),
    warmup: int = typer.Option(1, help="Untimed images first (kernel selection, caches)."),
    settings: GenerationSettings = FROM_OPTIONS,
) -> None:
    """Seconds per image at the paper's setting (50 steps, batch 1), with the device named: Table 1's latency."""
    from ..evaluate.latency import LatencyConfig, run
    from ._app import process_state

    run(LatencyConfig(models=list(model), output=output, images=images, warmup=warmup,
                      settings=settings.replace(device=str(process_state().device))))


@app.command()
@_friendly
def table(
    multigen_coco: Optional[list[Path]] = typer.Option(None, metavar="DIR", help="A multigen --dataset coco run folder (or its summary*.json)."),
    multigen_ade20k: Optional[list[Path]] = typer.Option(None, metavar="DIR", help="A multigen --dataset ade20k run folder (or its summary*.json)."),
    visor: Optional[list[Path]] = typer.Option(None, metavar="DIR", help="A visor run folder (or its summary*.json)."),
    fid: Optional[list[Path]] = typer.Option(None, metavar="DIR", help="A fid run folder."),
    latency: Optional[list[Path]] = typer.Option(None, metavar="DIR", help="A latency folder."),
    geneval: Optional[list[Path]] = typer.Option(None, metavar="DIR", help="A geneval run folder, or its summary*.json (a --score-only rescoring's); adds the GenEval columns."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the Markdown here, and the JSON beside it (tab.md -> tab.json)."),
) -> None:
    """The paper's Table 1 from benchmark run folders, published rows beside; "not run" where nothing measured."""
    from ..evaluate.table import run

    def one(option: str, given: Optional[list[Path]]) -> Optional[Path]:
        if given and len(given) > 1:
            raise UserError(f"--{option} given {len(given)} times ({', '.join(map(str, given))}): the table takes one "
                            f"folder per option; run every model into one --output folder, or pass one of them")
        return given[0] if given else None

    run(one("multigen-coco", multigen_coco), one("multigen-ade20k", multigen_ade20k), one("visor", visor),
        one("fid", fid), one("latency", latency), output, geneval=one("geneval", geneval))


@app.command()
@_friendly
@generation_options("attnviz", seed="Seed (the image of `tcompose generate` prompt 0, image 0).")
def attnviz(
    output: Path = typer.Option(..., "--output", "-o", help="Figure PNG; the raw maps go beside it as .safetensors."),
    prompt: Optional[str] = typer.Option(None, help="The prompt (required unless --from-maps)."),
    model: Optional[list[str]] = typer.Option(None, help="NAME=ID_OR_PATH[,unet=PATH][,text_encoder=PATH][,lora=DIR[,lora_scale=S]], one per row (repeatable)."),
    words: Optional[str] = typer.Option(None, help="Comma-separated words/phrases of the prompt (default: its noun phrases)."),
    layers: Optional[str] = typer.Option(None, help="Captured attention: UNet blocks (down, mid, up) or groups (up_16, ...); SD3 / FLUX blocks (joint_7, double_11, ranges such as joint_4-9). Default: what TokenCompose supervises in the model's family (mid,up for the UNets)."),
    timesteps: str = typer.Option("all", help="Denoising step indices to average: all, or e.g. 0-24 or 0,10,20-."),
    settings: GenerationSettings = FROM_OPTIONS,
    panel: int = typer.Option(256, help="Panel side in pixels."),
    scale: str = typer.Option("per-map", help="per-map: each heat map to its own range; shared: one scale for the figure (compares models)."),
    from_maps: Optional[Path] = typer.Option(None, help="Redraw from a saved .safetensors instead of generating."),
) -> None:
    """Per-word cross-attention heat maps of several models on one seeded prompt (the paper's SD vs TokenCompose figure)."""
    from ..evaluate.attnviz import AttnvizConfig, draw_figure, load_maps, run

    if from_maps is not None:
        _refuse_typed("--from-maps", {"from_maps", "output", "panel", "scale"},
                      "redraws the figure from the saved maps (with --output, --panel and --scale)")
        draw_figure(load_maps(from_maps), output, panel, scale)
        return
    if not prompt or not model:
        raise UserError("pass --prompt and at least one --model NAME=ID_OR_PATH (or --from-maps FILE)")
    from ..models.spec import parse_model_specs

    cfg = AttnvizConfig(prompt=prompt, models=parse_model_specs(model), output=output,
                        words=list(_split(words)) if words else None, layers=_split(layers) if layers else None, timesteps=timesteps,
                        settings=settings, panel=panel, scale=scale)
    run(cfg)


@app.command()
@_friendly
@generation_options("multigen", seed="Base seed; image k of prompt p has the same seed for every model.")
@detection_options(detector=(defaults.OWLV2, "OWLv2 checkpoint (hub id or folder)."), detector_dtype="auto",
                   detector_batch_size=8)
def multigen(
    model: Optional[list[str]] = typer.Option(None, help="NAME=ID_OR_PATH[,unet=PATH][,text_encoder=PATH][,lora=DIR[,lora_scale=S]] (repeatable; same seeds for all)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder: run.json, models/, detections/, summary.json/.md, grid_NAME.png."),
    dataset: str = typer.Option("coco", help="Prompt set: coco or ade20k (the paper's; fetched at a pinned commit, sha256-checked, cached)."),
    prompt_file: Optional[Path] = typer.Option(None, help="Local copy of the dataset's prompt file (offline use; sha256-checked)."),
    custom_prompts: bool = typer.Option(False, help="Accept a --prompt-file of your own in the same format (no sha256 check)."),
    prompts: Optional[int] = typer.Option(None, help="Only the first N prompts (quick protocol: --prompts 50 --images 5)."),
    sample_seed: Optional[int] = typer.Option(None, help="Draw N new 5-category prompts from the dataset's categories with this seed."),
    images: int = typer.Option(10, help="Images per prompt (the paper: 10)."),
    settings: GenerationSettings = FROM_OPTIONS,
    detection: dict = FROM_OPTIONS,
    grid: int = typer.Option(4, help="Prompts shown in grid_NAME.png (0: none)."),
    score_only: Optional[Path] = typer.Option(None, help="Rescore the stored detections of this run folder (e.g. at another --threshold); loads no model."),
) -> None:
    """MultiGen: 5-category prompts -> images of each model -> OWLv2 -> MG1..MG5 beside the paper's rows. Resumable."""
    from ..evaluate.multigen import stage

    _detection_benchmark(stage, stage.MultigenConfig, model, output, score_only, settings, detection, dataset=dataset,
                         prompt_file=prompt_file, custom_prompts=custom_prompts, prompts=prompts,
                         sample_seed=sample_seed, images=images, grid=grid)


@app.command()
@_friendly
@generation_options("geneval", seed="Base seed; image k of prompt p has the same seed for every model.",
                    guidance="Classifier-free guidance scale (default: GenEval's generation script's 9 for SD1.x / "
                             "SD2.x / SDXL; the model card's for SD3 / FLUX: 7 / 4.5 / 3.5 for SD3-medium / "
                             "SD3.5-medium / SD3.5-large, 3.5 for FLUX.1-dev's embedded guidance, 0 for FLUX.1-schnell).")
@detection_options(detector=(defaults.MASK2FORMER, "COCO instance Mask2Former (hub id or folder)."),
                   detector_dtype=("fp32", "fp32 (as GenEval ran it), auto (fp16 on CUDA), fp16 or bf16."),
                   detector_batch_size=8,
                   store_threshold=(0.3, "Detections scoring above this are stored (and coloured)."),
                   threshold=(None, "Objects scoring above this count (GenEval: 0.3; --score-only: the run's)."))
def geneval(
    model: Optional[list[str]] = typer.Option(None, help="NAME=ID_OR_PATH[,unet=PATH][,text_encoder=PATH][,lora=DIR[,lora_scale=S]] (repeatable; same seeds for all)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder: run.json, models/, detections/, results_NAME.jsonl, summary.json/.md, grids."),
    prompt_file: Optional[Path] = typer.Option(None, help="Local copy of GenEval's evaluation_metadata.jsonl (offline use; sha256-checked)."),
    custom_prompts: bool = typer.Option(False, help="With --prompt-file: accept a file of your own in GenEval's layout, a subset of GenEval's included (no sha256 check)."),
    prompts: Optional[int] = typer.Option(None, help="Only the first N prompts (a quick look, not GenEval's protocol; a higher N later extends the folder)."),
    images: int = typer.Option(4, help="Images per prompt (GenEval: 4)."),
    settings: GenerationSettings = FROM_OPTIONS,
    detection: dict = FROM_OPTIONS,
    counting_threshold: float = typer.Option(0.9, help="Counting prompts: objects scoring above this count (GenEval: 0.9)."),
    max_objects: int = typer.Option(16, help="At most this many objects per class, highest score first (GenEval: 16)."),
    max_overlap: float = typer.Option(1.0, help="Drop an object whose IoU with a better one of its class is >= this (1: off, GenEval's default)."),
    position_threshold: float = typer.Option(0.1, help="Position prompts: share of the boxes' sizes an offset must pass (GenEval: 0.1)."),
    detector_size: int = typer.Option(800, help="Short side of the detector's input (GenEval's mmdet config: 800)."),
    clip_model: str = typer.Option(defaults.CLIP, help="CLIP of the colour classifier (GenEval: OpenAI ViT-L/14)."),
    grid: int = typer.Option(4, help="Prompts per task in grid_NAME_TAG.png (0: none)."),
    score_only: Optional[Path] = typer.Option(None, help="Rescore the stored detections of this run folder (other thresholds or rules) into summary_<rules>.json/.md and results_NAME_<rules>.jsonl; loads no model."),
) -> None:
    """GenEval: 553 prompts -> images -> Mask2Former + CLIP colours -> per-task and overall scores. Resumable."""
    from ..evaluate.geneval import stage

    rules = dict(counting_threshold=counting_threshold, max_objects=max_objects, max_overlap=max_overlap,
                 position_threshold=position_threshold)
    _detection_benchmark(stage, stage.GenevalConfig, model, output, score_only, settings, detection,
                         default_threshold=0.3, rules=rules, prompt_file=prompt_file, custom_prompts=custom_prompts,
                         prompts=prompts, images=images, detector_size=detector_size, clip_model=clip_model,
                         grid=grid)
