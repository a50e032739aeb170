"""The package's layout keeps its floors: one subpackage per area, imports only point down, no import cycle.

Floors, from the ground up (README, "Layout"): grounding, models, io, data; the stages masks, crops, train,
clip; evaluate; bench, demo, download; the CLI. Every import counts, also one inside a function or under
``TYPE_CHECKING``: a cycle broken by a late import is still a cycle of the design.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tcompose"
FLOORS = {
    "grounding": 0, "models": 0, "io": 0, "data": 0,
    "masks": 1, "crops": 1, "train": 1, "clip": 1,
    "evaluate": 2,
    "bench": 3, "demo": 3, "download": 3,
    "cli": 4, "__main__": 5,
}
STAGES = {"masks", "crops", "train", "clip"}
LOOSE_AT_MOST = 4  # modules directly in tcompose/ beside __init__.py and __main__.py


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("tcompose", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """tcompose modules (or packages) that ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _area(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_area_is_on_the_plan():
    areas = {_area(m) for m in MODULES} - {None}
    assert areas <= set(FLOORS), f"areas not on the plan (add them to FLOORS and the README's Layout): {areas - set(FLOORS)}"


def test_at_most_four_modules_loose_at_the_top():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(loose) <= LOOSE_AT_MOST, loose


def test_imports_only_point_down():
    upward = []
    for name, deps in GRAPH.items():
        here = _area(name)
        for dep in deps:
            there = _area(dep)
            if here is None or there is None or here == there:
                continue
            if FLOORS[there] > FLOORS[here] or (here in STAGES and there in STAGES):
                upward.append(f"{name} -> {dep}")
    assert not upward, "imports that run upward or between stages:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles[:5])


@pytest.mark.parametrize("package", sorted(m for m, p in MODULES.items() if p.name == "__init__.py"))
def test_each_package_says_what_lives_there(package):
    doc = ast.get_docstring(ast.parse(MODULES[package].read_text()))
    assert doc and len(doc.split()) >= 8, f"{package}: its __init__.py needs a docstring saying what lives there"


def test_the_cli_imports_no_heavy_library():
    """`tcompose --help` must answer at once: the command modules import torch & co only inside commands."""
    code = ("import sys, tcompose.cli; heavy = [m for m in ('torch', 'diffusers', 'transformers', 'numpy') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing tcompose.cli loads {out}"


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The walk itself: a late import inside a function counts (a cycle broken that way is still a cycle)."""
    grounding = _imports("tcompose.grounding.objective", MODULES["tcompose.grounding.objective"])
    assert "tcompose.grounding.attention" in grounding and "tcompose.grounding.losses" in grounding
    loop = _imports("tcompose.train.loop", MODULES["tcompose.train.loop"])  # its imports sit inside run()
    assert "tcompose.io.checkpoints" in loop and "tcompose.grounding.score" in loop
