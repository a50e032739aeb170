"""MultiGen prompts: the paper's two prompt sets (fetched at a pinned commit, sha256-checked, cached), a local
copy of one, or new prompts sampled from a dataset's category list.

Runbook::

    prompts, source = resolve_prompts("coco")                     # the paper's 1,000 COCO prompts
    prompts, source = resolve_prompts("coco", limit=50)           # the first 50 (the quick protocol)
    prompts, source = resolve_prompts("ade20k", prompt_file="ade20k_obj_comp_5_1k.json")   # offline copy
    prompts, source = resolve_prompts("coco", limit=200, sample_seed=3)   # 200 new prompts, same template

The paper's sets are ``multigen/coco_obj_comp_5_1k.json`` and ``multigen/ade20k_obj_comp_5_1k.json`` of
github.com/mlpc-ucsd/TokenCompose at commit :data:`COMMIT`: 1,000 entries each, ``{"unique_id": i,
"num_objects": 5, "obj_1_attributes": ["book"], ..., "obj_5_attributes": [...], "text": "a photo of a book,
a cup, a kite, a mouse, and a surfboard."}``. They are not part of this project: :func:`fetch_prompt_set`
downloads one on first use, checks its sha256 against :data:`PROMPT_SETS` and keeps it in
:func:`cache_dir` (``$HF_HOME/tcompose/multigen``, beside the Hugging Face cache). With ``HF_HUB_OFFLINE=1``
nothing is fetched: a cached copy is used, else the error says how to get one (``tcompose download``, or
``--prompt-file`` with a local copy, which is checked against the same sha256).

Sampled prompts (``sample_seed``) draw 5 distinct names per prompt from
:data:`tcompose.data.categories.MULTIGEN_CATEGORIES` with ``random.Random(sample_seed)``, in the sets' template
(:func:`prompt_text`, "a" before every name, as the original sets write it).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ...data.categories import MULTIGEN_CATEGORIES
from ...io.errors import UserError
from ...io.datasets import file_sha256
from ...models.loading import offline

REPO = "mlpc-ucsd/TokenCompose"
COMMIT = "5633f816116fdf7de74d9055ff9666c5222416e2"
BASE_URL = f"https://raw.githubusercontent.com/{REPO}/{COMMIT}/multigen/"
NUM_CATEGORIES = 5


@dataclass(frozen=True)
class PromptSet:
    """One of the paper's prompt files: its name in the TokenCompose repository and its sha256."""

    dataset: str
    filename: str
    sha256: str

    @property
    def url(self) -> str:
        return BASE_URL + self.filename


PROMPT_SETS: dict[str, PromptSet] = {
    "coco": PromptSet("coco", "coco_obj_comp_5_1k.json",
                      "fdac55817fbab0dc3710e60b82a8b238e41a1ed771660b6050e27ba96dea35cd"),
    "ade20k": PromptSet("ade20k", "ade20k_obj_comp_5_1k.json",
                        "5e30e03d4ce55c2d5bc99e40976ff392c79a8ff5e3f374188b3748da5ad52618"),
}


@dataclass(frozen=True)
class Prompt:
    """One MultiGen prompt: ``text`` names ``categories`` (the detector's queries)."""

    prompt_id: int
    text: str
    categories: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"prompt_id": self.prompt_id, "text": self.text, "categories": list(self.categories)}

    @classmethod
    def from_dict(cls, d: dict) -> "Prompt":
        return cls(int(d["prompt_id"]), str(d["text"]), tuple(d["categories"]))


class PromptSetError(UserError):
    """A prompt file that cannot be fetched or read as asked; the message names the fix."""


def prompt_text(names: Sequence[str]) -> str:
    """``["book", "cup", "kite"]`` -> ``"a photo of a book, a cup, and a kite."`` (the sets' template)."""
    names = list(names)
    if len(names) < 2:
        return f"a photo of a {names[0]}." if names else "a photo."
    return "a photo of a " + ", a ".join(names[:-1]) + f", and a {names[-1]}."


def _check_dataset(dataset: str) -> PromptSet:
    if dataset not in PROMPT_SETS:
        raise PromptSetError(f"unknown --dataset {dataset!r}: choose one of {', '.join(PROMPT_SETS)}")
    return PROMPT_SETS[dataset]


def cache_dir(benchmark: str = "multigen") -> Path:
    """Where fetched prompt files are kept: ``$HF_HOME/tcompose/<benchmark>`` (HF_HOME defaulting the way the
    Hugging Face libraries default it: ``$XDG_CACHE_HOME/huggingface``, else ``~/.cache/huggingface``)."""
    hf_home = os.environ.get("HF_HOME")
    if not hf_home:
        hf_home = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(hf_home).expanduser() / "tcompose" / benchmark


def _how_to_get(ps: PromptSet) -> str:
    return (f"run `tcompose download` once with network, or download {ps.url} yourself and pass it as "
            f"--prompt-file")


def fetch_pinned(url: str, sha256: str, path: Path, what: str, how_to_get: str, timeout_s: float = 60.0) -> Path:
    """``path``, a cached copy of ``url`` whose sha256 is ``sha256``, downloaded first if needed (``file://``
    works). Offline (``HF_HUB_OFFLINE=1``) only the cache is read; a download whose sha256 differs is refused and
    not cached. Errors name ``what`` and end with ``how_to_get``."""
    if path.is_file():
        if file_sha256(path) == sha256:
            return path
        if offline():
            raise PromptSetError(f"{path}: cached copy has the wrong sha256 (expected {sha256}); delete it and "
                                 + how_to_get)
    elif offline():
        raise PromptSetError(f"{what} are not in the cache ({path}) and HF_HUB_OFFLINE=1 forbids fetching them: "
                             + how_to_get)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            data = resp.read()
    except (urllib.error.URLError, OSError) as err:
        raise PromptSetError(f"could not fetch {url} ({err}): check the network, or " + how_to_get) from err
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise PromptSetError(f"{url}: sha256 {got} differs from the pinned {sha256}; not cached")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def fetch_prompt_set(dataset: str, cache: str | os.PathLike | None = None, base_url: str | None = None,
                     timeout_s: float = 60.0) -> Path:
    """The cached, sha256-checked copy of the paper's ``dataset`` prompt set, downloaded first if needed.

    ``base_url`` replaces the pinned GitHub address (a mirror; ``file://`` works). Offline
    (``HF_HUB_OFFLINE=1``) only the cache is read. A download whose sha256 differs is refused and not cached.
    """
    ps = _check_dataset(dataset)
    folder = Path(cache) if cache is not None else cache_dir()
    url = (base_url or BASE_URL).rstrip("/") + "/" + ps.filename
    return fetch_pinned(url, ps.sha256, folder / ps.filename, f"the {dataset} MultiGen prompts", _how_to_get(ps),
                        timeout_s)


def read_prompt_file(path: str | os.PathLike, sha256: str | None = None) -> list[Prompt]:
    """Parse a prompt file in the sets' format; with ``sha256``, refuse a file whose digest differs."""
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(f"{path}: prompt file not found")
    if sha256 is not None:
        got = file_sha256(path)
        if got != sha256:
            other = [ps.dataset for ps in PROMPT_SETS.values() if ps.sha256 == got]
            if other:
                raise PromptSetError(f"{path} is the paper's {other[0]} prompt set: pass --dataset {other[0]}")
            raise PromptSetError(
                f"{path}: sha256 {got} differs from the pinned {sha256} (not the paper's file, or a damaged copy); "
                "pass the original file, or --custom-prompts to use your own prompts")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PromptSetError(f"{path}: not a JSON prompt file ({err})") from err
    if not isinstance(entries, list) or not entries:
        raise PromptSetError(f"{path}: expected a non-empty JSON list of prompt entries")
    prompts, seen = [], set()
    for pos, e in enumerate(entries):
        try:
            pid = int(e.get("unique_id", pos))
            n = int(e.get("num_objects", NUM_CATEGORIES))
            names = tuple(str(e[f"obj_{i + 1}_attributes"][0]) for i in range(n))
            text = str(e["text"])
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as err:
            raise PromptSetError(f"{path}: entry {pos} is not a MultiGen prompt ({err!r}); expected unique_id, "
                                 "num_objects, obj_1_attributes.. and text") from err
        if pid in seen:
            raise PromptSetError(f"{path}: entry {pos} repeats unique_id {pid}")
        seen.add(pid)
        prompts.append(Prompt(pid, text, names))
    return prompts


def sample_prompts(categories: Sequence[str], n: int, seed: int, k: int = NUM_CATEGORIES) -> list[Prompt]:
    """``n`` new prompts, each naming ``k`` distinct names drawn with ``random.Random(seed)``; ids 0..n-1."""
    if len(set(categories)) < k:
        raise PromptSetError(f"need at least {k} distinct categories to sample from, got {len(set(categories))}")
    rng = random.Random(seed)
    pool = list(dict.fromkeys(categories))
    out = []
    for i in range(n):
        names = tuple(rng.sample(pool, k))
        out.append(Prompt(i, prompt_text(names), names))
    return out


def resolve_prompts(dataset: str = "coco", prompt_file: str | os.PathLike | None = None, limit: int | None = None,
                    sample_seed: int | None = None, custom: bool = False) -> tuple[list[Prompt], dict]:
    """The prompts of a run and a description of where they came from (for ``run.json``).

    ``sample_seed`` set: ``limit`` (default 1,000) new prompts from the dataset's categories. Otherwise the
    paper's set (``prompt_file``, checked against the pinned sha256 unless ``custom``; else fetched/cached),
    its first ``limit`` entries.
    """
    ps = _check_dataset(dataset)
    if limit is not None and limit < 1:
        raise PromptSetError(f"--prompts must be >= 1, got {limit}")
    if sample_seed is not None:
        if prompt_file is not None:
            raise PromptSetError("--sample-seed draws new prompts; it does not combine with --prompt-file")
        n = 1000 if limit is None else limit
        source = {"kind": "sampled", "dataset": dataset, "sample_seed": sample_seed, "num_categories": NUM_CATEGORIES,
                  "category_list": f"tcompose.data.categories.MULTIGEN_CATEGORIES[{dataset!r}]"}
        return sample_prompts(MULTIGEN_CATEGORIES[dataset], n, sample_seed), source
    if prompt_file is not None:
        path = Path(prompt_file)
        prompts = read_prompt_file(path, None if custom else ps.sha256)
        kind = "custom" if custom else "paper"
    else:
        if custom:
            raise PromptSetError("--custom-prompts needs --prompt-file")
        path = fetch_prompt_set(dataset)
        prompts = read_prompt_file(path, ps.sha256)
        kind = "paper"
    if limit is not None and limit > len(prompts):
        raise PromptSetError(f"--prompts {limit}: {path.name} holds only {len(prompts)} prompts")
    source = {"kind": kind, "dataset": dataset, "file": path.name, "sha256": file_sha256(path)}
    if kind == "paper":
        source.update({"repository": REPO, "commit": COMMIT})
    return (prompts[:limit] if limit is not None else prompts), source
