"""GenEval's prompts: ``prompts/evaluation_metadata.jsonl`` of djghosh13/geneval at a pinned commit, fetched at
run time, checked by sha256 and cached (as the MultiGen prompt sets are), or a local copy (``--prompt-file``).

    prompts, source = resolve_prompts()                        # all 553, fetched once, then from the cache
    prompts, source = resolve_prompts(prompt_file="evaluation_metadata.jsonl")   # offline copy (sha256-checked)
    prompts, source = resolve_prompts(limit=20)                # the first 20 (a quick look, not the benchmark)

Each line is one prompt: ``{"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude":
[{"class": "cat", "count": 3}], "prompt": "a photo of two cats"}``; includes may carry ``color`` and
``position: [relation, index of an earlier include]``. Tags: single_object 80, two_object 99, counting 80,
colors 94, position 100, color_attr 100. Prompt ``i`` is line ``i`` (GenEval's folder ``{i:05d}``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ...data.categories import COCO_80
from ...io.datasets import file_sha256
from ..multigen.prompts import PromptSetError, cache_dir, fetch_pinned
from .rules import TASKS

REPO = "djghosh13/geneval"
COMMIT = "af4902f24d3ca90ebbb446dd9891a59e0f82725f"
FILENAME = "evaluation_metadata.jsonl"
URL = f"https://raw.githubusercontent.com/{REPO}/{COMMIT}/prompts/{FILENAME}"
SHA256 = "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"
NUM_PROMPTS = 553

#: The 80 object names GenEval's evaluator uses (its ``object_names.txt``): COCO's 80 in COCO's order, three
#: of them renamed so that a prompt reads unambiguously.
GENEVAL_OBJECTS: tuple[str, ...] = tuple(
    {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}.get(n, n) for n in COCO_80)


@dataclass(frozen=True)
class GenevalPrompt:
    """One GenEval prompt: its line number, text and record (``metadata``); ``categories`` are its includes'
    class names (what the colour classifier and ``--attend-excite`` look at)."""

    prompt_id: int
    text: str
    metadata: dict

    @property
    def tag(self) -> str:
        return self.metadata["tag"]

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(req["class"] for req in self.metadata.get("include", [])))

    def to_dict(self) -> dict:
        return {"prompt_id": self.prompt_id, "text": self.text, "metadata": self.metadata}

    @classmethod
    def from_dict(cls, d: dict) -> "GenevalPrompt":
        return cls(int(d["prompt_id"]), str(d["text"]), dict(d["metadata"]))


def _how_to_get() -> str:
    return (f"run `tcompose download geneval` once with network (it fetches them into the cache), or download {URL} "
            "yourself and pass it as --prompt-file")


def fetch_prompts(cache: str | os.PathLike | None = None, url: str = URL, timeout_s: float = 60.0) -> Path:
    """The cached, sha256-checked copy of GenEval's prompt file (``$HF_HOME/tcompose/geneval``), fetched first
    if needed (``url``: a mirror; ``file://`` works). ``HF_HUB_OFFLINE=1``: the cache only."""
    folder = Path(cache) if cache is not None else cache_dir("geneval")
    return fetch_pinned(url, SHA256, folder / FILENAME, "GenEval's prompts", _how_to_get(), timeout_s)


def read_prompt_file(path: str | os.PathLike, check: bool = True) -> list[GenevalPrompt]:
    """Parse a file in GenEval's layout (one JSON record a line); ``check``: refuse one whose sha256 is not the
    pinned file's."""
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(f"{path}: prompt file not found")
    if check and (got := file_sha256(path)) != SHA256:
        raise PromptSetError(f"{path}: sha256 {got} differs from the pinned {SHA256} of {REPO}@{COMMIT[:7]} "
                             f"prompts/{FILENAME} (another file, or a damaged copy); pass the original file (with "
                             "--prompts N for its first N prompts), or add --custom-prompts to score a file of your own in GenEval's "
                             "layout, a subset of GenEval's prompts included")
    prompts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            meta = json.loads(line)
            text = str(meta["prompt"])
            if meta["tag"] not in TASKS:
                raise ValueError(f"unknown tag {meta['tag']!r}")
            for req in meta.get("include", []) + meta.get("exclude", []):
                if req["class"] not in GENEVAL_OBJECTS or int(req["count"]) < 0:
                    raise ValueError(f"class {req['class']!r} is none of GenEval's 80 objects")
        except (ValueError, KeyError, TypeError) as err:
            raise PromptSetError(f"{path}: line {i + 1} is not a GenEval prompt record ({err}); expected tag, "
                                 "include, prompt") from None
        prompts.append(GenevalPrompt(len(prompts), text, meta))
    if not prompts:
        raise PromptSetError(f"{path}: no prompt records")
    return prompts


def resolve_prompts(prompt_file: str | os.PathLike | None = None, limit: int | None = None,
                    custom: bool = False) -> tuple[list[GenevalPrompt], dict]:
    """The prompts of a run (``prompt_file`` or the fetched file; its first ``limit``) and where they came from
    (for ``run.json``). ``custom``: accept a ``prompt_file`` in GenEval's layout that is not the pinned one.

    The source names the file and its sha256, not ``limit``: the first N prompts of a file are a prefix of its
    first N + 1, so a rerun with a higher ``--prompts`` extends a folder (as multigen's does)."""
    if limit is not None and limit < 1:
        raise PromptSetError(f"--prompts must be >= 1, got {limit}")
    if custom and prompt_file is None:
        raise PromptSetError("--custom-prompts needs --prompt-file")
    path = Path(prompt_file) if prompt_file is not None else fetch_prompts()
    prompts = read_prompt_file(path, check=not custom)
    if limit is not None and limit > len(prompts):
        raise PromptSetError(f"--prompts {limit}: {path.name} holds only {len(prompts)} prompts")
    source = {"kind": "custom" if custom else "geneval", "file": path.name, "sha256": file_sha256(path),
              "file_prompts": len(prompts)}
    if not custom:
        source.update(repository=REPO, commit=COMMIT)
    return (prompts[:limit] if limit is not None else prompts), source
