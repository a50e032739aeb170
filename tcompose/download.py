"""`tcompose download`: put every model and prompt set a command will use into the caches ahead of time.

Runbook::

    tcompose download                       # everything the default commands use (all stages)
    tcompose download multigen train-unet   # only what those commands use
    tcompose download multigen --model sd14=CompVis/stable-diffusion-v1-4 --model tc=mlpc-lab/TokenCompose_SD14_A
    tcompose download masks --revision IDEA-Research/grounding-dino-tiny=COMMIT   # pin a revision
    tcompose download --dry-run             # list what would be fetched
    HF_HUB_OFFLINE=1 tcompose download multigen   # check a warm cache (e.g. a Docker volume): fetches nothing

Models go to the Hugging Face cache (``$HF_HOME/hub``), the MultiGen and GenEval prompt sets beside it
(``$HF_HOME/tcompose/multigen``, ``$HF_HOME/tcompose/geneval``, sha256-checked), the FID Inception weights to tcompose's cache
(``$TCOMPOSE_CACHE/fid``, default ``~/.cache/tcompose/fid``, sha256-checked), so later runs work with
``HF_HUB_OFFLINE=1``. For each model
the commit actually fetched is written to ``$HF_HOME/tcompose/download-lock.json`` (repo -> revision asked,
commit got); pass that commit as the command's ``--revision`` to pin a run to it. Only the files a
diffusers / transformers load reads are fetched: configs, tokenizers and safetensors weights (``.bin``
only for a repo without safetensors; no ``.ckpt``, ONNX, Flax or fp16 duplicates). Whatever could not be
fetched is listed with the reason, and the command exits non-zero.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .io.errors import MissingPathError, UserError
from .models.loading import offline
from .models.spec import parse_model_spec, parse_model_specs

COMMANDS = ("masks", "train-unet", "train-clip", "generate", "multigen", "visor", "geneval", "fid", "latency",
            "attnviz")
_SD_COMMANDS = ("train-unet", "generate", "multigen", "visor", "geneval", "fid", "latency", "attnviz")

# Files no tcompose load reads: other frameworks, original checkpoints, half-precision duplicates.
_ALWAYS_SKIP = ["*.ckpt", "*.pth", "*.pt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.ot", "*.tflite",
                "*.mlmodel", "*.fp16.*", "*non_ema*", "*.md", ".gitattributes", "*.png", "*.jpg", "*.gif"]
_WEIGHTS = ("*.bin", "*.safetensors")


class DownloadError(UserError):
    """Some items could not be fetched; the message lists them and why."""


@dataclass(frozen=True)
class Item:
    """One thing to fetch: a hub model (``kind="model"``), a MultiGen or GenEval prompt set (``kind="prompts"``) or the FID
    Inception weights (``kind="weights"``, from torch-fidelity's release, sha256-checked)."""

    kind: str
    name: str
    role: str
    revision: str | None = None


@dataclass
class DownloadConfig:
    """Settings of ``tcompose download``."""

    commands: tuple[str, ...] = ()
    """Commands whose models to fetch (empty: all of :data:`COMMANDS`)."""
    models: tuple[str, ...] = ()
    """Models of train-unet / generate / multigen / attnviz, as ``--model`` takes them (``NAME=ID[,unet=..]``
    or a bare id; default: the stages' default base model). Their UNet / text-encoder swaps are fetched too."""
    detector: str | None = None
    segmenter: str | None = None
    clip_model: str | None = None
    """CLIP for train-clip (the captions' CLIP of ``masks --captions clip-best`` is fetched as well)."""
    owlv2: str | None = None
    owlvit: str | None = None
    mask2former: str | None = None
    revisions: dict[str, str] = field(default_factory=dict)
    """repo id -> revision (branch, tag or commit) to fetch instead of the default branch."""
    datasets: tuple[str, ...] = ("coco", "ade20k")
    """MultiGen prompt sets fetched for ``multigen``."""
    dry_run: bool = False


def defaults() -> dict[str, str]:
    """The stages' default models (:mod:`tcompose.models.defaults`, which the stages and the CLI read too)."""
    from .models import defaults as d

    return {"base": d.BASE_MODEL, "grounding_dino": d.GROUNDING_DINO, "segmenter": d.SEGMENTER,
            "caption_clip": d.CAPTION_CLIP, "clip": d.CLIP, "owlv2": d.OWLV2, "owlvit": d.OWLVIT,
            "mask2former": d.MASK2FORMER}


def parse_revisions(values: Iterable[str]) -> dict[str, str]:
    """``["org/name=REV", ...]`` -> ``{"org/name": "REV"}``, refusing anything else."""
    out = {}
    for value in values:
        repo, sep, rev = value.partition("=")
        if not sep or not repo.strip() or not rev.strip():
            raise UserError(f"--revision {value!r}: expected REPO_ID=REVISION, e.g. CompVis/stable-diffusion-v1-4=main")
        out[repo.strip()] = rev.strip()
    return out


def plan(cfg: DownloadConfig) -> list[Item]:
    """What ``cfg``'s commands use, each item once, in a stable order; local folders are left out."""
    commands = cfg.commands or COMMANDS
    unknown = [c for c in commands if c not in COMMANDS]
    if unknown:
        raise UserError(f"unknown command(s) {', '.join(unknown)}: choose from {', '.join(COMMANDS)}")
    d = defaults()
    specs = parse_model_specs(cfg.models) if cfg.models else [parse_model_spec(d["base"])]
    items: list[Item] = []

    def add(kind: str, name: str, role: str, revision: str | None = None) -> None:
        if kind == "model" and _is_local(name):
            return
        if all(i.name != name for i in items):
            items.append(Item(kind, name, role, cfg.revisions.get(name, revision)))

    for command in commands:
        if command in _SD_COMMANDS:
            for spec in specs:
                add("model", spec.model, "Stable Diffusion", spec.revision)
                for part, role in ((spec.unet, "UNet"), (spec.text_encoder, "text encoder")):
                    if part:
                        add("model", part, role)
        if command == "masks":
            add("model", cfg.detector or d["grounding_dino"], "GroundingDINO")
            add("model", cfg.segmenter or d["segmenter"], "SAM / SAM-HQ")
            add("model", d["caption_clip"], "CLIP (masks --captions clip-best)")
        if command == "train-clip":
            add("model", cfg.clip_model or d["clip"], "CLIP")
        if command == "multigen":
            add("model", cfg.owlv2 or d["owlv2"], "OWLv2")
            for ds in cfg.datasets:
                add("prompts", ds, "MultiGen prompts")
        if command == "visor":
            add("model", cfg.owlvit or d["owlvit"], "OWL-ViT (visor)")
        if command == "geneval":
            add("model", cfg.mask2former or d["mask2former"], "Mask2Former (geneval)")
            add("model", d["clip"], "CLIP (geneval's colours)")
            add("prompts", "geneval", "GenEval prompts")
        if command == "fid":
            add("weights", "inception-2015-12-05", "FID Inception weights")
            add("model", d["clip"], "CLIP (fid's CLIP score)")
    return items


def _is_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def ignore_patterns(files: list[str]) -> list[str]:
    """What not to fetch of a repo with these files: ``.bin`` weights where safetensors exist, and the rest of
    :data:`_ALWAYS_SKIP`."""
    has_safetensors = any(f.endswith(".safetensors") and ".fp16." not in f for f in files)
    return _ALWAYS_SKIP + (["*.bin"] if has_safetensors else [])


def fetch_model(item: Item) -> dict:
    """Fetch (or, offline, find in the cache) one hub model; ``{"status", "commit", "path"}``."""
    from huggingface_hub import HfApi, snapshot_download

    if offline():
        path = snapshot_download(item.name, revision=item.revision, local_files_only=True)
        return {"status": "cached", "commit": Path(path).name, "path": path}
    files = HfApi().list_repo_files(item.name, revision=item.revision)
    path = snapshot_download(item.name, revision=item.revision, ignore_patterns=ignore_patterns(files))
    return {"status": "fetched", "commit": Path(path).name, "path": path}


def fetch_prompts(item: Item) -> dict:
    if item.name == "geneval":
        from .evaluate.geneval.prompts import fetch_prompts as fetch_geneval

        path = fetch_geneval()  # offline: reads the cache only, and says so when it is not there
    else:
        from .evaluate.multigen.prompts import fetch_prompt_set

        path = fetch_prompt_set(item.name)
    return {"status": "cached" if offline() else "fetched", "commit": None, "path": str(path)}


def fetch_weights(item: Item) -> dict:
    """The FID Inception weights into tcompose's cache (offline: only checks that they are there)."""
    from .evaluate.fid.inception import download_weights, weights_path

    path = weights_path()
    if offline():
        if not path.is_file():
            raise MissingPathError(f"{path} is not there (HF_HUB_OFFLINE=1: nothing is fetched)")
        # offline too, the cached file's sha256 is checked (a wrong one: refused, with the fix)
        return {"status": "cached", "commit": None, "path": str(download_weights(progress=False))}
    return {"status": "fetched", "commit": None, "path": str(download_weights(progress=False))}


def lock_path() -> Path:
    from .evaluate.multigen.prompts import cache_dir

    return cache_dir().parent / "download-lock.json"


def run(cfg: DownloadConfig, progress: bool = True) -> dict:
    """Fetch everything :func:`plan` lists; returns ``{"items": [...], "failed": n}`` and updates the lock file.

    Raises :class:`DownloadError` after trying every item when any failed.
    """
    items = plan(cfg)
    results = []
    for item in items:
        row = {"kind": item.kind, "name": item.name, "role": item.role, "revision": item.revision}
        if cfg.dry_run:
            results.append(row | {"status": "planned"})
            continue
        t0 = time.monotonic()
        try:
            fetch = {"model": fetch_model, "prompts": fetch_prompts, "weights": fetch_weights}[item.kind]
            got = fetch(item)
        except Exception as err:  # noqa: BLE001 (every failure is reported, none stops the others)
            got = {"status": "failed", "error": _reason(err)}
        results.append(row | got | {"seconds": round(time.monotonic() - t0, 1)})
    if not cfg.dry_run:
        _update_lock([r for r in results if r["kind"] == "model" and r.get("commit")])
    if progress:
        _print_table(results)
    failed = [r for r in results if r["status"] == "failed"]
    report = {"items": results, "failed": len(failed)}
    if failed:
        lines = "; ".join(f"{r['name']}: {r['error']}" for r in failed)
        hint = " (HF_HUB_OFFLINE=1 is set: only the cache was read)" if offline() else ""
        raise DownloadError(f"could not fetch {len(failed)} of {len(results)} items{hint}: {lines}")
    return report


def _reason(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:300]}"


def _update_lock(rows: list[dict]) -> None:
    from .io.datasets import write_json_atomic

    path = lock_path()
    lock = json.loads(path.read_text()) if path.is_file() else {}
    for r in rows:
        lock[r["name"]] = {"revision": r["revision"] or "main", "commit": r["commit"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, lock)


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tcompose download")
    for col in ("what", "name", "revision", "status"):
        table.add_column(col, overflow="fold")
    style = {"failed": "red", "fetched": "green", "cached": "green"}
    for r in rows:
        status = r["status"] if r["status"] != "failed" else f"failed: {r['error']}"
        commit = f" -> {r['commit'][:12]}" if r.get("commit") else ""
        table.add_row(r["role"], r["name"], (r["revision"] or "default") + commit,
                      f"[{style.get(r['status'], '')}]{status}[/]" if r["status"] in style else status)
    Console(stderr=True).print(table)
