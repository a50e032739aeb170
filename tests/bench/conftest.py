"""The quick bench's report, run once for the bench tests (its CPU minute is the slow part)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def quick_report(tmp_path_factory):
    from tcompose.cli import main

    path = tmp_path_factory.mktemp("bench") / "bench.json"
    code = main(["bench", "--quick", "--threads", "1", "--json", str(path)])
    assert code == 0
    text = path.read_text()
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in the report"))
