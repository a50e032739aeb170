"""What users of diffusers' trainers expect from train-unet: validation grids, Min-SNR weighting, a model card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tcompose.grounding.objective import denoising_loss, min_snr_weights, snr
from tcompose.io.figures import LABEL_PX, TITLE_PX, figure_size
from tcompose.train.config import TrainUnetConfig
from tcompose.train.loop import run as train

from helpers import make_training_setup, tiny_train_config

RES = 32
PROMPTS = ("a red ball and a blue cup", "a green box on a table")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_training_setup(tmp_path_factory.mktemp("features"), n_images=12, seed=7, corpus_extra=PROMPTS)


def small(setup, output, **kw) -> TrainUnetConfig:
    return tiny_train_config(setup, output, **kw)


def _events(logs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next(p for p in logs.rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    acc.Reload()
    return acc


VALIDATION = {PROMPTS[0]: 2, PROMPTS[1]: 2, "a red ball": 1}  # prompt -> its nouns (ball, cup / box, table / ball)
PANEL = 192  # validation grids' panel side in pixels


def check_validation_grid(path):
    """The grid's layout and that every panel carries a picture: a row per prompt, the image then one heat map
    per noun (panels at the positions draw_attention_figure gives them), nothing where a prompt has no more nouns."""
    n_maps = max(VALIDATION.values())
    with Image.open(path) as im:
        assert im.size == figure_size(len(VALIDATION), n_maps, PANEL)
        grid = np.asarray(im.convert("RGB")).astype(np.float64)

    def panel(r, c, inset=4):  # inside the panel's square, a few pixels off its edges
        top, left = r * (TITLE_PX + PANEL) + TITLE_PX, LABEL_PX + c * PANEL
        return grid[top + inset : top + PANEL - inset, left + inset : left + PANEL - inset]

    for r, nouns in enumerate(VALIDATION.values()):
        image = panel(r, 0)
        assert image.std() > 10, f"row {r}: the generated image is blank"
        heat = [panel(r, 1 + j) for j in range(nouns)]
        for j, h in enumerate(heat):
            # the panel is the image under a 50% jet overlay: recover the overlay, it must vary across the panel
            overlay = np.clip(2 * h - image, 0, 255)
            assert np.abs(h - image).mean() > 10, f"row {r}, noun {j}: no heat map over the image"
            assert overlay.std(axis=(0, 1)).mean() > 20, f"row {r}, noun {j}: a flat heat map"
        for j in range(1, nouns):  # each noun its own map
            assert np.abs(heat[j] - heat[0]).mean() > 1, f"row {r}: nouns 0 and {j} show the same map"
        for c in range(1 + nouns, 1 + n_maps):  # a prompt with fewer nouns than the widest row: empty there
            assert (panel(r, c, inset=0) == 255).all(), f"row {r}: panel {c} should be empty"


def test_validation_grids_appear_at_the_given_steps_and_do_not_change_training(setup, tmp_path):
    plain = tmp_path / "plain"
    train(small(setup, plain))
    out = tmp_path / "val"
    summary = train(small(setup, out, validation_prompts=tuple(VALIDATION), validation_every=2, validation_steps=3))
    grids = sorted(p.name for p in (out / "validation").iterdir())
    assert grids == ["step-000002.png", "step-000004.png"] and summary["validation"] == "validation/step-000004.png"
    for name in grids:
        check_validation_grid(out / "validation" / name)
    acc = _events(out / "logs")
    assert [e.step for e in acc.Images("validation")] == [2, 4]
    assert [e.step for e in acc.Scalars("grounding/score")] == [2, 4]
    # validation draws from its own seeded generators only: the trained weights are those of a run without it
    a = load_file(plain / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_options_are_checked(setup, tmp_path):
    with pytest.raises(ValueError, match="needs at least one --validation-prompt"):
        small(setup, tmp_path, validation_every=10).validate()
    with pytest.raises(ValueError, match="--snr-gamma must be > 0"):
        small(setup, tmp_path, snr_gamma=0.0).validate()


# ---------------------------------------------------------------------------------------------------- Min-SNR


def _alphas_cumprod_float64(T=1000, beta_start=0.00085, beta_end=0.012) -> np.ndarray:
    betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2  # "scaled_linear"
    return np.cumprod(1.0 - betas)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_a_float64_recomputation_of_diffusers(prediction):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction)
    t = torch.tensor([0, 1, 10, 100, 250, 500, 750, 999])
    gamma = 5.0
    a = _alphas_cumprod_float64()[t.numpy()]
    s = a / (1 - a)
    expect = np.minimum(s, gamma) / (s if prediction == "epsilon" else s + 1)
    got = min_snr_weights(sched, t, gamma)
    # the scheduler keeps alpha_bar in float32: at t = 0, 1 - alpha_bar ~ 8.5e-4 carries a relative error ~7e-5
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-4)
    torch.testing.assert_close(snr(sched, t), compute_snr(sched, t).float())  # diffusers' own SNR
    # diffusers' train_text_to_image weighting, written out, on a random prediction
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(8, 4, 6, 6, generator=g), torch.randn(8, 4, 6, 6, generator=g)
    s_t = compute_snr(sched, t)
    w = torch.stack([s_t, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    w = w / s_t if prediction == "epsilon" else w / (s_t + 1)
    ref = (torch.nn.functional.mse_loss(pred, target, reduction="none").mean(dim=[1, 2, 3]) * w).mean()
    torch.testing.assert_close(denoising_loss(pred, target, got), ref)


def test_snr_gamma_changes_only_the_denoising_term(setup, tmp_path):
    a = train(small(setup, tmp_path / "a", max_steps=1, eval_fraction=0.0))
    b = train(small(setup, tmp_path / "b", max_steps=1, eval_fraction=0.0, snr_gamma=0.05))  # weights < 1 almost anywhere
    assert a["final_losses"]["ldm"] != b["final_losses"]["ldm"]
    assert a["final_losses"]["token"] == b["final_losses"]["token"]  # the first step: the same weights, unweighted
    assert a["final_losses"]["pixel"] == b["final_losses"]["pixel"]


# ------------------------------------------------------------------------------------------------ model card


def test_the_model_card_parses_and_names_the_base_model(setup, tmp_path):
    from huggingface_hub import ModelCard

    from tcompose.cli import main

    out = tmp_path / "run"
    args = ["train-unet", "--data", str(setup["masks"]), "--model", str(setup["base"]), "--output", str(out),
            "--resolution", str(RES), "--batch-size", "2", "--grad-accum", "1", "--max-steps", "2", "--num-workers",
            "0", "--eval-fraction", "0.2", "--eval-timesteps", "500", "--validation-prompt", PROMPTS[0]]
    assert main(args) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == str(setup["base"]) and card.data.pipeline_tag == "text-to-image"
    assert card.data.library_name == "diffusers" and "tokencompose" in card.data.tags
    assert card.data.license == "other"  # the tiny base model has no card to take a licence from
    assert "tcompose train-unet --data" in card.text and "validation/step-000002.png" in card.text
    summary = json.loads((out / "training_summary.json").read_text())
    assert f"{summary['grounding_after']['score']:.4f}" in card.text


def test_the_model_card_takes_the_base_models_licence(setup, tmp_path):
    import shutil

    from huggingface_hub import ModelCard

    base = tmp_path / "base"
    shutil.copytree(setup["base"], base)
    (base / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# a base model\n")
    train(small(setup, tmp_path / "run", model=str(base), max_steps=1, eval_fraction=0.0, lora_rank=4))
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert card.data.license == "creativeml-openrail-m" and "lora" in card.data.tags
    assert "load_lora_weights" in card.text
