"""What users of diffusers' trainers expect from train-unet: validation grids, Min-SNR weighting, a model card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tcompose.data.synthetic import make_scenes
from tcompose.grounding.objective import denoising_loss, min_snr_weights, snr
from tcompose.io.figures import figure_size
from tcompose.masks.config import MasksConfig
from tcompose.masks.stage import run as make_masks
from tcompose.testing.tiny_sd import write_tiny_pipeline
from tcompose.train.config import TrainUnetConfig
from tcompose.train.loop import run as train

RES = 32
PROMPTS = ("a red ball and a blue cup", "a green box on a table")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    scenes = make_scenes(root / "scenes", n_images=12, size=64, seed=7)
    make_masks(MasksConfig(coco_dir=scenes, output=root / "masks", split="train2017", captions="all"), progress=False)
    captions = [a["caption"] for a in json.loads((scenes / "annotations" / "captions_train2017.json").read_text())["annotations"]]
    return {"masks": root / "masks", "base": write_tiny_pipeline(root / "base", corpus=captions + list(PROMPTS), seed=0)}


def small(setup, output, **kw) -> TrainUnetConfig:
    cfg = dict(data=setup["masks"], output=output, model=str(setup["base"]), resolution=RES, batch_size=2, grad_accum=1,
               max_steps=4, lr=1e-3, lambda_token=1.0, gamma_pixel=0.1, num_workers=0, checkpoint_every=0,
               eval_fraction=0.2, eval_max_examples=2, eval_timesteps=(500,), progress=False, log_every=1)
    cfg.update(kw)
    return TrainUnetConfig(**cfg)


def _events(logs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next(p for p in logs.rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    acc.Reload()
    return acc


def test_validation_grids_appear_at_the_given_steps_and_do_not_change_training(setup, tmp_path):
    plain = tmp_path / "plain"
    train(small(setup, plain))
    out = tmp_path / "val"
    summary = train(small(setup, out, validation_prompts=PROMPTS, validation_every=2, validation_steps=3))
    grids = sorted(p.name for p in (out / "validation").iterdir())
    assert grids == ["step-000002.png", "step-000004.png"] and summary["validation"] == "validation/step-000004.png"
    with Image.open(out / "validation" / "step-000002.png") as im:
        assert im.size == figure_size(2, 2, 192)  # two prompts; two nouns each (ball, cup / box, table)
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
