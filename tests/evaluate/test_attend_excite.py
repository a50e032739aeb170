"""Attend-and-Excite: tcompose's sampler gives diffusers' StableDiffusionAttendAndExcitePipeline's images, raises the
weakest excited token's attention, and is refused where it does not apply.

The tiny random UNet attends almost uniformly (its query-key logits are tiny), so no latent change could move its
attention: the fixture sharpens the cross-attention (to_q and to_k weights x 6) and saves the result as a model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tcompose.cli import app
from tcompose.evaluate.sampling import load_pipeline
from tcompose.evaluate.settings import ExciteSettings
from tcompose.grounding.attend_excite import excite_loss, gaussian_kernel, step_sizes, token_maxima
from tcompose.grounding.attention_maps import accumulate_attention
from tcompose.models.sampling import generate_batch, image_seed, initial_latents
from tcompose.testing.tiny_sd import write_tiny_pipeline

PROMPT = "a red ball and a blue cup"
STEPS = 4


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("ae")
    pipe = StableDiffusionPipeline.from_pretrained(write_tiny_pipeline(root / "tiny", corpus=[PROMPT]),
                                                   safety_checker=None)
    with torch.no_grad():
        for module in pipe.unet.modules():
            if getattr(module, "is_cross_attention", False):
                module.to_q.weight.mul_(6)
                module.to_k.weight.mul_(6)
    pipe.save_pretrained(root / "sharp")
    return root / "sharp"


def _indices(tokenizer, words):
    """Each word's token position in the prompt, found from the token ids alone (independent of tcompose)."""
    ids = tokenizer(PROMPT).input_ids
    return [ids.index(tokenizer(w, add_special_tokens=False).input_ids[0]) for w in words]


def _reference(model, seed_ids, indices, steps=STEPS, thresholds=None):
    from diffusers.pipelines.deprecated import StableDiffusionAttendAndExcitePipeline

    pipe = load_pipeline(str(model), device="cpu", dtype="fp32")
    ref = StableDiffusionAttendAndExcitePipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet, scheduler=pipe.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    latents, gens = initial_latents(seed_ids, (4, 32, 32))
    out = ref(PROMPT, token_indices=indices, latents=latents, generator=gens, num_inference_steps=steps,
              guidance_scale=7.5, attn_res=(16, 16), output_type="pt", thresholds=thresholds).images
    return out.float().mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _png(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_generate_attend_excite_equals_diffusers_pipeline(sharp, tmp_path):
    runner = CliRunner()
    common = ["generate", "--model", str(sharp), "--prompt", PROMPT, "--steps", str(STEPS), "--dtype", "fp32"]
    # thresholds the tiny model misses at steps 0 and 2: both refinement loops run (up to 20 updates each)
    on = runner.invoke(app, [*common, "--output", str(tmp_path / "on"), "--attend-excite", "--excite-words",
                             "ball,cup", "--excite-thresholds", "0:0.9,2:0.9"])
    assert on.exit_code == 0, on.output
    off = runner.invoke(app, [*common, "--output", str(tmp_path / "off")])
    assert off.exit_code == 0, off.output
    ours, plain = _png(tmp_path / "on/images/00000_00.png"), _png(tmp_path / "off/images/00000_00.png")
    from transformers import CLIPTokenizer

    indices = _indices(CLIPTokenizer.from_pretrained(sharp / "tokenizer"), ["ball", "cup"])
    reference = _reference(sharp, [image_seed(0, 0, 0)], indices, thresholds={0: 0.9, 2: 0.9})[0]
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 3
    assert np.abs(ours.astype(int) - plain.astype(int)).mean() > 0.5  # the method moved the image
    recorded = {name: json.loads((tmp_path / name / "run.json").read_text())["settings"] for name in ("on", "off")}
    assert recorded["on"]["attend_excite"]["words"] == ["ball", "cup"] and "attend_excite" not in recorded["off"]


def test_the_weakest_excited_token_gets_more_attention(sharp):
    """Over the sampling steps (tcompose's own capture, guided passes only), the least attended excited word's
    peak rises against plain sampling from the same noise, as the method's loss asks."""
    pipe = load_pipeline(str(sharp), device="cpu", dtype="fp32")
    indices = _indices(pipe.tokenizer, ["ball", "cup"])
    peaks = {}
    for name, excite in (("plain", None), ("excited", ExciteSettings())):
        with accumulate_attention(pipe.unet, ("down_16", "mid_16", "up_16"), True) as acc:
            generate_batch(pipe, [PROMPT], [image_seed(0, 0, 0)], STEPS, 7.5, excite=excite,
                           excite_indices=[indices] if excite else None)
        tokens = acc.token_maps()[0]
        peaks[name] = min(float(tokens[i].max()) for i in indices)
    assert peaks["excited"] > peaks["plain"] * 1.05, peaks


def test_the_loss_and_step_sizes_are_the_methods():
    """Hand-made maps: the peak of a token whose attention sits in one pixel, after the softmax of 100x the maps
    over tokens 1..T-2 and the 3x3 Gaussian; the loss is the weakest subject's 1 - peak."""
    maps = torch.zeros(4, 4, 6)
    maps[1, 2, 2] = 1.0
    kernel = gaussian_kernel()
    softmax = torch.softmax(maps[:, :, 1:-1] * 100, dim=-1)[:, :, 1]  # token 2 -> column 1
    padded = torch.nn.functional.pad(softmax[None, None], (1, 1, 1, 1), mode="reflect")[0, 0]
    expected = max(float((padded[y : y + 3, x : x + 3] * kernel).sum()) for y in range(4) for x in range(4))
    got = token_maxima(maps, [2, 3])
    assert float(got[0]) == pytest.approx(expected, rel=1e-6)
    assert float(excite_loss(got)) == pytest.approx(1 - float(got.min()))
    assert step_sizes(20, 3) == pytest.approx([20.0, 20 * 0.75 ** 0.5, 20 * 0.5 ** 0.5])
    assert float(kernel.sum()) == pytest.approx(1.0) and kernel[1, 1] == kernel.max()


def test_sdxl_and_a_missing_resolution_are_refused_before_loading(tmp_path):
    xl = write_tiny_pipeline(tmp_path / "xl", corpus=[PROMPT], size="tiny-sdxl")
    result = CliRunner().invoke(app, ["generate", "--model", str(xl), "--prompt", PROMPT, "--output",
                                      str(tmp_path / "g"), "--attend-excite"])
    assert result.exit_code == 2
    assert "--attend-excite: SDXL is not supported; it runs on SD1.x / SD2.x models" in result.output
    sd = write_tiny_pipeline(tmp_path / "sd", corpus=[PROMPT])
    result = CliRunner().invoke(app, ["generate", "--model", str(sd), "--prompt", PROMPT, "--output",
                                      str(tmp_path / "g2"), "--attend-excite", "--excite-res", "8"])
    assert result.exit_code == 2
    assert "--excite-res 8: the model has no cross-attention maps of side 8 at 64x64 px; its sides there are 16, 32" \
        in result.output
    assert not (tmp_path / "g2").exists()


def test_excite_options_without_the_flag_are_refused():
    result = CliRunner().invoke(app, ["generate", "--model", "m", "--prompt", PROMPT, "--output", "o",
                                      "--excite-steps", "10"])
    assert result.exit_code == 2 and "add --attend-excite" in result.output


def test_latency_and_attnviz_take_the_flag(sharp, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["latency", "--model", f"AE={sharp}", "--images", "1", "--warmup", "0", "--steps", "2",
                                 "--attend-excite", "--output", str(tmp_path / "lat")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "lat" / "latency.json").read_text())["models"]["AE"]
    assert record["attend_excite"]["steps"] == 25 and record["s_per_image"] > 0
    fig = tmp_path / "fig.png"
    result = runner.invoke(app, ["attnviz", "--prompt", PROMPT, "--model", f"AE={sharp}", "--steps", "2",
                                 "--attend-excite", "--output", str(fig)])
    assert result.exit_code == 0, result.output
    assert fig.is_file()
