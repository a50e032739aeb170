"""The package's layout keeps its floors: one subpackage per area, imports only point down, no import cycle.

Floors, from the ground up (docs/design.md, "Layout"): grounding, models, io, data, testing; the stages masks,
crops, train, clip; evaluate; bench, demo, download; the CLI. Every import counts, also one inside a function or
under ``TYPE_CHECKING``: a cycle broken by a late import is still a cycle of the design. Cycles are looked for
twice: between modules, and between subpackages (data -> models -> data is a cycle even when no single module
closes it). ``tcompose.testing`` (random models) is imported only by the bench, the demo and the tests.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tcompose"
FLOORS = {
    "grounding": 0, "models": 0, "io": 0, "data": 0, "testing": 0,
    "masks": 1, "crops": 1, "train": 1, "clip": 1,
    "evaluate": 2,
    "bench": 3, "demo": 3, "download": 3,
    "cli": 4, "__main__": 5,
}
STAGES = {"masks", "crops", "train", "clip"}
TESTING_USERS = {"testing", "bench", "demo"}  # the areas that may import tcompose.testing
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


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def _area_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Subpackage -> the subpackages its modules import (top-level modules are areas of their own)."""
    areas: dict[str, set[str]] = {}
    for name, deps in graph.items():
        here = _area(name)
        if here is None:
            continue
        areas.setdefault(here, set()).update(a for a in map(_area, deps) if a is not None and a != here)
    for deps in list(areas.values()):
        for a in deps:
            areas.setdefault(a, set())
    return areas


def test_no_import_cycle():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles[:5])


def test_no_cycle_between_subpackages():
    cycles = _cycles(_area_graph(GRAPH))
    assert not cycles, "subpackage cycles:\n" + "\n".join(" -> ".join(c) for c in cycles[:5])


def test_only_the_bench_and_the_demo_import_the_testing_package():
    users = sorted(f"{name} -> {dep}" for name, deps in GRAPH.items() for dep in deps
                   if _area(dep) == "testing" and _area(name) not in TESTING_USERS)
    assert not users, "the product imports test scaffolding:\n" + "\n".join(users)


#: Names that decide which model family is at hand; they belong in tcompose/models/families/ (and the random
#: builders of tcompose/testing/), nowhere else: stages call the family interface instead.
FAMILY_TESTS = {"is_sdxl", "addition_embed_type", "text_time", "StableDiffusionPipeline", "StableDiffusionXLPipeline",
                "StableDiffusion3Pipeline", "FluxPipeline", "SD3Transformer2DModel", "FluxTransformer2DModel",
                "guidance_embeds"}
FAMILY_HOMES = ("tcompose.models.families", "tcompose.testing")


def _family_tests(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name) and node.id in FAMILY_TESTS:
            found.add(node.id)
        elif isinstance(node, ast.Attribute) and node.attr in FAMILY_TESTS:
            found.add(node.attr)
        elif isinstance(node, ast.alias) and node.name in FAMILY_TESTS:
            found.add(node.name)
        elif isinstance(node, ast.Constant) and node.value in FAMILY_TESTS:
            found.add(node.value)
    return found


def test_only_the_family_modules_tell_families_apart():
    offenders = sorted(f"{name}: {', '.join(sorted(found))}" for name, path in MODULES.items()
                       if not name.startswith(FAMILY_HOMES) and (found := _family_tests(path)))
    assert not offenders, "family tests outside tcompose/models/families:\n" + "\n".join(offenders)


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


def test_the_area_walk_sees_a_package_cycle_no_module_closes():
    """a.x -> b.y and b.z -> a.w: no module cycle, but a cycle of the subpackages a and b."""
    graph = {"tcompose.a.x": {"tcompose.b.y"}, "tcompose.b.y": set(), "tcompose.b.z": {"tcompose.a.w"},
             "tcompose.a.w": set()}
    assert not _cycles(graph)
    assert _cycles(_area_graph(graph)) == [["a", "b", "a"]]


def test_the_family_check_sees_a_family_test(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f(unet):\n    return unet.config.get('addition_embed_type') == 'text_time'\n")
    assert _family_tests(probe) == {"addition_embed_type", "text_time"}


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The walk itself: a late import inside a function counts (a cycle broken that way is still a cycle)."""
    grounding = _imports("tcompose.grounding.objective", MODULES["tcompose.grounding.objective"])
    assert "tcompose.grounding.attention" in grounding and "tcompose.grounding.losses" in grounding
    loop = _imports("tcompose.train.loop", MODULES["tcompose.train.loop"])  # its imports sit inside run()
    assert "tcompose.io.checkpoints" in loop and "tcompose.grounding.score" in loop
