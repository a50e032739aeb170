"""The generate stage: prompts -> seeded PNGs + a generations table (Parquet).

Runbook::

    tcompose generate --model CompVis/stable-diffusion-v1-4 --prompt "a cat and a wine glass" \\
        --images-per-prompt 4 --output gen/sd14
    # a train-unet run (OUT is a pipeline folder), prompts from a file, DDIM, bf16
    tcompose generate --model runs/tc --prompts prompts.txt --images-per-prompt 10 --output gen/tc \\
        --scheduler ddim --dtype bf16 --batch-size 8
    # only swap the UNet (OUT or OUT/unet) or the text encoder of a base model
    tcompose generate --model CompVis/stable-diffusion-v1-4 --unet runs/tc --prompts prompts.txt --output gen/tc
    # several GPUs: each process takes every world_size-th image; the main one writes the table at the end
    accelerate launch --multi_gpu --num_processes 8 -m tcompose generate --model runs/tc --prompts p.txt --output gen/tc
    # killed? run the same command again: PNGs already on disk are kept (and checked), the rest are made

Images are ``OUTPUT/images/{prompt_id:05d}_{image_index:02d}.png``. Image ``k`` of prompt ``p`` starts from
noise seeded by :func:`image_seed` ``(seed, p, k)`` (see :mod:`tcompose.evaluate.sampling`), so it is the same image
whatever the batch size or the number of processes (up to float rounding of batched kernels: at most one
grey level on rare pixels). A PNG is written under a temporary name and renamed; it carries a ``tcompose``
text chunk (prompt, seed, settings fingerprint, NSFW flag), which a rerun checks before skipping it: a
folder generated with other settings is never mixed into. A PNG that is not whole (truncated, no PNG) is
redrawn, never counted as done.

At the end the main process writes ``OUTPUT/generations.parquet`` (one row per image of the folder, so a
rerun with fewer prompts or images keeps those of earlier runs: ``prompt_id``,
``image_index``, ``seed``, ``prompt``, ``file`` (relative to OUTPUT), ``model`` (the label), ``settings``
(JSON), ``nsfw`` (null without the safety checker)) and ``OUTPUT/run.json`` (settings, library versions,
summary).

Prompts file (``--prompts``): one prompt per line, blank lines and lines starting with ``#`` ignored; or a
``.json`` file holding a list of strings. Prompt ids are positions in that list.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..io.errors import MissingPathError, UserError
from ..io.files import check_output_folder
from ..io.runs import files_kept, kept_on_interrupt, model_id, output_guard
from ..models.sampling import image_seed
from ..models.spec import ModelSpec
from .sampling import load_pipeline  # noqa: F401  (part of this module's interface)
from .settings import GenerationSettings

__all__ = ["GenerateConfig", "image_seed", "image_filename", "read_prompts", "load_pipeline", "run",
           "write_images", "settings_of", "TABLE", "RUN_JSON"]

TABLE = "generations.parquet"
RUN_JSON = "run.json"
IMAGES = "images"
_PNG_KEY = "tcompose"


@dataclass
class GenerateConfig:
    """Settings of ``tcompose generate``."""

    model: str
    """Hub id or local diffusers folder (a train-unet OUT is one)."""
    output: Path
    """Writes ``output/images/*.png``, ``output/generations.parquet`` and ``output/run.json``."""
    prompts: list[str]
    prompt_ids: list[int] | None = None
    """Ids of ``prompts`` (seeds and file names use them); None: 0..len(prompts)-1."""
    images_per_prompt: int = 1
    unet: str | None = None
    """A UNet folder, or a folder with ``unet/`` (a train-unet OUT), replacing the model's UNet."""
    text_encoder: str | None = None
    """A CLIP text model (hub id or folder; :func:`tcompose.models.load_text_encoder` rules)."""
    revision: str | None = None
    lora: str | None = None
    """LoRA adapters (a train-unet --lora-rank OUT) merged into the UNet; a LoRA OUT as ``model`` needs none."""
    lora_scale: float = 1.0
    name: str | None = None
    """The model's label in the table (default: ``model``)."""
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    excite_words: list[list[str]] | None = None
    """With Attend-and-Excite: the words each prompt excites (a benchmark's object names); None: the settings'
    ``--excite-words``, else each prompt's noun phrases."""
    """Steps, guidance, scheduler, size, dtype, batch size, safety checker, seed, device."""

    def __post_init__(self):
        self.output = Path(self.output)
        self.prompts = list(self.prompts)
        if self.prompt_ids is None:
            self.prompt_ids = list(range(len(self.prompts)))
        self.prompt_ids = [int(i) for i in self.prompt_ids]


def model_config(spec: ModelSpec, output: Path, prompts: list[str], prompt_ids: list[int], images_per_prompt: int,
                 settings: GenerationSettings, excite_words: list[list[str]] | None = None) -> GenerateConfig:
    """The GenerateConfig of one ``--model`` spec in a benchmark: its prompts and folder, and the run's settings
    (``excite_words``: each prompt's object names, what Attend-and-Excite excites there)."""
    return GenerateConfig(
        model=spec.model, output=output, prompts=prompts, prompt_ids=prompt_ids, images_per_prompt=images_per_prompt,
        unet=spec.unet, text_encoder=spec.text_encoder, revision=spec.revision, lora=spec.lora,
        lora_scale=spec.lora_scale, name=spec.name, settings=settings, excite_words=excite_words)


def image_filename(prompt_id: int, image_index: int) -> str:
    """``"00012_03.png"`` for prompt 12, image 3."""
    return f"{int(prompt_id):05d}_{int(image_index):02d}.png"


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file (one per line; blank and ``#`` lines ignored) or a ``.json`` list of strings."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"--prompts {path}: file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e}); expected a list of prompt strings") from None
        if not isinstance(data, list) or not all(isinstance(p, str) and p.strip() for p in data):
            raise UserError(f"{path}: expected a JSON list of non-empty prompt strings")
        prompts = [p.strip() for p in data]
    else:
        prompts = [line.strip() for line in text.splitlines()]
        prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"{path}: no prompts in it")
    return prompts


def _check(cfg: GenerateConfig, rank: int, world_size: int) -> None:
    if not cfg.prompts:
        raise UserError("no prompts: pass --prompt TEXT or --prompts FILE")
    if any(not p.strip() for p in cfg.prompts):
        raise UserError("an empty prompt was given; every prompt needs text")
    if len(cfg.prompt_ids) != len(cfg.prompts):
        raise ValueError(f"{len(cfg.prompt_ids)} prompt ids for {len(cfg.prompts)} prompts")
    if len(set(cfg.prompt_ids)) != len(cfg.prompt_ids) or min(cfg.prompt_ids) < 0:
        raise ValueError("prompt ids must be distinct and >= 0 (they name the image files)")
    if cfg.images_per_prompt < 1:
        raise UserError(f"--images-per-prompt must be >= 1, got {cfg.images_per_prompt}")
    cfg.settings.validate()
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")


def settings_of(cfg: GenerateConfig, dtype: str) -> dict[str, Any]:
    """What decides the images (their fingerprint), resolved from configs without loading weights."""
    from .sampling import check_image_size, model_facts

    facts = model_facts(cfg.model, cfg.unet, cfg.revision, cfg.settings.scheduler)
    s = cfg.settings.resolved(facts["sampling_defaults"])  # the model's steps and guidance where none are given
    check_image_size(s.height, s.width, facts)
    if s.excite is not None:
        check_excite(s, facts)
    return {
        "model": model_id(cfg.model), "unet": model_id(cfg.unet), "text_encoder": model_id(cfg.text_encoder),
        **({"lora": model_id(cfg.lora), "lora_scale": cfg.lora_scale} if cfg.lora else {}),
        "revision": cfg.revision, "scheduler": facts["scheduler"], "steps": s.steps, "guidance": s.guidance,
        "height": s.height or facts["size"], "width": s.width or facts["size"], "dtype": dtype,
        "safety_checker": s.safety_checker, "seed": s.seed,
        **({"attend_excite": s.excite.record()} if s.excite is not None else {}),
    }


def check_excite(s: GenerationSettings, facts: dict) -> None:
    """Before any weight loads: Attend-and-Excite serves the model's family and finds maps at ``--excite-res``."""
    from ..models.families import family_of
    from ..models.sampling import check_excitable, excite_groups

    config = facts["unet_config"]
    family = family_of(config)
    check_excitable(family)
    f = facts["vae_factor"]
    h, w = (s.height or facts["size"]), (s.width or facts["size"])
    excite_groups(family.attention_groups(config, (h // f, w // f)), s.excite.resolution, f"{h}x{w} px")


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _read_png(path: Path) -> tuple[bool, dict | None]:
    """Whether ``path`` reads as a whole PNG (every chunk to the end, checksums checked), and its ``tcompose``
    metadata (None when it has none). A truncated file or one that is no PNG is not intact: a rerun redraws it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            raw, fmt = im.info.get(_PNG_KEY), im.format
            im.verify()
    except Exception:  # noqa: BLE001  (PIL raises OSError, SyntaxError, struct.error, ... on a damaged file)
        return False, None
    if fmt != "PNG":
        return False, None
    try:
        meta = json.loads(raw) if raw else None
    except (json.JSONDecodeError, TypeError):
        meta = None
    return True, meta if isinstance(meta, dict) else None


_IMAGE_NAME = re.compile(r"^(\d{5,})_(\d{2,})\.png$")


def _check_existing(path: Path, meta: dict | None, prompt: str, seed: int, fingerprint: str) -> dict:
    if meta is None:
        raise UserError(f"{path}: exists but was not written by tcompose generate (no readable metadata); "
                         "delete it or write to a new --output")
    if meta.get("fingerprint") != fingerprint or meta.get("prompt") != prompt or meta.get("seed") != seed:
        raise UserError(f"{path}: generated with other settings or another prompt ({meta.get('prompt')!r}); "
                         f"write to a new --output or delete {path.parent}")
    return meta


def _save_png(image: np.ndarray, path: Path, meta: dict) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(_PNG_KEY, json.dumps(meta))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def _bar(enabled: bool, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not enabled)
    return bar, bar.add_task("generate", total=total)


def write_images(pipe, cfg: GenerateConfig, jobs: list[tuple[int, int, str, int]], images: Path,
                 fingerprint: str = "", label: str = "", progress: bool = False, embeddings=None) -> float:
    """Generate and write the PNGs of ``jobs`` ``(prompt_id, image_index, prompt, seed)`` with a loaded
    pipeline, ``cfg.settings.batch_size`` at a time; returns the seconds taken. The hot loop of :func:`run` (and of
    ``benchmarks/generate.py``)."""
    import torch

    from ..models.sampling import PromptEmbeddings, generate_batch

    s = cfg.settings
    embeddings = embeddings or PromptEmbeddings(pipe)
    excited = excite_positions(pipe, cfg, {(j[0], j[2]) for j in jobs}) if s.excite is not None else {}
    bar, task = _bar(progress, len(jobs))
    pending: list[Future] = []
    t0 = time.perf_counter()
    # PNG encoding (zlib releases the GIL) overlaps the next batch; at most two batches wait to be written.
    with bar, ThreadPoolExecutor(max_workers=2) as pool, torch.inference_mode():
        for start in range(0, len(jobs), s.batch_size):
            batch = jobs[start : start + s.batch_size]
            arrays, nsfw = generate_batch(pipe, [j[2] for j in batch], [j[3] for j in batch], s.steps, s.guidance,
                                          s.height, s.width, embeddings, s.excite, [excited.get(j[0]) for j in batch])
            while len(pending) > 2 * s.batch_size:
                pending.pop(0).result()
            for i, (pid, k, prompt, seed) in enumerate(batch):
                meta = {"prompt_id": pid, "image_index": k, "seed": seed, "prompt": prompt, "model": label,
                        "fingerprint": fingerprint, "nsfw": None if nsfw is None else nsfw[i]}
                pending.append(pool.submit(_save_png, arrays[i], images / image_filename(pid, k), meta))
            bar.advance(task, len(batch))
        for f in pending:
            f.result()
    return time.perf_counter() - t0


def excite_positions(pipe, cfg: GenerateConfig, prompts: set[tuple[int, str]]) -> dict[int, list[int]]:
    """Prompt id -> the token positions Attend-and-Excite excites in it (every token of every word, flattened):
    the words of ``cfg.excite_words`` (a benchmark's objects), else ``--excite-words`` (each must be in every
    prompt), else the prompt's noun phrases. A benchmark object or noun phrase not among the prompt's tokens is
    left out (a prompt with none left samples plainly)."""
    from ..data.text import noun_phrases
    from ..models.families import components_of_pipeline
    from ..models.sampling import excite_positions as positions

    comps = components_of_pipeline(pipe)
    given = dict(zip(cfg.prompt_ids, cfg.excite_words)) if cfg.excite_words is not None else None
    chosen = cfg.settings.excite.words
    return {pid: positions(comps, prompt, given[pid] if given is not None else chosen or noun_phrases(prompt),
                           required=given is None and bool(chosen))
            for pid, prompt in sorted(prompts)}


def _wait_for(paths: list[Path], timeout_s: float, poll_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    missing = [p for p in paths if not p.exists()]
    while missing:
        left = deadline - time.monotonic()
        if left <= 0:
            raise UserError(f"{len(missing)} images (e.g. {missing[0]}) did not appear within {timeout_s:g} s; "
                             "run the same command again to finish them")
        time.sleep(min(poll_s, left))
        missing = [p for p in missing if not p.exists()]


def _write_table(cfg: GenerateConfig, jobs: list[tuple[int, int, str, int]], settings: dict, fingerprint: str,
                 label: str) -> tuple[Path, int]:
    """Write the table of every image in the folder: ``jobs`` (this run's) and those of earlier runs with the same
    settings (a rerun with fewer prompts or images keeps them); an image with other settings is refused. Returns
    (its path, its rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..io.datasets import library_versions

    images = cfg.output / IMAGES
    wanted = {(pid, k): (prompt, seed) for pid, k, prompt, seed in jobs}
    rows = []  # (prompt_id, image_index, prompt, seed, nsfw): this run's images and every other one in the folder
    for path in sorted(images.iterdir()):
        name = _IMAGE_NAME.match(path.name)
        if name is None:
            continue
        key = (int(name[1]), int(name[2]))
        intact, meta = _read_png(path)
        if not intact:
            what = ("is being redrawn by another process or was damaged since: run the same command again"
                    if key in wanted else "is not among this run's images, so it cannot be redrawn: delete it, "
                    "or run again with the prompts and --images-per-prompt that made it")
            raise UserError(f"{path}: damaged (not a whole PNG) and {what}")
        if key in wanted:
            prompt, seed = wanted.pop(key)
        else:  # an image of an earlier run into this folder (more prompts or images): kept in the table
            prompt, seed = (meta or {}).get("prompt"), (meta or {}).get("seed")
        meta = _check_existing(path, meta, prompt, seed, fingerprint)
        if (meta.get("prompt_id"), meta.get("image_index")) not in (key, (None, None)):
            raise UserError(f"{path}: its metadata names image {meta.get('image_index')} of prompt "
                            f"{meta.get('prompt_id')} (renamed?); delete it or write to a new --output")
        rows.append((*key, prompt, seed, meta.get("nsfw")))
    if wanted:  # _wait_for saw them: removed since
        (pid, k), _ = next(iter(wanted.items()))
        raise UserError(f"{len(wanted)} images (e.g. {images / image_filename(pid, k)}) are missing; "
                        "run the same command again to make them")
    rows.sort(key=lambda r: r[:2])
    jobs = [(pid, k, prompt, seed) for pid, k, prompt, seed, _ in rows]
    nsfw = [r[4] for r in rows]
    text = json.dumps({**settings, "versions": library_versions()}, sort_keys=True)
    table = pa.table({
        "prompt_id": pa.array([j[0] for j in jobs], pa.int64()),
        "image_index": pa.array([j[1] for j in jobs], pa.int32()),
        "seed": pa.array([j[3] for j in jobs], pa.int64()),
        "prompt": pa.array([j[2] for j in jobs], pa.string()),
        "file": pa.array([f"{IMAGES}/{image_filename(j[0], j[1])}" for j in jobs], pa.string()),
        "model": pa.array([label] * len(jobs), pa.string()),
        "settings": pa.array([text] * len(jobs), pa.string()),
        "nsfw": pa.array(nsfw, pa.bool_()),
    })
    out = cfg.output / TABLE
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    for stale in images.glob(".*.tmp"):  # left by killed runs; every process has finished writing by now
        stale.unlink(missing_ok=True)
    return out, len(rows)


def run(cfg: GenerateConfig, rank: int = 0, world_size: int = 1, progress: bool = True,
        finalize_timeout_s: float = 86400.0) -> dict:
    """Generate this process's share of the images; the main process (rank 0) then waits for every PNG (at
    most ``finalize_timeout_s``) and writes the table and run.json. Returns a summary dict: ``images`` (this
    process's share), ``generated``, ``skipped_existing``, ``seconds``, ``images_per_s`` (generated images
    per second of generation, model loading excluded), ``rank``, ``world_size`` (+ ``table`` on rank 0)."""
    _check(cfg, rank, world_size)
    check_output_folder(cfg.output, "--output", inside=(IMAGES,))  # before the model loads
    with output_guard(cfg.output):  # a model that fails to load leaves no empty folder behind
        return _run(cfg, rank, world_size, progress, finalize_timeout_s)


def _run_config(cfg: GenerateConfig) -> dict[str, Any]:
    """run.json's ``config``: the config's fields but the prompts, the settings' fields flat in it."""
    fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
              if k not in ("prompts", "prompt_ids", "settings") and not (k == "excite_words" and v is None)}
    return {**fields, **cfg.settings.as_dict()}


def _run(cfg: GenerateConfig, rank: int, world_size: int, progress: bool, finalize_timeout_s: float) -> dict:
    from ..io.datasets import library_versions, write_json_atomic
    from .sampling import dtype_name, resolve_device, resolve_dtype

    t0 = time.monotonic()
    device = resolve_device(cfg.settings.device)
    settings = settings_of(cfg, dtype_name(resolve_dtype(cfg.settings.dtype, device)))
    cfg = replace(cfg, settings=cfg.settings.replace(steps=settings["steps"], guidance=settings["guidance"]))
    s = cfg.settings
    fingerprint = _fingerprint(settings)
    label = cfg.name or cfg.model
    jobs = [(pid, k, prompt, image_seed(s.seed, pid, k))
            for pid, prompt in zip(cfg.prompt_ids, cfg.prompts) for k in range(cfg.images_per_prompt)]
    mine = jobs[rank::world_size]
    images = cfg.output / IMAGES
    images.mkdir(parents=True, exist_ok=True)
    todo, redrawn = [], 0
    for job in mine:
        path = images / image_filename(job[0], job[1])
        if path.exists():
            intact, meta = _read_png(path)
            if intact:
                _check_existing(path, meta, job[2], job[3], fingerprint)
                continue
            path.unlink(missing_ok=True)  # truncated or no PNG (a kill mid-copy, a bad disk): never counted as done
            redrawn += 1
        todo.append(job)
    gen_s = 0.0
    paths = [images / image_filename(j[0], j[1]) for j in jobs]
    with kept_on_interrupt(lambda: files_kept(paths, "images", images)):  # Ctrl-C: what is on disk stays
        if todo:
            pipe = load_pipeline(cfg.model, unet=cfg.unet, text_encoder=cfg.text_encoder, revision=cfg.revision,
                                 lora=cfg.lora, lora_scale=cfg.lora_scale, dtype=s.dtype, scheduler=s.scheduler,
                                 safety_checker=s.safety_checker, device=s.device)
            gen_s = write_images(pipe, cfg, todo, images, fingerprint, label, progress and rank == 0)
            del pipe
        if rank == 0:
            _wait_for(paths, finalize_timeout_s)
    summary: dict[str, Any] = {
        "images": len(mine), "generated": len(todo), "skipped_existing": len(mine) - len(todo),
        "redrawn_damaged": redrawn,
        "seconds": round(time.monotonic() - t0, 3), "generation_seconds": round(gen_s, 3),
        "images_per_s": round(len(todo) / gen_s, 4) if gen_s > 0 else None, "rank": rank, "world_size": world_size,
    }
    if rank != 0:
        return summary
    table, table_rows = _write_table(cfg, jobs, settings, fingerprint, label)
    summary.update(table=str(table), total_images=table_rows, seconds=round(time.monotonic() - t0, 3))
    run_config = _run_config(cfg)
    write_json_atomic(cfg.output / RUN_JSON, {
        "stage": "generate", "settings": settings, "fingerprint": fingerprint, "model_label": label,
        "prompts": len(cfg.prompts), "config": run_config, "versions": library_versions(), "summary": summary,
    })
    if progress:
        from rich.console import Console

        rate = f", {summary['images_per_s']:.3g} images/s" if summary["images_per_s"] else ""
        damaged = f" ({redrawn} damaged on disk, redrawn)" if redrawn else ""
        kept = len(jobs) != table_rows and f", {table_rows - len(jobs)} more from earlier runs kept in {TABLE}" or ""
        Console(stderr=True).print(f"generate: {summary['generated']} generated{damaged}, {summary['skipped_existing']} "
                                   f"already on disk{kept}{rate} -> {cfg.output}", highlight=False)
    return summary
