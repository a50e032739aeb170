"""--cache-text: each caption encoded once into OUT/text_cache/, the text encoders freed for the rest of the run.
It trains as encoding every batch does, the encoders are really gone while the denoiser trains (validation grids
still draw), the cache is reused, rebuilt when its inputs change and refused when the disk is too small."""

from __future__ import annotations

import gc
import json
import weakref
from collections import namedtuple

import numpy as np
import pytest
import torch
from PIL import Image

from tcompose.io.errors import UserError
from tcompose.models.families import TEXT_STATE, load_components
from tcompose.testing.tiny_dit import write_tiny_flux_pipeline
from tcompose.train.examples import prepare_rows
from tcompose.train.loop import run as train
from tcompose.train.text_cache import prepare_text_cache

from helpers import make_training_setup, tiny_train_config

L = 16  # FLUX's T5 length here (--max-sequence-length)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_cache")
    setup = make_training_setup(root, n_images=12, seed=3)
    return setup | {"flux": write_tiny_flux_pipeline(root / "flux", corpus=setup["captions"])}


def config(setup, output, model, **kw):
    dit = {"max_sequence_length": L} if model == "flux" else {}
    return tiny_train_config(setup, output, model=model, **({"max_steps": 3, "eval_fraction": 0.25} | dit | kw))


@pytest.fixture
def fresh_accelerator_state():
    """A run in another mixed precision needs a fresh accelerate state in this process (and leaves one behind)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("model, precision", [("base", "no"), ("flux", "no"), ("flux", "bf16")])
def test_cached_text_trains_as_the_encoders_do(setup, tmp_path, fresh_accelerator_state, model, precision):
    """The same run with the encoders encoding every batch and with the cache: the same losses, grounding scores and
    weights, up to how the encoders round for another batch composition (in bf16 too: the cache holds the states
    in the dtype the uncached steps see)."""
    plain = train(config(setup, tmp_path / "plain", model, cache_text=False, mixed_precision=precision))
    cached = train(config(setup, tmp_path / "cached", model, cache_text=True, mixed_precision=precision))
    assert plain["text_cache"] is None and cached["mixed_precision"] == precision
    assert cached["text_cache"]["captions"] == len(set(setup["captions"]))
    tol = 1e-4  # (both are exact here on the CPU, bf16 too; other kernels may round batches of 16 otherwise)
    for key in ("ldm", "token", "pixel"):
        assert cached["final_losses"][key] == pytest.approx(plain["final_losses"][key], rel=tol, abs=1e-7), key
    for when in ("grounding_before", "grounding_after"):
        assert cached[when]["score"] == pytest.approx(plain[when]["score"], abs=tol / 10), when
    sub = "transformer" if model == "flux" else "unet"
    from safetensors.torch import load_file

    a = load_file(tmp_path / "plain" / sub / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "cached" / sub / "diffusion_pytorch_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < tol


@pytest.mark.parametrize("model", ["base", "flux"])
def test_the_encoders_are_freed_while_training_and_validation_still_draws(setup, tmp_path, monkeypatch, model):
    """FLUX caches by default, SD1.x when asked: the encoders are collected before the first training step (weak
    references to them are dead in every step), and the validation grid (SD1.x's with guidance, so the empty prompt
    too) still draws, from prompts encoded before they went: the grid of a run that kept its encoders."""
    import tcompose.grounding.objective as objective
    import tcompose.models.families as families

    encoders: list[weakref.ref] = []
    real_load, real_losses = families.load_components, objective.tokencompose_losses

    def load(*args, **kw):
        comps = real_load(*args, **kw)
        encoders.extend(weakref.ref(e) for e in comps.text_encoders)
        return comps

    steps = []

    def losses(*args, **kw):
        gc.collect()
        steps.append([ref() is None for ref in encoders])
        return real_losses(*args, **kw)

    monkeypatch.setattr(families, "load_components", load)
    monkeypatch.setattr(objective, "tokencompose_losses", losses)
    prompts = ("a cat and a dog",)
    asked = {"cache_text": True} if model == "base" else {}  # FLUX's default
    summary = train(config(setup, tmp_path / "run", model, validation_prompts=prompts, validation_steps=2, **asked))
    assert summary["config"]["cache_text"] is True and summary["text_cache"]["captions"] > 0
    assert len(encoders) == {"base": 1, "flux": 2}[model]
    assert len(steps) == 3 and all(all(dead) for dead in steps), steps
    grid = np.asarray(Image.open(tmp_path / "run" / summary["validation"]))
    assert grid.std() > 0

    monkeypatch.setattr(families, "load_components", real_load)  # the same grid with the encoders kept
    monkeypatch.setattr(objective, "tokencompose_losses", real_losses)
    kept = train(config(setup, tmp_path / "kept", model, validation_prompts=prompts, validation_steps=2,
                        cache_text=False))
    assert kept["text_cache"] is None
    other = np.asarray(Image.open(tmp_path / "kept" / kept["validation"]))
    assert np.abs(grid.astype(int) - other.astype(int)).mean() < 1.0


def test_cache_holds_each_captions_states_and_is_reused_or_rebuilt(setup, tmp_path):
    comps = load_components(setup["flux"])
    comps.max_sequence_length = L
    prep = prepare_rows(setup["masks"], comps)
    logs: list[str] = []
    cache = prepare_text_cache(tmp_path / "tc", prep, comps, progress=False, log=logs.append, batch_size=4,
                               shard_entries=4)
    assert len(list((tmp_path / "tc").glob("shard-*.safetensors"))) == -(-len(cache) // 4) >= 2
    for row in (0, len(prep) - 1):
        states = cache.states(row)
        with torch.no_grad():
            alone = comps.family.caption_states(comps, {k: v[row : row + 1] for k, v in prep.token_ids.items()})
        assert set(states) == {TEXT_STATE + k for k in alone}
        for k, v in alone.items():
            torch.testing.assert_close(states[TEXT_STATE + k], v[0], atol=1e-5, rtol=1e-5)
    # rows with the same caption share one entry
    captions = [json.dumps(prep.token_ids["input_ids_2"][r].tolist()) for r in range(len(prep))]
    assert len(cache) == len(set(captions))

    prepare_text_cache(tmp_path / "tc", prep, comps, progress=False, log=logs.append, batch_size=4, shard_entries=4)
    assert "reusing" in logs[-1]
    # the same weights read from another folder in bf16, or read in float32 and cast: the same cache
    import shutil

    cast = load_components(setup["flux"])
    for enc in cast.text_encoders:
        enc.to(torch.bfloat16)
    moved = load_components(shutil.copytree(setup["flux"], tmp_path / "elsewhere"), dtype=torch.bfloat16)
    for c in (cast, moved):
        c.max_sequence_length = L
        prepare_text_cache(tmp_path / "tc16", prep, c, progress=False, log=logs.append, batch_size=4, shard_entries=4)
    assert "encoded" in logs[-2] and "reusing" in logs[-1], logs[-2:]
    # killed while writing: the orphaned temporary file goes, the finished shards are kept (nothing re-encoded)
    (tmp_path / "tc" / "cache.json").unlink()
    orphan = tmp_path / "tc" / ".shard-00001.safetensors.4242.tmp"
    orphan.write_bytes(b"half a shard")
    logs.clear()
    prepare_text_cache(tmp_path / "tc", prep, comps, progress=False, log=logs.append, batch_size=4, shard_entries=4)
    assert not orphan.exists() and not any("encoded" in line for line in logs), logs
    comps.max_sequence_length = L + 8  # other token ids: rebuilt, saying why
    longer = prepare_text_cache(tmp_path / "tc", prepare_rows(setup["masks"], comps), comps, progress=False,
                                log=logs.append, batch_size=4, shard_entries=4)
    assert any("differs in: token_ids_sha256" in line for line in logs)
    assert longer.states(0)[TEXT_STATE + "encoder_hidden_states"].shape[0] == L + 8


@pytest.mark.parametrize("model", ["base", "flux"])
def test_a_cache_that_would_not_fit_on_the_disk_is_refused(setup, tmp_path, monkeypatch, model):
    """Refused before anything is encoded, naming the ways out the family takes (SD1.x has no T5 to shorten)."""
    import tcompose.train.text_cache as text_cache

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(text_cache.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(UserError, match="--no-cache-text") as refused:
        train(config(setup, tmp_path / "run", model, cache_text=True))
    assert ("--max-sequence-length" in str(refused.value)) == (model == "flux")
    assert not list((tmp_path / "run" / "text_cache").glob("*shard*"))


def test_two_processes_build_the_cache_one_builds(setup, tmp_path):
    """Two ranks (threads sharing a barrier, as accelerate's processes share one) each encode every other shard:
    the cache equals one rank's, entry for entry."""
    import threading

    comps = load_components(setup["base"])
    prep = prepare_rows(setup["masks"], comps)
    kw = dict(progress=False, log=lambda line: None, shard_entries=3, batch_size=2)
    one = prepare_text_cache(tmp_path / "one", prep, comps, **kw)
    barrier, built = threading.Barrier(2), {}

    def rank(r: int) -> None:
        built[r] = prepare_text_cache(tmp_path / "two", prep, comps, rank=r, world_size=2, barrier=barrier.wait, **kw)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    two = built[1]
    assert len(list((tmp_path / "two").glob("shard-*.safetensors"))) >= 3
    assert one.entry_of_row == two.entry_of_row and len(one) == len(two)
    for row in range(len(prep)):
        a, b = one.states(row), two.states(row)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
