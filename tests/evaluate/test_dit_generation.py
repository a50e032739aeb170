"""generate, attnviz and latency on SD3 / SD3.5 and FLUX.1 models (tiny random pipelines built in code): the
images are the diffusers pipeline's own on tcompose's seeds, attention is captured from the family's default
blocks, and the UNet-only options are refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tcompose.cli import main
from tcompose.models.sampling import image_seed
from tcompose.testing.tiny_dit import write_tiny_flux_pipeline, write_tiny_sd3_pipeline

CAPTIONS = ["a cat and a dog on a table", "a red cup"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_generation")
    return {"sd3": write_tiny_sd3_pipeline(root / "sd3", corpus=CAPTIONS),
            "flux": write_tiny_flux_pipeline(root / "flux", corpus=CAPTIONS)}


def _pipeline(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_generate_draws_the_pipelines_own_images(models, name, tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(models[name]), "--prompt", CAPTIONS[0], "--output", str(out),
                 "--steps", "2", "--guidance", "3.5", "--height", "32", "--width", "32", "--seed", "5"]) == 0
    image = np.asarray(Image.open(out / "images" / "00000_00.png").convert("RGB")).astype(int)
    with torch.no_grad():
        ref = _pipeline(models[name])(CAPTIONS[0], num_inference_steps=2, guidance_scale=3.5, height=32, width=32,
                                      generator=torch.Generator().manual_seed(image_seed(5, 0, 0)),
                                      output_type="np").images[0]
    expected = np.round(ref * 255).clip(0, 255).astype(int)
    assert np.abs(image - expected).max() <= 1


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_attnviz_captures_the_familys_default_blocks(models, name, tmp_path, capsys):
    from safetensors import safe_open

    fig = tmp_path / "fig.png"
    assert main(["attnviz", "--model", f"M={models[name]}", "--prompt", CAPTIONS[0], "--words", "cat,dog",
                 "--output", str(fig), "--steps", "2", "--height", "32", "--width", "32"]) == 0
    with safe_open(str(fig.with_suffix(".safetensors")), "pt") as f:
        words = [f.get_tensor(f"M/word/{i}") for i in range(2)]
    assert all(w.shape == (8, 8) and torch.isfinite(w).all() and w.sum() > 0 for w in words)  # the patch grid
    assert not torch.equal(words[0], words[1])
    capsys.readouterr()
    assert main(["attnviz", "--model", f"M={models[name]}", "--prompt", CAPTIONS[0], "--layers", "mid",
                 "--output", str(tmp_path / "x.png"), "--steps", "2", "--height", "32", "--width", "32"]) == 2
    assert "mid" in capsys.readouterr().err


def test_unet_only_options_and_mixed_denoisers_are_refused(models, tmp_path, capsys):
    args = ["generate", "--model", str(models["sd3"]), "--prompt", "a cat", "--steps", "2", "--height", "32",
            "--width", "32"]
    assert main([*args, "--output", str(tmp_path / "a"), "--scheduler", "ddim"]) == 2
    assert "flow-matching scheduler; leave --scheduler out" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "b"), "--unet", str(models["flux"])]) == 2
    err = capsys.readouterr().err
    assert "FLUX" in err and "SD3" in err and not (tmp_path / "b" / "images").exists()
    # a train-unet OUT's transformer/ (here the model's own) swaps in like a UNet
    assert main([*args, "--output", str(tmp_path / "c"), "--unet", str(models["sd3"])]) == 0
    assert main([*args, "--output", str(tmp_path / "d")]) == 0
    same = [np.asarray(Image.open(tmp_path / d / "images" / "00000_00.png")) for d in ("c", "d")]
    assert np.array_equal(*same)
    broken = tmp_path / "broken"
    shutil.copytree(models["flux"], broken)
    shutil.rmtree(broken / "scheduler")
    assert main(["generate", "--model", str(broken), "--prompt", "a cat", "--output", str(tmp_path / "e")]) == 2
    assert "missing scheduler/" in capsys.readouterr().err


def test_latency_times_a_flux_model(models, tmp_path):
    """latency loads a FLUX model, times it and records what it drew: its card's guidance (none given), the
    --steps given, and the model's own size where none is given."""
    out = tmp_path / "lat"
    assert main(["latency", "--model", f"F={models['flux']}", "--output", str(out), "--steps", "2", "--height", "32",
                 "--width", "32"]) == 0
    r = json.loads((out / "latency.json").read_text())["models"]["F"]
    assert r["s_per_image"] > 0 and r["images"] > 0
    assert (r["steps"], r["guidance"], r["height"], r["width"]) == (2, 3.5, 32, 32)


def test_a_flux_size_its_pipeline_would_round_is_refused(models):
    """FLUX images are multiples of the VAE factor x 2 (16 for FLUX.1): another size is refused, not rounded."""
    from tcompose.evaluate.sampling import check_image_size, model_facts
    from tcompose.io.errors import UserError

    facts = model_facts(models["flux"])
    assert facts["size_multiple"] == 2 * facts["vae_factor"]
    assert model_facts(models["sd3"])["size_multiple"] == 2 * facts["vae_factor"]  # SD3's patch size 2
    real = {**facts, "size_multiple": 16}  # FLUX.1's VAE factor 8 x 2
    with pytest.raises(UserError, match="--height 40: FLUX.1 images are a multiple of 16 pixels.*pass 32 or 48"):
        check_image_size(40, 32, real)
    check_image_size(48, None, real)


def test_steps_and_guidance_default_to_the_model_cards(models, tmp_path):
    """Left out, --steps and --guidance are the model card's: FLUX.1-dev's (50, 3.5: a transformer with a guidance
    embedding), FLUX.1-schnell's (4, 0: without), SD3.5-medium's for an SD3 of unknown depth; given, they win."""
    from tcompose.evaluate.generate import GenerateConfig, settings_of
    from tcompose.evaluate.settings import GenerationSettings
    from tcompose.models.families import family_named
    from tcompose.testing.tiny_dit import SD3_MEDIUM, SD35_LARGE

    def drawn(name, **settings):
        cfg = GenerateConfig(str(models[name]), tmp_path / "x", ["a cat"], settings=GenerationSettings(**settings))
        got = settings_of(cfg, "fp32")
        return got["steps"], got["guidance"]

    assert drawn("flux") == (50, 3.5) and drawn("sd3") == (40, 4.5)
    assert drawn("flux", steps=2, guidance=1.0) == (2, 1.0)
    flux, sd3 = family_named("flux"), family_named("sd3")
    assert flux.sampling_defaults({"guidance_embeds": False}) == (4, 0.0)
    assert sd3.sampling_defaults(SD3_MEDIUM) == (28, 7.0) and sd3.sampling_defaults(SD35_LARGE) == (28, 3.5)
    assert family_named("sd").sampling_defaults({}) == (50, 7.5)  # the paper's SD1.4 protocol


def test_multigen_scores_sd3_and_flux_beside_an_sd_model(models, tmp_path):
    """The benchmarks take transformer models like UNet ones: one multigen folder with SD1.x, SD3 and FLUX rows,
    each model's images its own family's (steps and guidance recorded per model)."""
    from tcompose.data.categories import COCO_80
    from tcompose.evaluate.multigen.prompts import sample_prompts
    from tcompose.evaluate.multigen.stage import MultigenConfig, run
    from tcompose.evaluate.settings import GenerationSettings
    from tcompose.testing.tiny_sd import write_tiny_pipeline
    from tcompose.testing.tiny_detectors import write_tiny_owlv2

    corpus = [p.text for p in sample_prompts(COCO_80, 4, seed=0)]
    sd, owl = write_tiny_pipeline(tmp_path / "sd", corpus=corpus), write_tiny_owlv2(tmp_path / "owl")
    cfg = MultigenConfig(models=[f"SD={sd}", f"S3={models['sd3']}", f"FX={models['flux']}"], output=tmp_path / "mg",
                         sample_seed=0, prompts=2, images=1, detector=str(owl), part_size=2, detector_batch_size=2,
                         settings=GenerationSettings(steps=2, height=32, width=32, device="cpu"))
    summary = run(cfg, progress=False)
    assert set(summary["models"]) == {"SD", "S3", "FX"}
    recorded = json.loads((tmp_path / "mg" / "run.json").read_text())["models"]
    assert recorded["FX"]["guidance"] == 3.5 and recorded["S3"]["guidance"] == 4.5 and recorded["SD"]["guidance"] == 7.5
    assert all(len(list((tmp_path / "mg" / "models" / m / "images").glob("*.png"))) == 2 for m in ("SD", "S3", "FX"))
