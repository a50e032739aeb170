"""Shared fixtures: offline settings, the real test data under TCOMPOSE_TEST_DATA, small thread counts, a kill
after the first shard (helpers.py holds the scaffolding several modules share)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _threads() -> None:
    import torch

    # pytest-xdist runs one worker per core: one thread each keeps the 2-core CI machine from oversubscribing.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


_threads()


def _test_data_root() -> Path | None:
    value = os.environ.get("TCOMPOSE_TEST_DATA")
    candidates = [Path(value)] if value else [Path(__file__).resolve().parents[2] / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The real public data (COCO sample, CLIP BPE, reference losses). Missing: fails under CI, skips elsewhere."""
    root = _test_data_root()
    if root is None:
        msg = "real test data not found: set TCOMPOSE_TEST_DATA to the shared data folder (../shared/data)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def clip_bpe(test_data: Path) -> Path:
    path = test_data / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        pytest.fail(f"{path} is missing from the test data")
    return path


@pytest.fixture(scope="session")
def coco_mini(test_data: Path) -> Path:
    path = test_data / "coco-mini-val2017"
    if not path.is_dir():
        pytest.fail(f"{path} is missing from the test data")
    return path


@pytest.fixture
def shard_writes(monkeypatch):
    """A kill after the first shard, and a record of the shards written: see :class:`helpers.ShardWrites`."""
    from helpers import ShardWrites

    return ShardWrites(monkeypatch)
