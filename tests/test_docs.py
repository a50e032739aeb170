"""The documentation stays true to the repository: what it links, names and tells users to run exists.

- README.md is short (at most 420 lines) and starts with the two commands that work on a fresh machine
  (``make demo``, ``make test``); ``.ci/run`` runs the README's test command.
- Every relative link and image in README.md, docs/*.md, data/README.md and benchmarks/README.md points at a file
  that exists (and an ``#anchor`` at a heading of that file).
- Every dotted ``tcompose.x.y`` name resolves (a module, or an attribute of one: imported offline), and every
  ``tcompose/...``, ``tests/...``, ``benchmarks/...`` or ``docs/...`` path exists.
- Every ``tcompose COMMAND`` in code is a real command, and every ``--option`` given to it one of its options.
- LICENSE is the Apache License 2.0; CITATION.cff parses, names TokenCompose and agrees with pyproject.toml.

Each check is also run on a deliberately broken page, so a checker that stopped seeing anything would fail.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shlex
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted([README, ROOT / "data" / "README.md", ROOT / "benchmarks" / "README.md",
                *(ROOT / "docs").glob("*.md")])
README_MAX_LINES = 420

# sha256 of the Apache License 2.0 text (apache.org/licenses/LICENSE-2.0.txt) with whitespace runs collapsed.
APACHE_2_SHA256 = "0ffddef9e48f8a09aed5caf2d44f7ba1c1be2d9b8e0a6f693b1635b2d5566645"

_FENCE = re.compile(r"^(```|~~~)")
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_SRC = re.compile(r"""<(?:img|a)\b[^>]*\b(?:src|href)=["']([^"']+)["']""", re.I)
_DOTTED = re.compile(r"(?<![\w./$~-])tcompose(?:\.[A-Za-z_]\w*)+")
_REPO_PATH = re.compile(r"(?<![\w./$~-])((?:tcompose|tests|benchmarks|docs)/[\w./-]*[\w/])")
_COMMAND = re.compile(r"(?<![\w./$~-])tcompose\s+([a-z][a-z0-9-]*)")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _split_code(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(prose lines, code-block lines), each as (line number, text)."""
    prose, code, fenced = [], [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        (code if fenced else prose).append((number, line))
    return prose, code


def _paragraphs(prose: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Prose paragraphs, each joined into one line (a code span or a link may wrap), with its first line number."""
    out: list[tuple[int, str]] = []
    last = None
    for n, line in prose:
        if line.strip() and last is not None and n == last + 1 and out:
            out[-1] = (out[-1][0], out[-1][1] + " " + line.strip())
        elif line.strip():
            out.append((n, line.strip()))
        last = n if line.strip() else None
    return out


def _code_spans(text: str) -> list[tuple[int, str]]:
    """Inline code spans of the prose, and code-block lines with their ``\\`` continuations joined."""
    prose, code = _split_code(text)
    spans = [(n, m.group(2)) for n, para in _paragraphs(prose) for m in _INLINE_CODE.finditer(para)]
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for n, line in code:
        if pending is not None:
            n0, head = pending
            line, n = head + " " + line.strip(), n0
        if line.rstrip().endswith("\\"):
            pending = (n, line.rstrip()[:-1])
            continue
        pending = None
        joined.append((n, line))
    return spans + joined


# -- anchors --------------------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def _anchors(path: Path) -> frozenset[str]:
    prose, _ = _split_code(path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose:
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return frozenset(out)


# -- the checks, on a page's text (so the tests can feed them a broken page) ----------------------------------


def broken_links(path: Path, text: str) -> list[str]:
    prose, _ = _split_code(text)
    bad = []
    for n, line in _paragraphs(prose):
        stripped = _INLINE_CODE.sub("", line)
        for target in [*_LINK.findall(stripped), *_HTML_SRC.findall(stripped)]:
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                bad.append(f"{_rel(path)}:{n}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{_rel(path)}:{n}: {target} (no heading #{anchor} in {_rel(dest)})")
    return bad


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as err:
            if err.name and ".".join(parts[:cut]).startswith(err.name):
                continue  # that prefix is not a module: try a shorter one, the rest as attributes
            raise
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                try:  # a submodule that its package does not import
                    obj = importlib.import_module(f"{obj.__name__}.{attr}") if hasattr(obj, "__path__") else None
                except ModuleNotFoundError:
                    obj = None
                if obj is None:
                    return False
            else:
                obj = getattr(obj, attr)
        return True
    return False


def broken_names(path: Path, text: str) -> list[str]:
    bad = []
    for n, line in enumerate(text.splitlines(), 1):
        for dotted in _DOTTED.findall(line):
            if not _resolves(dotted):
                bad.append(f"{_rel(path)}:{n}: {dotted} (no such module or attribute)")
        for rel in _REPO_PATH.findall(line):
            if not (ROOT / rel.rstrip("/")).exists():
                bad.append(f"{_rel(path)}:{n}: {rel} (no such file or folder)")
    return bad


@lru_cache(maxsize=1)
def _commands() -> dict:
    import typer

    from tcompose.cli import app

    return dict(typer.main.get_command(app).commands)


def _options(command) -> set[str]:
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}


def broken_commands(path: Path, text: str) -> list[str]:
    """Every ``tcompose COMMAND`` in code must be a command, and each ``--flag`` after it one of its options."""
    commands, bad = _commands(), []
    for n, span in _code_spans(text):
        for m in _COMMAND.finditer(span):
            name = m.group(1)
            if name not in commands:
                bad.append(f"{_rel(path)}:{n}: tcompose {name} (no such command)")
                continue
            rest = re.split(r"\s#\s|\s#$|[|;&]|\$\(|\)", span[m.end():])[0]
            try:
                words = shlex.split(rest)
            except ValueError:
                words = rest.split()
            for word in words:
                flag = word.split("=", 1)[0]
                if re.fullmatch(r"--?[a-z][a-z0-9-]*", flag) and flag not in _options(commands[name]) | {"--help"}:
                    bad.append(f"{_rel(path)}:{n}: tcompose {name} {flag} (no such option)")
    return bad


# -- the repository's pages -----------------------------------------------------------------------------------


def test_the_pages_exist():
    for page in ("README.md", "docs/training.md", "docs/evaluation.md", "docs/data.md", "docs/design.md",
                 "data/README.md", "benchmarks/README.md", "docs/demo-attention.png"):
        assert (ROOT / page).is_file(), page


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def _readme_first_commands() -> list[str]:
    """The commands of the README's first code block, comments dropped."""
    first_block = []
    inside = False
    for line in README.read_text().splitlines():
        if _FENCE.match(line.strip()):
            if inside:
                break
            inside = True
            continue
        if inside:
            first_block.append(line.split("#", 1)[0].strip())
    return [c for c in first_block if c]


def test_readme_starts_with_the_two_commands():
    text = README.read_text().splitlines()
    first_fence = next(i for i, line in enumerate(text) if _FENCE.match(line.strip()))
    assert first_fence < 15, "the two commands must come first"
    assert not any(line.startswith("## ") for line in text[:first_fence]), "the two commands come before any section"
    assert _readme_first_commands() == ["make demo", "make test"]


def test_ci_runs_the_readmes_test_command():
    test_command = _readme_first_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci if not line.lstrip().startswith("#")]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no {target} target"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_resolve(page):
    assert not broken_links(page, page.read_text())


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_module_names_and_paths_exist(page):
    assert not broken_names(page, page.read_text())


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_commands_and_options_exist(page):
    assert not broken_commands(page, page.read_text())


def test_the_readme_names_every_command():
    """The README's command table covers the whole CLI (a new command gets a row)."""
    text = README.read_text()
    missing = [name for name in _commands() if f"`tcompose {name}" not in text]
    assert not missing, f"commands the README does not mention: {missing}"


def test_no_page_names_design_md_in_capitals():
    for page in PAGES:
        assert "DESIGN.md" not in page.read_text(), f"{_rel(page)} names DESIGN.md: it is docs/design.md"


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert hashlib.sha256(" ".join(text.split()).encode()).hexdigest() == APACHE_2_SHA256, \
        "LICENSE is not the Apache License 2.0 text"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] in ({"text": "Apache-2.0"}, "Apache-2.0")


def test_citation_parses_and_names_tokencompose():
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert cff["cff-version"] == "1.2.0"
    assert cff["message"] and cff["authors"] and cff["title"]
    assert str(cff["version"]) == pyproject["version"]
    assert cff["license"] == "Apache-2.0"
    paper = cff["preferred-citation"]
    assert paper["type"] == "conference-paper" and paper["title"].startswith("TokenCompose")
    assert paper["year"] == 2024 and {a["family-names"] for a in paper["authors"]} >= {"Wang", "Sha", "Ding", "Tu"}
    assert any("TokenCompose" in ref["title"] for ref in cff.get("references", []))


# -- the checkers see what they are for -----------------------------------------------------------------------


def test_the_checkers_catch_a_broken_page(tmp_path):
    page = ROOT / "docs" / "design.md"  # checked as if it lived in docs/, so relative links resolve the same
    good = "See [data](data.md#datasets-on-disk) and `tcompose.models.sampling.generate_batch`.\n"
    assert not broken_links(page, good) and not broken_names(page, good)
    broken = (
        "See [gone](no-such-page.md), [anchor](data.md#no-such-heading), ![img](no-such.png).\n"
        "Old name: `tcompose.evaluate.sampling.generate_batch`; a module: tcompose.no_such_module.\n"
        "A file: `tcompose/no/such.py`, a test: tests/no_such_test.py.\n"
        "A wrapped span: `tcompose visor --model M=x\n--wrapped-flag 2 --output o`, and [a wrapped\nlink](gone.md).\n"
        "```bash\n"
        "tcompose no-such-command --output x\n"
        "tcompose generate --model m --no-such-flag 3 \\\n"
        "    --also-missing --output out\n"
        "accelerate launch --multi_gpu -m tcompose multigen --model M=x --output o   # --not-an-option here\n"
        "```\n"
    )
    links = broken_links(page, broken)
    assert len(links) == 4, links
    names = broken_names(page, broken)
    assert any("tcompose.evaluate.sampling.generate_batch" in b for b in names), names
    assert any("tcompose.no_such_module" in b for b in names), names
    assert any("tcompose/no/such.py" in b for b in names) and any("tests/no_such_test.py" in b for b in names)
    commands = broken_commands(page, broken)
    assert any("no-such-command" in b for b in commands), commands
    assert any("--no-such-flag" in b for b in commands) and any("--also-missing" in b for b in commands), commands
    assert any("visor --wrapped-flag" in b for b in commands), commands
    assert not any("--multi_gpu" in b or "--not-an-option" in b for b in commands), commands


def test_the_slugs_are_githubs():
    assert _slug("LoRA (`--lora-rank R`)") == "lora---lora-rank-r"
    assert _slug("train-unet's fast-path options") == "train-unets-fast-path-options"
    assert _slug("Errors: `tcompose/errors.py`") == "errors-tcomposeerrorspy"
    assert _slug("Table 1: OA, MultiGen, FID, CLIP score, latency") == "table-1-oa-multigen-fid-clip-score-latency"
