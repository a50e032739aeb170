"""train-unet's fast-path options on CPU: --cache-latents (same examples, same run, exact resume, reuse and
rebuild of the cache), --channels-last (same losses), --compile (regional compilation of one block), and
their wiring into `tcompose bench`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tcompose.bench.train import LAYERS, TC, make_batch, make_scheduler
from tcompose.grounding.objective import tokencompose_losses
from tcompose.models.families import load_components
from tcompose.testing.tiny_sd import build_tiny_unet
from tcompose.train.config import TrainUnetConfig
from tcompose.train.examples import TrainingExamples, collate, prepare_rows
from tcompose.train.geometry import load_pixels
from tcompose.train.latent_cache import INDEX, LatentCache, prepare_latent_cache, shard_name
from tcompose.train.loop import run as train

from helpers import make_training_setup, tiny_train_config

RES = 32  # 16x16 latents with the tiny VAE


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # "all" captions (the helper's default): several rows per image, so the cache's deduplication by image is exercised
    setup = make_training_setup(tmp_path_factory.mktemp("fast"), n_images=16, size=48, seed=1)
    comps = load_components(str(setup["base"]))
    return setup | {"comps": comps, "prep": prepare_rows(setup["masks"], comps)}


def small(setup, output, **kw) -> TrainUnetConfig:
    return tiny_train_config(setup, output, **({"grad_accum": 2, "eval_fraction": 0.1, "log_every": 2} | kw))


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "checkpoints" / "step-000004" / "model.safetensors")


def build(setup, root, flipped=False, resolution=RES, log=None, **kw) -> LatentCache:
    return prepare_latent_cache(root, setup["prep"], setup["comps"].vae, resolution, flipped, progress=False,
                                log=(log.append if log is not None else lambda _: None), **kw)


def test_cached_example_equals_uncached_example(setup, tmp_path):
    """Same noise, eps, timestep, flip and masks; the cached moments are the VAE's mean and std of the pixels."""
    prep, vae = setup["prep"], setup["comps"].vae
    cache = build(setup, tmp_path / "cache", flipped=True)
    assert cache.flipped and cache.dtype == "float32" and cache.latent_shape == [4, RES // 2, RES // 2]
    assert len(cache) == len(set(prep.image_ids)) < len(prep)  # one entry per image, not per caption
    plain = TrainingExamples(prep, RES, (4, RES // 2, RES // 2), 1000, seed=0, random_flip=True)
    cached = TrainingExamples(prep, RES, (4, RES // 2, RES // 2), 1000, seed=0, random_flip=True, latents=cache)
    row = next(i for i in range(len(prep)) if len(prep.words[i]) >= 1)
    flips = set()
    for number in range(8):  # both orientations occur among these example numbers
        a, b = plain[(row, number)], cached[(row, number)]
        assert "pixel_values" not in b and b["latent_moments"].shape == (2, 4, RES // 2, RES // 2)
        for key in ("noise", "latent_eps", "timestep", "masks", "input_ids"):
            assert torch.equal(a[key], b[key]), key
        flipped = not torch.equal(a["pixel_values"], load_pixels(prep.reader[row]["image"]["bytes"], RES)[0])
        flips.add(flipped)
        with torch.no_grad():
            dist = vae.encode(a["pixel_values"][None]).latent_dist
        # the cache encodes in batches: batched convolutions round differently in the last bits
        torch.testing.assert_close(b["latent_moments"], torch.stack([dist.mean[0], dist.std[0]]), rtol=1e-5, atol=1e-5)
    assert flips == {True, False}
    image = prep.reader[row]["image"]["bytes"]  # the cache flips resized pixels: the same as flipping the image
    assert torch.equal(load_pixels(image, RES, flip=True)[0], load_pixels(image, RES)[0].flip(-1))
    # encode_batch samples mean + std * eps from either
    comps = setup["comps"]
    items_a, items_b = [plain[(row, n)] for n in (0, 1)], [cached[(row, n)] for n in (0, 1)]
    la, ea = comps.encode_batch(collate(items_a))
    lb, eb = comps.encode_batch(collate(items_b))
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    assert torch.equal(ea["encoder_hidden_states"], eb["encoder_hidden_states"])


def test_cache_is_reused_resumed_and_rebuilt(setup, tmp_path):
    root, log = tmp_path / "cache", []
    build(setup, root, log=log, shard_entries=5)
    n_shards = -(-len(set(setup["prep"].image_ids)) // 5)
    assert n_shards >= 3 and sorted(p.name for p in root.glob("shard-*")) == [shard_name(k) for k in range(n_shards)]
    first = load_file(root / shard_name(1))
    mtimes = {p.name: p.stat().st_mtime_ns for p in root.glob("shard-*")}

    log.clear()
    build(setup, root, log=log, shard_entries=5)
    assert log == [f"latent cache: reusing {root}"]
    assert {p.name: p.stat().st_mtime_ns for p in root.glob("shard-*")} == mtimes

    # killed while building: no index, one shard missing -> only that shard is encoded again
    (root / INDEX).unlink()
    (root / shard_name(1)).unlink()
    log.clear()
    cache = build(setup, root, log=log, shard_entries=5)
    assert any("already encoded" in line for line in log), log
    assert (root / shard_name(0)).stat().st_mtime_ns == mtimes[shard_name(0)]
    again = load_file(root / shard_name(1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert cache.image_size(0) == (48, 48)

    # another resolution: said, and rebuilt
    log.clear()
    cache = build(setup, root, resolution=16, log=log, shard_entries=5)
    assert any("(differs in: resolution); rebuilding" in line for line in log), log
    assert cache.latent_shape == [4, 8, 8]
    assert json.loads((root / INDEX).read_text())["fingerprint"]["resolution"] == 16
    # larger shards: fewer files, the stale ones are removed
    log.clear()
    build(setup, root, resolution=16, log=log, shard_entries=8)
    assert any("(differs in: shard_entries)" in line for line in log), log
    assert sorted(p.name for p in root.glob("shard-*")) == [shard_name(0), shard_name(1)]


def test_two_processes_build_the_same_cache_as_one(setup, tmp_path):
    """Each process encodes every 2nd shard, then process 0 writes the index (processes played by threads)."""
    import threading

    one = build(setup, tmp_path / "one", flipped=True, shard_entries=3)
    barrier, logs, errors = threading.Barrier(2, timeout=120), {0: [], 1: []}, []

    def rank(r: int) -> None:
        try:
            build(setup, tmp_path / "two", flipped=True, log=logs[r], shard_entries=3, rank=r, world_size=2,
                  barrier=barrier.wait)
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert logs[1] == [] and any("encoded" in line for line in logs[0])  # only the main process writes the index
    shards = sorted(p.name for p in (tmp_path / "one").glob("shard-*"))
    assert len(shards) >= 4 and shards == sorted(p.name for p in (tmp_path / "two").glob("shard-*"))
    for name in shards:
        a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    two = LatentCache(tmp_path / "two")
    assert two.entry_of_row == one.entry_of_row and two.sizes == one.sizes


def test_cached_and_channels_last_runs_match_the_plain_run(setup, tmp_path):
    plain = train(small(setup, tmp_path / "plain"))
    cached = train(small(setup, tmp_path / "cached", cache_latents=True))
    cl = train(small(setup, tmp_path / "cl", cache_latents=True, channels_last=True))
    assert cached["latent_cache"]["images"] == len(set(setup["prep"].image_ids)) and plain["latent_cache"] is None
    assert (tmp_path / "cached" / "latent_cache" / INDEX).exists()
    # The VAE's kernels round differently for another batch composition, and so do channels_last convolutions;
    # Adam turns such last-bit differences of near-zero gradients into visible weight changes here and there,
    # so the runs are compared on the whole update: |dW_other - dW_plain| / |dW_plain| (measured ~1e-4).
    start = load_file(setup["base"] / "unet" / "diffusion_pytorch_model.safetensors")

    def update(run: str) -> torch.Tensor:
        w = weights(tmp_path / run)
        return torch.cat([(w[k] - start[k]).flatten() for k in sorted(start)])

    plain_update = update("plain")
    assert plain_update.norm() > 1.0  # the runs did train
    for run in ("cached", "cl"):
        assert (update(run) - plain_update).norm() <= 1e-3 * plain_update.norm(), run
    for key in ("ldm", "token", "pixel", "total"):
        assert cached["final_losses"][key] == pytest.approx(plain["final_losses"][key], rel=1e-4)
        assert cl["final_losses"][key] == pytest.approx(plain["final_losses"][key], rel=1e-4)
    # the channels_last run saved a loadable pipeline (contiguous weights)
    saved = load_file(tmp_path / "cl" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(t.is_contiguous() for t in saved.values())


def test_exact_resume_with_cache_latents_in_a_new_process(setup, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(small(setup, straight, cache_latents=True, random_flip=True))
    train(small(setup, resumed, cache_latents=True, random_flip=True, max_steps=2))
    cmd = [sys.executable, "-m", "tcompose", "train-unet", "--data", str(setup["masks"]), "--output", str(resumed),
           "--model", str(setup["base"]), "--resolution", str(RES), "--batch-size", "2", "--grad-accum", "2",
           "--max-steps", "4", "--lr", "1e-3", "--lambda", "1.0", "--gamma", "0.1", "--num-workers", "0",
           "--checkpoint-every", "0", "--eval-fraction", "0.1", "--eval-max-examples", "2", "--eval-timesteps", "500",
           "--log-every", "2", "--random-flip", "--cache-latents", "--resume", "latest"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "latent cache: reusing" in proc.stdout and "resumed from" in proc.stdout, proc.stdout
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed cached run differs"


def test_channels_last_step_equals_contiguous_step():
    """Same UNet, same batch: losses and gradients with weights and latents in channels_last."""
    unet = build_tiny_unet(0, "tiny")
    latents, emb, batch = make_batch(2, 16, unet.config.cross_attention_dim, torch.device("cpu"), seed=5)
    sched = make_scheduler()
    out, grads = {}, {}
    for cl in (False, True):
        fmt = torch.channels_last if cl else torch.contiguous_format
        unet.to(memory_format=fmt)
        assert unet.conv_in.weight.is_contiguous(memory_format=fmt)
        unet.zero_grad(set_to_none=True)
        b = dict(batch, noise=batch["noise"].contiguous(memory_format=fmt))
        losses = tokencompose_losses(unet, latents.contiguous(memory_format=fmt), emb, b, sched, LAYERS,
                                     backward=lambda loss: loss.backward(), **TC)
        out[cl] = {k: float(v.detach()) for k, v in losses.items()}
        grads[cl] = torch.cat([p.grad.flatten() for p in unet.parameters()])
    for k in out[False]:
        assert out[True][k] == pytest.approx(out[False][k], rel=1e-5, abs=1e-7), k
    assert (grads[True] - grads[False]).abs().max() <= 1e-4 * grads[False].abs().max()


def test_compile_regions_on_one_block():
    """Compiling the tiny UNet takes ~100 s on this CPU with a cold inductor cache, so a whole --compile run is
    not tested here; the regions are found in the UNet, and one FeedForward compiles and matches eager."""
    from diffusers.models.attention import FeedForward

    from tcompose.models.compile import compile_regions, compiled_regions, uncompile_regions

    unet = build_tiny_unet(0, "tiny")
    keys = list(unet.state_dict())
    assert compile_regions(unet) == compiled_regions(unet) == 15  # 8 ResNet blocks + 7 feed-forwards
    assert list(unet.state_dict()) == keys  # in place: names and save_pretrained unchanged
    assert uncompile_regions(unet) == 15 and compiled_regions(unet) == 0

    torch.manual_seed(0)
    block = torch.nn.Sequential(FeedForward(8, mult=2))
    x = torch.randn(2, 5, 8)
    block(x).square().sum().backward()
    ref_out, ref_grads = block(x).detach(), [p.grad.clone() for p in block.parameters()]
    block.zero_grad(set_to_none=True)
    assert compile_regions(block) == 1
    out = block(x)
    out.square().sum().backward()
    torch.testing.assert_close(out.detach(), ref_out, rtol=1e-5, atol=1e-6)
    for p, g in zip(block.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_bench_measures_channels_last_and_the_vae_encode():
    from tcompose.bench.report import table_rows
    from tcompose.bench.run import BenchConfig
    from tcompose.bench.run import run as bench

    report = bench(BenchConfig(sections=("train",), quick=True, gradient_checkpointing="off", channels_last="both",
                               threads=1, rounds=1, steps=1, warmup=0), progress=False)
    assert report["errors"] == [] and report["settings"]["channels_last"] == "both"
    rows = [r for r in report["train"] if not r["lora_rank"]]  # LoRA rows follow: another workload
    assert [r["channels_last"] for r in rows] == [False, True]
    for r in rows:
        assert r["vae_encode_s"] > 0 and r["vae_image_side"] == 32  # the tiny VAE: 32 px -> 16x16 latents
        assert r["images_per_s_with_vae_encode"] == pytest.approx(2 / (r["step_s_tc"] + r["vae_encode_s"]), rel=1e-2)
        assert 0 < r["vae_encode_share"] < 1
    units = [(s, u) for _, s, _, u in table_rows(report)]
    assert any("channels_last" in s and u == "step time --cache-latents saves" for s, u in units)
    with pytest.raises(ValueError, match="channels_last"):
        BenchConfig(channels_last="sometimes").resolve()
