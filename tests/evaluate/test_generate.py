"""`tcompose generate`: seeded images equal to diffusers' own, independent of batch size and process count,
resumable after a kill, with a generations table."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tcompose.cli import main
from tcompose.evaluate.generate import GenerateConfig, image_filename, read_prompts, run
from tcompose.evaluate.sampling import load_pipeline
from tcompose.evaluate.settings import GenerationSettings
from tcompose.models.sampling import generate_batch, image_seed, initial_latents
from tcompose.testing.tiny_sd import write_tiny_pipeline

PROMPTS = ["a cat and a wine glass", "a red ball on a table", "two dogs near a car"]
STEPS = 3
SIZE = 32  # pixels: 16x16 latents keep each image cheap


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-models")
    base = write_tiny_pipeline(root / "base", corpus=PROMPTS, seed=0)
    other = write_tiny_pipeline(root / "other", tokenizer_source=base, seed=7)  # "a train-unet OUT"
    return {"base": base, "other": other}


def cfg_for(models, out: Path, **kw) -> GenerateConfig:
    """``kw``: GenerateConfig fields, and GenerationSettings fields (steps, batch_size, ...) for its settings."""
    args = dict(model=str(models["base"]), output=out, prompts=PROMPTS[:2], images_per_prompt=3)
    settings = dict(steps=STEPS, device="cpu", batch_size=3, height=SIZE, width=SIZE)
    for key, value in kw.items():
        (settings if key in GenerationSettings.__dataclass_fields__ else args)[key] = value
    return GenerateConfig(**args, settings=GenerationSettings(**settings))


def read_images(out: Path) -> dict[str, np.ndarray]:
    paths = sorted((out / "images").glob("*.png"))
    return {p.name: np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in paths}


def assert_same_images(a: dict, b: dict) -> None:
    """Equal up to float rounding of batched kernels: at most 1 grey level, on a tiny share of the values."""
    assert a.keys() == b.keys() and a
    for name in a:
        diff = np.abs(a[name] - b[name])
        assert diff.max() <= 1, name
        assert (diff > 0).mean() < 0.005, name


def test_seed_and_file_names():
    expected = int.from_bytes(hashlib.sha256(b"tcompose-generate:5:12:3").digest()[:8], "big") & (2**63 - 1)
    assert image_seed(5, 12, 3) == expected
    seeds = {image_seed(0, p, k) for p in range(200) for k in range(10)}
    assert len(seeds) == 2000 and all(0 <= s < 2**63 for s in seeds)
    assert image_seed(1, 0, 0) != image_seed(0, 0, 0)
    assert image_filename(12, 3) == "00012_03.png" and image_filename(123456, 100) == "123456_100.png"


def test_read_prompts(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# MultiGen subset\n a cat and a dog \n\n# more\na red ball\n")
    assert read_prompts(txt) == ["a cat and a dog", "a red ball"]
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["one", "two"]))
    assert read_prompts(js) == ["one", "two"]
    js.write_text(json.dumps({"prompts": ["x"]}))
    with pytest.raises(ValueError, match="JSON list"):
        read_prompts(js)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_batch_equals_diffusers_with_per_image_generators(models):
    pipe = load_pipeline(models["base"], dtype="fp32", device="cpu")
    seeds = [image_seed(0, p, 0) for p in range(3)]
    ours, nsfw = generate_batch(pipe, PROMPTS, seeds, steps=STEPS, guidance=7.5, height=SIZE, width=48)
    plain = pipe(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=STEPS,
                 guidance_scale=7.5, height=SIZE, width=48, output_type="np").images
    assert nsfw is None and ours.dtype == np.uint8 and ours.shape == (3, SIZE, 48, 3)
    np.testing.assert_array_equal(ours, (plain * 255).round().astype(np.uint8))
    lat, _ = initial_latents(seeds[1:2], (4, 8, 8))
    lat3, _ = initial_latents(seeds, (4, 8, 8))
    assert torch.equal(lat[0], lat3[1])  # an image's start noise does not depend on its batch


def test_batch_size_and_processes_do_not_change_images(models, tmp_path):
    one = run(cfg_for(models, tmp_path / "b3", batch_size=3), progress=False)
    assert one["generated"] == 6 and one["skipped_existing"] == 0 and one["images_per_s"] > 0
    # batch 1, split over two processes (rank 1 first: rank 0 waits for every PNG, then writes the table)
    r1 = run(cfg_for(models, tmp_path / "b1", batch_size=1), rank=1, world_size=2, progress=False)
    assert r1["generated"] == 3 and "table" not in r1
    assert not (tmp_path / "b1" / "generations.parquet").exists()
    r0 = run(cfg_for(models, tmp_path / "b1", batch_size=1), rank=0, world_size=2, progress=False,
             finalize_timeout_s=5)
    assert r0["generated"] == 3
    assert_same_images(read_images(tmp_path / "b3"), read_images(tmp_path / "b1"))
    t3 = pq.read_table(tmp_path / "b3" / "generations.parquet").to_pylist()
    t1 = pq.read_table(tmp_path / "b1" / "generations.parquet").to_pylist()
    assert [(r["prompt_id"], r["image_index"], r["seed"], r["file"]) for r in t3] == \
        [(r["prompt_id"], r["image_index"], r["seed"], r["file"]) for r in t1]
    # another --seed gives other images
    run(cfg_for(models, tmp_path / "s1", seed=1, prompts=PROMPTS[:1], images_per_prompt=1), progress=False)
    a = read_images(tmp_path / "b3")["00000_00.png"]
    b = read_images(tmp_path / "s1")["00000_00.png"]
    assert np.abs(a - b).mean() > 5


def test_table_run_json_and_rerun(models, tmp_path):
    out = tmp_path / "g"
    cfg = cfg_for(models, out, prompt_ids=[10, 20], images_per_prompt=2, name="tiny", scheduler="ddim")
    run(cfg, progress=False)
    rows = pq.read_table(out / "generations.parquet").to_pylist()
    assert [(r["prompt_id"], r["image_index"]) for r in rows] == [(10, 0), (10, 1), (20, 0), (20, 1)]
    r = rows[3]
    assert r["prompt"] == PROMPTS[1] and r["seed"] == image_seed(0, 20, 1) and r["file"] == "images/00020_01.png"
    assert r["model"] == "tiny" and r["nsfw"] is None
    settings = json.loads(r["settings"])
    assert settings["scheduler"] == "DDIMScheduler" and settings["steps"] == STEPS and settings["dtype"] == "fp32"
    assert settings["height"] == settings["width"] == SIZE and settings["safety_checker"] is False
    assert settings["seed"] == 0 and settings["guidance"] == 7.5 and "torch" in settings["versions"]
    with Image.open(out / r["file"]) as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["settings"]["model"] == str(models["base"].resolve()) and run_json["summary"]["total_images"] == 4
    again = run(cfg, progress=False)
    assert again["generated"] == 0 and again["skipped_existing"] == 4
    more = run(cfg_for(models, out, prompt_ids=[10, 20], images_per_prompt=3, name="tiny", scheduler="ddim"),
               progress=False)
    assert more["generated"] == 2 and more["skipped_existing"] == 4
    with pytest.raises(ValueError, match="other settings"):
        run(cfg_for(models, out, prompt_ids=[10, 20], images_per_prompt=2, scheduler="ddim", guidance=3.0),
            progress=False)
    with pytest.raises(ValueError, match="another prompt"):
        run(cfg_for(models, out, prompts=["a blue cup", PROMPTS[1]], prompt_ids=[10, 20], images_per_prompt=2,
                    scheduler="ddim"), progress=False)


def test_unet_swap_accepts_out_or_out_unet(models, tmp_path):
    kw = dict(prompts=PROMPTS[:1], images_per_prompt=1)
    run(cfg_for(models, tmp_path / "base", **kw), progress=False)
    run(cfg_for(models, tmp_path / "out", unet=str(models["other"]), **kw), progress=False)
    run(cfg_for(models, tmp_path / "unet", unet=str(models["other"] / "unet"), **kw), progress=False)
    base, out = read_images(tmp_path / "base"), read_images(tmp_path / "out")
    np.testing.assert_array_equal(out["00000_00.png"], read_images(tmp_path / "unet")["00000_00.png"])
    assert np.abs(base["00000_00.png"] - out["00000_00.png"]).mean() > 5
    with pytest.raises(ValueError, match="no config.json"):
        load_pipeline(models["base"], unet=str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="safety_checker"):
        load_pipeline(models["base"], safety_checker=True, device="cpu")


def test_resume_after_kill(models, tmp_path):
    out = tmp_path / "killed"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cmd = [sys.executable, "-m", "tcompose", "generate", "--model", str(models["base"]), "--prompts", str(prompts),
           "--images-per-prompt", "3", "--batch-size", "1", "--steps", str(STEPS), "--height", str(SIZE), "--width",
           str(SIZE), "--output", str(out)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while len(list((out / "images").glob("*.png"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"finished or failed before the kill: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = {p.name for p in (out / "images").glob("*.png")}
    assert 2 <= len(before) < 9 and not (out / "generations.parquet").exists()
    cfg = cfg_for(models, out, prompts=PROMPTS, batch_size=2, device=None)
    resumed = run(cfg, progress=False)
    assert resumed["skipped_existing"] == len(before) and resumed["generated"] == 9 - len(before)
    assert not list((out / "images").glob(".*.tmp"))
    assert len(pq.read_table(out / "generations.parquet")) == 9
    run(cfg_for(models, tmp_path / "ref", prompts=PROMPTS, batch_size=3), progress=False)
    assert_same_images(read_images(out), read_images(tmp_path / "ref"))


def test_cli_generate_and_errors(models, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["generate", "--model", str(models["base"]), "--prompt", PROMPTS[0], "--prompt", PROMPTS[2],
                 "--images-per-prompt", "2", "--steps", "2", "--scheduler", "euler", "--dtype", "fp32",
                 "--height", "48", "--width", "64", "--output", str(out)])
    assert code == 0
    rows = pq.read_table(out / "generations.parquet").to_pylist()
    assert [r["prompt"] for r in rows] == [PROMPTS[0]] * 2 + [PROMPTS[2]] * 2
    assert json.loads(rows[0]["settings"])["scheduler"] == "EulerDiscreteScheduler"
    with Image.open(out / rows[0]["file"]) as im:
        assert im.size == (64, 48)
    for args, message in [
        (["--scheduler", "heun"], "--scheduler 'heun'"),
        (["--safety-checker", "maybe"], "--safety-checker"),
        (["--height", "50"], "multiple of 8"),
    ]:
        capsys.readouterr()
        code = main(["generate", "--model", str(models["base"]), "--prompt", "x", "--output", str(tmp_path / "e"),
                     *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_safety_checker_on_records_nsfw(models, tmp_path):
    import shutil

    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    model = tmp_path / "with-checker"
    shutil.copytree(models["base"], model)
    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config={**small, "vocab_size": 99}, projection_dim=16,
                                                      vision_config={**small, "image_size": 32, "patch_size": 8}))
    checker.concept_embeds_weights.data.fill_(-2.0)  # every cosine similarity exceeds the threshold: all flagged
    checker.save_pretrained(model / "safety_checker", safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        model / "feature_extractor")
    out = tmp_path / "on"
    run(cfg_for(models, out, model=str(model), prompts=PROMPTS[:1], images_per_prompt=2, safety_checker=True),
        progress=False)
    rows = pq.read_table(out / "generations.parquet").to_pylist()
    assert [r["nsfw"] for r in rows] == [True, True] and json.loads(rows[0]["settings"])["safety_checker"] is True
    assert all(a.max() == 0 for a in read_images(out).values())  # the checker blacked them out


def test_a_unet_folder_that_is_no_unet_is_one_line_and_leaves_no_folder(models, tmp_path, capsys):
    from tcompose.testing.tiny_detectors import write_tiny_owlv2

    owl = write_tiny_owlv2(tmp_path / "owl")  # a folder with a config.json that is not a UNet's
    capsys.readouterr()
    args = ["generate", "--model", str(models["base"]), "--prompt", "a cat", "--steps", "2", "--height", str(SIZE),
            "--width", str(SIZE)]
    assert main([*args, "--unet", str(owl), "--output", str(tmp_path / "g1")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not the config of a denoiser tcompose takes" in err, err
    # a UNet of another family (the VAE's latents do not fit it) fails at load: no empty --output is left
    assert main([*args, "--unet", str(models["base"] / "vae"), "--output", str(tmp_path / "g2")]) == 2
    assert not (tmp_path / "g1").exists() and not (tmp_path / "g2").exists()


def test_a_rerun_with_fewer_prompts_or_images_keeps_every_image_of_the_folder_in_the_table(models, tmp_path):
    out = tmp_path / "g"
    run(cfg_for(models, out, prompt_ids=[10, 20], images_per_prompt=3), progress=False)
    first = pq.read_table(out / "generations.parquet").to_pylist()
    assert len(first) == 6
    fewer = run(cfg_for(models, out, prompts=PROMPTS[:1], prompt_ids=[10], images_per_prompt=2), progress=False)
    assert fewer["generated"] == 0 and fewer["skipped_existing"] == 2
    rows = pq.read_table(out / "generations.parquet").to_pylist()
    assert [(r["prompt_id"], r["image_index"], r["prompt"], r["seed"], r["file"]) for r in rows] == \
        [(r["prompt_id"], r["image_index"], r["prompt"], r["seed"], r["file"]) for r in first]
    assert json.loads((out / "run.json").read_text())["summary"]["total_images"] == 6
    # an image of the folder generated with other settings is never mixed into the table
    run(cfg_for(models, tmp_path / "other", prompts=PROMPTS[2:], prompt_ids=[30], images_per_prompt=1, guidance=3.0),
        progress=False)
    os.replace(tmp_path / "other" / "images" / "00030_00.png", out / "images" / "00030_00.png")
    with pytest.raises(ValueError, match="00030_00.png: generated with other settings"):
        run(cfg_for(models, out, prompts=PROMPTS[:1], prompt_ids=[10], images_per_prompt=2), progress=False)


@pytest.mark.parametrize("damage", ["truncated", "not a png"])
def test_a_damaged_png_on_disk_is_redrawn_not_counted_as_done(models, tmp_path, damage):
    out = tmp_path / "g"
    cfg = cfg_for(models, out, images_per_prompt=2)
    run(cfg, progress=False)
    good = read_images(out)
    path = out / "images" / image_filename(1, 1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not an image")
    again = run(cfg, progress=False)
    assert again["generated"] == 1 and again["skipped_existing"] == 3
    assert_same_images(read_images(out), good)
    assert len(pq.read_table(out / "generations.parquet")) == 4
