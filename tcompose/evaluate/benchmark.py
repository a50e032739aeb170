"""What the detection benchmarks (multigen, visor) share: their config's common fields (:class:`DetectionConfig`),
the settings check, run.json, the work split, the run up to scoring (:func:`run_models`: the generate-then-detect
pass of every model, waiting for other processes), progress, timing rates and the hub commit a model resolved to;
and what every benchmark (fid too) shares: the model check, each model's settings in run.json
(:func:`model_settings`) and the summary files.

Both stages' configs extend :class:`DetectionConfig` (the generation settings in it as one
:class:`tcompose.evaluate.settings.GenerationSettings`); their prompts have ``prompt_id``, ``text`` and
``to_dict()``.

A benchmark run generates images with :mod:`tcompose.evaluate.generate`, detects objects in them
(:mod:`tcompose.evaluate.detection_store`) and scores on rank 0. The j-th (prompt, image) of the run goes to
rank ``j % world_size`` for generation and detection alike, so a process detects the images it generated; rank 0
waits for every detection before scoring.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

from ..io.errors import UserError
from ..models.defaults import OWLV2
from .settings import GenerationSettings

if TYPE_CHECKING:
    from ..models.spec import ModelSpec
    from .generate import GenerateConfig

P = TypeVar("P")
RUN_JSON, PROMPTS_JSON = "run.json", "prompts.json"


@dataclass
class DetectionConfig:
    """What a detection benchmark's config holds besides its prompt choice: MultigenConfig, VisorConfig and
    GenevalConfig extend it (with their own defaults where the benchmarks differ; these are MultiGen's detector's)."""

    models: list[str]
    """``NAME=ID_OR_PATH[,unet=PATH][,text_encoder=PATH][,revision=REV]`` (tcompose.models.spec), one or more."""
    output: Path
    images: int = 1
    """Images per prompt."""
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    """How every model generates (the same seeds for all); its device runs the detector too."""
    detector: str = OWLV2
    detector_revision: str | None = None
    detector_dtype: str = "auto"
    """auto = fp16 on CUDA, fp32 elsewhere; or fp32, fp16, bf16."""
    detector_batch_size: int = 8
    store_threshold: float = 0.01
    """Boxes above this are stored (so other thresholds can be scored later)."""
    threshold: float = 0.1
    """Boxes above this count (0.1: MultiGen's and VISOR's)."""
    part_size: int = 200
    """Images per detections part file: the unit of resuming the detection pass."""

    def __post_init__(self):
        self.output = Path(self.output)
        self.models = list(self.models)

    def settings_for(self, spec: ModelSpec) -> GenerationSettings:
        """How ``spec``'s model generates: ``settings`` (a benchmark whose protocol sets a default for some models
        fills it in here, where the user gave none)."""
        return self.settings


def check_models(models: Sequence[str], rank: int, world_size: int) -> None:
    """What every benchmark (fid too) checks first: some ``--model``, and a rank within the world size."""
    if not models:
        raise UserError("no --model given: pass one or more NAME=ID_OR_PATH")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")


def check_settings(cfg: DetectionConfig, rank: int, world_size: int) -> list[ModelSpec]:
    """The checks every detection benchmark makes of its config before any work; returns the parsed models."""
    from ..models.spec import parse_model_specs

    check_models(cfg.models, rank, world_size)
    for key in ("images", "detector_batch_size", "part_size"):
        if getattr(cfg, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    cfg.settings.validate()
    if not 0 <= cfg.store_threshold <= cfg.threshold < 1:
        raise UserError(f"need 0 <= --store-threshold ({cfg.store_threshold}) <= --threshold ({cfg.threshold}) < 1")
    return parse_model_specs(cfg.models)


def generate_config(cfg: DetectionConfig, spec: ModelSpec, prompts: Sequence) -> GenerateConfig:
    """The GenerateConfig of one model of the run: ``cfg.images`` images of each prompt under models/NAME."""
    from .generate import model_config

    return model_config(spec, cfg.output / "models" / spec.name, [p.text for p in prompts],
                        [p.prompt_id for p in prompts], cfg.images, cfg.settings_for(spec),
                        excite_words=[list(p.categories) for p in prompts])


def model_settings(settings: GenerationSettings, specs: Sequence[ModelSpec],
                   config_of: Callable[[ModelSpec], GenerateConfig]) -> dict[str, dict]:
    """run.json's ``models``: each model's :func:`tcompose.evaluate.generate.settings_of` (what decides its
    images), ``config_of(spec)`` its GenerateConfig, at ``settings``' dtype on its device."""
    from .generate import settings_of
    from .sampling import dtype_name, resolve_device, resolve_dtype

    dtype = dtype_name(resolve_dtype(settings.dtype, resolve_device(settings.device)))
    return {s.name: settings_of(config_of(s), dtype) for s in specs}


def run_record(stage: str, cfg: DetectionConfig, specs: Sequence[ModelSpec], prompt_source: dict) -> dict:
    """run.json's content: what decides the images (each model's settings), the detections and the scores."""
    from .detect import resolve_dtype as det_dtype
    from .sampling import dtype_name, resolve_device

    models = model_settings(cfg.settings, specs, lambda s: generate_config(cfg, s, []))
    detection = {"detector": cfg.detector, "revision": cfg.detector_revision, "queries": "a photo of a {name}",
                 "dtype": dtype_name(det_dtype(cfg.detector_dtype, resolve_device(cfg.settings.device))),
                 "store_threshold": cfg.store_threshold, **getattr(cfg, "detection_record", lambda: {})()}
    return {"stage": stage, "prompt_source": prompt_source, "detection": detection, "models": models}


def check_protocol(cfg: DetectionConfig, specs: Sequence[ModelSpec], num_prompts: int) -> None:
    """A folder's summary scores every model in it on the same prompts x images, so a run may
    change ``--images`` or ``--prompts`` (raising them extends the folder) only when it names every model the
    folder holds: one that adds model B at another ``--images`` than model A's would rescore A on B's images
    and overwrite A's summary. Refused before any work, naming the models and the fix."""
    path = cfg.output / RUN_JSON
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # start_run reports an unreadable run.json
    others = [name for name in old.get("models", {}) if name not in {s.name for s in specs}]
    if not others:
        return
    for option, before, now in (("--images", old.get("images_per_prompt"), cfg.images),
                                ("--prompts", old.get("num_prompts"), num_prompts)):
        if before is not None and before != now:
            them = ", ".join(f"--model {n}=..." for n in others)
            raise UserError(f"{option} {now}: {path.parent} scores every model on the same prompts x images, and "
                            f"its model(s) {', '.join(others)} were run at {option} {before}: pass {option} {before} "
                            f"to add these models, name {them} too to change it for every model, or use a new "
                            "--output")


def run_models(stage: str, cfg: DetectionConfig, specs: Sequence[ModelSpec], prompts: Sequence, source: dict,
               detector_cls, rank: int, world_size: int, progress: bool, timeout_s: float
               ) -> tuple[list[str] | None, dict[str, Any], dict[str, dict]]:
    """A detection benchmark's run up to scoring: the detector checked, run.json checked and written, every
    model's images generated and this process's share detected; on rank 0, every process's detections waited
    for. Returns the names of the models to score (every model in the folder; None on other ranks), the timings
    and each model's generate summary. An output folder the run created and left empty is removed on failure."""
    from ..io.runs import output_guard

    with output_guard(cfg.output):
        detector_cls.check(cfg.detector, cfg.detector_revision)  # a wrong --detector fails before any image
        check_protocol(cfg, specs, len(prompts))
        run_path = start_run(cfg, run_record(stage, cfg, specs, source), prompts, rank, world_size)
        timing, generation = generate_and_detect(cfg, specs, prompts, detector_cls, rank, world_size, progress,
                                                 timeout_s)
        if rank != 0:
            return None, timing, generation
        timing, generation = recorded_timing(cfg.output, run_path, timing, generation, detected=timing["detected"])
        return finish_run(cfg, specs, prompts, run_path, timing, timeout_s), timing, generation


def recorded_timing(output: Path, run_path: Path, timing: dict | None, generation: dict[str, dict],
                    detected: int = 0) -> tuple[dict | None, dict[str, dict]]:
    """A rerun of a finished run (no image generated, none ``detected``) keeps the timings recorded by the run
    that did the work: run.json's ``timing`` (``timing`` None: none kept there) and each generate summary of the
    folder's summary.json. Any other run's own ``timing`` and ``generation`` are returned unchanged."""
    if detected or any(g.get("generated") for g in generation.values()):
        return timing, generation
    def recorded(path: Path, key: str):
        try:
            return json.loads(path.read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            return None

    old_timing = recorded(run_path, "timing")
    old_generation = recorded(Path(output) / "summary.json", "generation") or {}
    if timing is not None and old_timing is not None:
        timing = old_timing
    return timing, {name: old_generation.get(name, summary) for name, summary in generation.items()}


def start_run(cfg: DetectionConfig, record: dict, prompts: Sequence, rank: int, world_size: int) -> Path:
    """Check ``record`` against the folder's run.json (every process) and write it with prompts.json (rank 0)."""
    from ..io.datasets import library_versions, write_json_atomic

    run_path = cfg.output / RUN_JSON
    merged = merge_run_json(run_path, record)
    if rank == 0:
        cfg.output.mkdir(parents=True, exist_ok=True)
        merged.update(num_prompts=len(prompts), images_per_prompt=cfg.images, threshold=cfg.threshold,
                      world_size=world_size, versions=library_versions())
        write_json_atomic(run_path, merged)
        write_json_atomic(cfg.output / PROMPTS_JSON, [p.to_dict() for p in prompts])
    return run_path


def generate_and_detect(cfg: DetectionConfig, specs: Sequence[ModelSpec], prompts: Sequence, detector_cls, rank: int,
                        world_size: int, progress: bool, timeout_s: float) -> tuple[dict[str, Any], dict[str, dict]]:
    """Every model generates its images (tcompose.evaluate.generate), then this process detects its share of them
    with ``detector_cls.load(...)`` (loaded once, only if some image lacks detections). Returns the timings and
    each model's generate summary."""
    from ..io.runs import kept_on_interrupt
    from .detection_store import detect_images, stored_keys
    from .generate import image_filename
    from .generate import run as generate_run
    from .sampling import resolve_device

    timing: dict[str, Any] = {"generation_s": 0.0, "detection_s": 0.0, "detector_load_s": 0.0, "detected": 0}
    generation = {}
    for spec in specs:
        summary = generate_run(generate_config(cfg, spec, prompts), rank, world_size, progress, timeout_s)
        generation[spec.name] = summary
        timing["generation_s"] += summary.get("generation_seconds") or 0.0
    share = my_share(prompts, cfg.images, rank, world_size)
    detector = None
    for spec in specs:
        folder = cfg.output / "detections" / spec.name
        done = stored_keys(folder)
        todo = [(p, k) for p, k in share if (p.prompt_id, k) not in done]
        if not todo:
            continue
        image_dir = cfg.output / "models" / spec.name / "images"
        wait_for_files([image_dir / image_filename(p.prompt_id, k) for p, k in todo], timeout_s)
        if detector is None:
            t0 = time.perf_counter()
            detector = detector_cls.load(cfg.detector, cfg.detector_revision,
                                         str(resolve_device(cfg.settings.device)), cfg.detector_dtype)
            timing["detector_load_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        kept = lambda: (f"detections of {len(share) - len(todo) + len(stored_keys(folder) - done)} of {len(share)} "  # noqa: E731
                        f"images of {spec.name} kept in {folder}")
        with kept_on_interrupt(kept), CountBar(progress and rank == 0, f"detect {spec.name}", len(todo)) as advance:
            timing["detected"] += detect_images(detector, spec.name, cfg.output, image_dir, image_filename, todo,
                                                folder, cfg.store_threshold, cfg.detector_batch_size, cfg.part_size,
                                                rank, advance)
        timing["detection_s"] += time.perf_counter() - t0
    return detection_rates(timing), generation


def finish_run(cfg: DetectionConfig, specs: Sequence[ModelSpec], prompts: Sequence, run_path: Path, timing: dict,
               timeout_s: float) -> list[str]:
    """Rank 0, before scoring: wait for every process's detections, record the hub commits and timings in
    run.json; returns the names of every model in the folder (earlier runs' models into it too)."""
    from ..io.datasets import write_json_atomic

    keys = {(p.prompt_id, k) for p in prompts for k in range(cfg.images)}
    for spec in specs:
        wait_for_detections(cfg.output / "detections" / spec.name, keys, timeout_s)
    commits = {s.name: hub_commit(s.model, s.revision) for s in specs}
    commits["detector"] = hub_commit(cfg.detector, cfg.detector_revision)
    write_json_atomic(run_path, {**json.loads(run_path.read_text()), "hub_commits": commits, "timing": timing})
    return list(json.loads(run_path.read_text())["models"])


#: run.json keys -> the option that sets them, for refusals that name what differs (other keys are named as is).
OPTION_OF = {"steps": "--steps", "guidance": "--guidance", "seed": "--seed", "height": "--height",
             "width": "--width", "dtype": "--dtype", "scheduler": "--scheduler", "safety_checker": "--safety-checker",
             "revision": "revision=", "unet": "unet=", "text_encoder": "text_encoder=", "lora": "lora=",
             "lora_scale": "lora_scale=", "attend_excite": "--attend-excite", "model": "the model",
             "file": "--prompt-file", "sha256": "the prompt file's sha256", "kind": "the prompt kind",
             "dataset": "--dataset", "sample_seed": "--sample-seed", "prompt_seed": "--prompt-seed",
             "images_per_prompt": "--images", "detector": "--detector", "store_threshold": "--store-threshold",
             "input_short_side": "--detector-size", "color_clip": "--clip-model",
             "color_clip_revision": "the colour CLIP's revision"}

DETECTION_OPTIONS = {"revision": "--detector-revision", "dtype": "--detector-dtype"}


def describe_changes(old: dict, new: dict, names: dict[str, str] = OPTION_OF) -> str:
    """What differs between two records, one ``option old -> new`` per key (``--steps 50 -> 20``); a key only
    one side has reads ``(none)`` on the other."""
    def show(v) -> str:
        return "(none)" if v is None else (json.dumps(v) if isinstance(v, (dict, list)) else str(v))

    keys = list(dict.fromkeys([*old, *new]))
    changed = [f"{names.get(k, k)} {show(old.get(k))} -> {show(new.get(k))}" for k in keys if old.get(k) != new.get(k)]
    return ", ".join(changed) or "(no field differs)"


def merge_run_json(path: Path, record: dict, fixed: Sequence[str] = ("prompt_source", "detection")) -> dict:
    """The run.json to write: refuses other ``fixed`` settings (the prompts, the detector) or other settings of
    a model already in the folder, naming each field that differs and its old and new value; adds new models."""
    if not path.is_file():
        return record
    old = json.loads(path.read_text())
    for key in fixed:
        if old.get(key) != record[key]:
            before, after = old.get(key), record[key]
            names = {**OPTION_OF, **DETECTION_OPTIONS} if key == "detection" else OPTION_OF
            what = (describe_changes(before, after, names) if isinstance(before, dict) and isinstance(after, dict)
                    else f"{before} -> {after}")
            raise UserError(f"{path}: this folder was run with other {key.replace('_', ' ')}: {what}; use a new "
                             "--output, or the same settings")
    for name, settings in record["models"].items():
        if name in old.get("models", {}) and old["models"][name] != settings:
            raise UserError(f"{path}: model {name!r} was generated with other settings: "
                             f"{describe_changes(old['models'][name], settings)}; give it another NAME= or use a new "
                             "--output")
    return {**old, **record, "models": {**old.get("models", {}), **record["models"]}}


def read_run(output: Path, stage: str, threshold: float | None) -> tuple[dict, float, list[dict]]:
    """``--score-only``: a finished run's run.json, the threshold to score at (default: the run's; never below the
    stored detections') and its prompts.json, checked to be a ``stage`` run."""
    run_path, prompts_path = Path(output) / RUN_JSON, Path(output) / PROMPTS_JSON
    if not Path(output).exists():
        raise UserError(f"{output}: the folder does not exist; --score-only takes the --output folder of a finished "
                        f"tcompose {stage} run")
    if not Path(output).is_dir():
        raise UserError(f"{output}: not a folder; --score-only takes the --output folder of a finished tcompose "
                        f"{stage} run")
    if not run_path.is_file() or not prompts_path.is_file():
        raise UserError(f"{output}: no {RUN_JSON} / {PROMPTS_JSON}; --score-only takes the --output folder of a "
                         f"tcompose {stage} run")
    meta = json.loads(run_path.read_text())
    if meta.get("stage") != stage:
        raise UserError(f"{output} holds a {meta.get('stage')!r} run, not a tcompose {stage} one")
    thr = meta["threshold"] if threshold is None else threshold
    stored = meta["detection"]["store_threshold"]
    if not stored <= thr < 1:
        raise UserError(f"--threshold {thr} is below the stored detections' threshold {stored} (or >= 1): "
                         "boxes under it were not kept")
    return meta, thr, json.loads(prompts_path.read_text())


def write_summary(output: Path, summary: dict, markdown: str, progress: bool, suffix: str = "") -> None:
    """``summary{suffix}.json`` and ``summary{suffix}.md`` of a scored run (any evaluation stage); the table is
    printed to stderr when ``progress``."""
    from ..io.datasets import write_json_atomic, write_text_atomic

    write_json_atomic(Path(output) / f"summary{suffix}.json", summary)
    write_text_atomic(Path(output) / f"summary{suffix}.md", markdown)
    if progress:
        from rich.console import Console

        Console(stderr=True).print(markdown, highlight=False, markup=False)


def my_share(prompts: Sequence[P], images: int, rank: int, world_size: int) -> list[tuple[P, int]]:
    """This process's (prompt, image index) pairs: every world_size-th, as tcompose.evaluate.generate splits them."""
    return [(p, k) for p in prompts for k in range(images)][rank::world_size]


def image_rows(stored: dict, prompts: Sequence[P], images: int) -> Iterator[tuple[P, int, dict | None]]:
    """Each (prompt, image index, its row of ``stored`` detections or None) of a run, prompt by prompt: what a
    benchmark scores (``stored``: :func:`tcompose.evaluate.detection_store.read_records` of one model)."""
    for p in prompts:
        for k in range(images):
            yield p, k, stored.get((p.prompt_id, k))


def wait_for_files(paths: list[Path], timeout_s: float) -> None:
    """Wait until every path exists (images other processes generate)."""
    deadline = time.monotonic() + timeout_s
    while missing := [p for p in paths if not p.exists()]:
        if time.monotonic() > deadline:
            raise UserError(f"{len(missing)} images (e.g. {missing[0]}) did not appear within {timeout_s:g} s; "
                             "run the same command again to finish them")
        time.sleep(1.0)


def wait_for_detections(folder: Path, keys: set, timeout_s: float, poll_s: float = 2.0) -> None:
    """Wait until a model's detections folder holds every (prompt_id, image_index) of ``keys``."""
    from .detection_store import stored_keys

    deadline = time.monotonic() + timeout_s
    while missing := keys - stored_keys(folder):
        if time.monotonic() > deadline:
            raise UserError(f"{folder}: detections of {len(missing)} images (e.g. prompt {min(missing)[0]}) did not "
                             f"appear within {timeout_s:g} s; run the same command again to finish them")
        time.sleep(poll_s)


def hub_commit(name: str, revision: str | None) -> str | None:
    """The commit a hub id resolved to in the local cache (None for a local folder or an uncached id)."""
    try:
        from huggingface_hub import snapshot_download

        from ..models.loading import local_path

        if local_path(name) is not None:
            return None
        return Path(snapshot_download(name, revision=revision, local_files_only=True)).name
    except Exception:  # noqa: BLE001 (only informative)
        return None


def detection_rates(t: dict) -> dict:
    """Timings rounded, with detection images/s and detection's time over generation's."""
    t = {k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()}
    t["detection_images_per_s"] = round(t["detected"] / t["detection_s"], 4) if t["detection_s"] else None
    t["detection_over_generation"] = round(t["detection_s"] / t["generation_s"], 4) if t["generation_s"] else None
    return t


class CountBar:
    """A rich progress bar (or nothing); ``with CountBar(enabled, label, total) as advance: advance(n)``."""

    def __init__(self, enabled: bool, label: str, total: int):
        self.progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn())
            self.task = self.progress.add_task(label, total=total)

    def __enter__(self):
        if self.progress is None:
            return lambda n: None
        self.progress.__enter__()
        return lambda n: self.progress.advance(self.task, n)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False
