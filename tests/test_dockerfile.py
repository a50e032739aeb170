"""The Dockerfile has what a build needs (no Docker engine runs here, so this reads it)."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_base_is_the_official_cuda_pytorch_runtime_of_the_pinned_torch():
    ins = instructions()
    args = {v.split("=", 1)[0]: v.split("=", 1)[1] for k, v in ins if k == "ARG" and "=" in v}
    base = args["BASE"]
    pinned = re.search(r"^torch==([\w.+]+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert re.fullmatch(rf"pytorch/pytorch:{re.escape(pinned)}-cuda[\d.]+-cudnn\d+-runtime", base), base
    assert ins[[k for k, _ in ins].index("FROM")][1] == "${BASE}"


def test_installs_the_project_with_the_constraints_and_keeps_failures_fatal():
    ins = instructions()
    runs = [v for k, v in ins if k == "RUN"]
    install = next(r for r in runs if "pip install" in r)
    assert re.search(r"pip install -c constraints\.txt \.(\s|$)", install)
    assert "|| true" not in install.replace("(pip uninstall -y torchvision torchaudio || true)", "")
    copied = " ".join(v for k, v in ins if k == "COPY")
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "tcompose"):
        assert needed in copied


def test_entrypoint_and_volumes():
    ins = dict((k, v) for k, v in instructions() if k in ("ENTRYPOINT", "VOLUME"))
    assert json.loads(ins["ENTRYPOINT"]) == ["tcompose"]
    assert "/root/.cache/huggingface" in json.loads(ins["VOLUME"])


def test_dockerignore_keeps_what_the_build_copies():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    for path in ("pyproject.toml", "constraints.txt", "README.md", "tcompose/cli/__init__.py", "tcompose/resources/nouns.txt"):
        assert not any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns), path
    assert ".git" in patterns and ".venv" in patterns
