"""``tcompose latency`` times what it says: the warm-up images are drawn but not timed, each timed image is one
pipeline call of batch 1, and the seconds per image are the mean (and the spread) of exactly those calls.

The clock is a fake one that only the (patched) pipeline call moves, so the expected numbers are exact."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

import tcompose.evaluate.latency as latency
import tcompose.models.sampling as sampling
from tcompose.cli import main

WARMUP_SECONDS = (30.0, 20.0)  # slow first calls: kernel selection, caches
TIMED_SECONDS = (1.0, 2.0, 6.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tcompose.testing.tiny_sd import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("latency") / "sd", corpus=[latency.PROMPT], seed=0)


@pytest.fixture
def fake_clock(monkeypatch):
    """latency's clock stands still except inside a pipeline call, which takes the next of the given durations."""
    state = SimpleNamespace(now=1000.0, durations=[], calls=[])

    def generate_batch(pipe, prompts, seeds, *args, **kwargs):
        state.calls.append((list(prompts), list(seeds)))
        state.now += state.durations[len(state.calls) - 1]
        return [None] * len(prompts), None

    monkeypatch.setattr(latency, "time", SimpleNamespace(perf_counter=lambda: state.now))
    monkeypatch.setattr(sampling, "generate_batch", generate_batch)
    return state


@pytest.mark.parametrize("warmup", [2, 0])
def test_seconds_per_image_count_only_the_timed_images(tiny, tmp_path, fake_clock, warmup):
    fake_clock.durations = [*WARMUP_SECONDS[:warmup], *TIMED_SECONDS]
    out = tmp_path / "lat"
    assert main(["latency", "--model", f"A={tiny}", "-o", str(out), "--images", str(len(TIMED_SECONDS)),
                 "--warmup", str(warmup), "--steps", "2", "--height", "32", "--width", "32"]) == 0
    r = json.loads((out / "latency.json").read_text())["models"]["A"]
    # every image drawn, warm-up ones included, one pipeline call of batch 1 each, each with its own seed
    assert len(fake_clock.calls) == warmup + len(TIMED_SECONDS)
    assert all(prompts == [latency.PROMPT] and len(seeds) == 1 for prompts, seeds in fake_clock.calls)
    assert len({seeds[0] for _, seeds in fake_clock.calls}) == len(fake_clock.calls)
    # only the timed ones count: mean 3 s (the warm-ups' 30 s and 20 s would make it 11.8 s), spread of 1, 2, 6
    assert r["images"] == len(TIMED_SECONDS) and r["warmup"] == warmup
    assert r["s_per_image"] == pytest.approx(3.0, abs=1e-9)
    assert r["std_s"] == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 3), abs=1e-9)
    assert r["batch_size"] == 1 and r["steps"] == 2 and (r["height"], r["width"]) == (32, 32)
