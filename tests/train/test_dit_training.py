"""train-unet on the diffusion transformers (SD3 / SD3.5 and FLUX.1, tiny random pipelines): two steps of full and
LoRA training whose outputs load in diffusers' own pipelines and draw, exact resume, the grounding losses moving
attention into the masks, the quantized base, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file

from tcompose.io.errors import UserError
from tcompose.testing.tiny_dit import write_tiny_flux_pipeline, write_tiny_sd3_pipeline
from tcompose.train.loop import run as train

from helpers import make_training_setup, tiny_train_config

PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
L = 16  # T5 tokens of the captions (--max-sequence-length): short, so the tests stay fast


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_train")
    setup = make_training_setup(root, n_images=24, seed=0)  # also an SD1.x "base", for the refusals
    return setup | {"sd3": write_tiny_sd3_pipeline(root / "sd3", corpus=setup["captions"]),
                    "flux": write_tiny_flux_pipeline(root / "flux", corpus=setup["captions"])}


def config(setup, output, model, **kw):
    dit = {"max_sequence_length": L} if model in PIPELINES else {}
    return tiny_train_config(setup, output, model=model, **({"max_steps": 2} | dit | kw))


def draw(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe("a cat and a dog", num_inference_steps=1, height=32, width=32, max_sequence_length=L,
                    output_type="pt", generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_two_full_steps_save_a_pipeline_diffusers_loads(setup, tmp_path, name):
    out = tmp_path / name
    summary = train(config(setup, out, name))
    assert summary["family"] == name and summary["steps"] == 2 and summary["lora"] is None
    assert summary["supervised_groups"] == {"sd3": {"joint_1": 1, "joint_2": 1}, "flux": {"double_1": 1}}[name]
    assert summary["objective"]["packed"] == (name == "flux") and summary["grounding_after"]["score"] is not None
    pipe = PIPELINES[name].from_pretrained(out)
    base = PIPELINES[name].from_pretrained(setup[name])
    trained, before = pipe.transformer.state_dict(), base.transformer.state_dict()
    assert trained.keys() == before.keys() and any(not torch.equal(trained[k], before[k]) for k in trained)
    image = draw(pipe)
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    card = (out / "README.md").read_text()
    assert f"from diffusers import {PIPELINES[name].__name__}" in card and "the whole transformer" in card
    assert "flow matching | timesteps logit-normal (0, 1)" in card


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_two_lora_steps_load_with_load_lora_weights(setup, tmp_path, name):
    out = tmp_path / name
    summary = train(config(setup, out, name, lora_rank=4, fuse=name == "sd3"))
    assert summary["lora"]["targets"] == ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                          "to_add_out"]
    meta = json.loads((out / "tcompose_lora.json").read_text())
    assert meta["family"] == name and meta["rank"] == 4
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.") for k in weights)
    assert any("add_q_proj.lora_B" in k for k in weights) and any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    pipe = PIPELINES[name].from_pretrained(setup[name])
    plain = draw(pipe)
    pipe.load_lora_weights(out)
    adapted = draw(pipe)
    assert adapted.shape == (1, 3, 32, 32) and not torch.equal(adapted, plain)
    if name == "sd3":  # --fuse: the base with the adapters merged, a pipeline of its own
        fused = draw(StableDiffusion3Pipeline.from_pretrained(out / "fused"))
        torch.testing.assert_close(fused, adapted, rtol=0, atol=2e-3)


@pytest.mark.parametrize("name, lora", [("sd3", 4), ("flux", None)])
def test_resume_is_exact(setup, tmp_path, name, lora):
    """2 steps, then 2 more from the checkpoint == 4 straight, bit for bit (the flow-matching timesteps are drawn
    from each example's own generator)."""
    common = dict(lambda_token=1.0, gamma_pixel=0.1, checkpoint_every=2, eval_fraction=0.0, lora_rank=lora)
    train(config(setup, tmp_path / "straight", name, max_steps=4, **common))
    train(config(setup, tmp_path / "resumed", name, max_steps=2, **common))
    summary = train(config(setup, tmp_path / "resumed", name, max_steps=4, resume="latest", **common))
    assert summary["steps_this_run"] == 2
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-000004" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cached_latents_train_as_the_vae_encodes(setup, tmp_path):
    """--cache-latents (the VAE's mean and std cached once) trains as encoding every step does: the latents get
    the VAE's shift and scale either way (FLUX: packed after)."""
    plain = train(config(setup, tmp_path / "plain", "flux", eval_fraction=0.0))
    cached = train(config(setup, tmp_path / "cached", "flux", eval_fraction=0.0, cache_latents=True))
    assert cached["latent_cache"]["images"] > 0
    for key in ("ldm", "token", "pixel"):
        assert cached["final_losses"][key] == pytest.approx(plain["final_losses"][key], rel=1e-4), key


def test_grounding_losses_move_attention_into_masks(setup, tmp_path):
    """Same seed and steps, losses off vs on (FLUX, full): on grounds far better than off and than before.
    (The tiny SD3 learns it too, but several times slower: its CLIP and T5 copies of each noun must both move.)"""
    common = dict(batch_size=8, max_steps=30, lr=3e-3, max_grad_norm=0.0, eval_fraction=0.2, eval_max_examples=8,
                  eval_timesteps=(300, 700), log_every=10)
    off = train(config(setup, tmp_path / "off", "flux", lambda_token=0.0, gamma_pixel=0.0, **common))
    on = train(config(setup, tmp_path / "on", "flux", lambda_token=1.0, gamma_pixel=0.1, **common))
    before = on["grounding_before"]["score"]
    assert off["grounding_before"]["score"] == pytest.approx(before)
    assert on["grounding_after"]["score"] > off["grounding_after"]["score"] + 0.1, (off["grounding_after"], on["grounding_after"])
    assert on["grounding_after"]["score"] > before + 0.1


@pytest.fixture
def fresh_accelerator_state():
    """A run in another mixed precision needs a fresh accelerate state in this process (and leaves one behind)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("name, kind, precision", [("flux", "nf4", "bf16"), ("sd3", "int8", "no")])
def test_lora_on_a_quantized_base_with_the_memory_options(setup, tmp_path, fresh_accelerator_state, capsys, name,
                                                          kind, precision):
    """--quantize-base (bitsandbytes, on CPU here) with gradient checkpointing, 8-bit AdamW (and bf16): the
    adapters train and load on the full-precision base."""
    out = tmp_path / name
    summary = train(config(setup, out, name, lora_rank=4, quantize_base=kind, mixed_precision=precision,
                           gradient_checkpointing=True, optimizer="adamw8bit", max_steps=1))
    assert summary["quantize_base"] == kind and summary["mixed_precision"] == precision
    assert "quantize: " in capsys.readouterr().out
    assert all(v == v for v in summary["final_losses"].values())  # finite
    pipe = PIPELINES[name].from_pretrained(setup[name])
    pipe.load_lora_weights(out)
    assert draw(pipe).shape == (1, 3, 32, 32)


def test_the_command_line_takes_the_transformer_options(setup, tmp_path):
    """train-unet's options reach the run: the timestep density, the joint softmax, the T5 length, the blocks and
    the LoRA targets, recorded in the summary."""
    from tcompose.cli import main

    out = tmp_path / "cli"
    args = ["train-unet", "--data", str(setup["masks"]), "--model", str(setup["sd3"]), "--output", str(out),
            "--resolution", "32", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "1", "--num-workers", "0",
            "--eval-fraction", "0", "--weighting-scheme", "mode", "--mode-scale", "1.0", "--attention-norm", "joint",
            "--max-sequence-length", "12", "--layers", "joint_1-2", "--lora-rank", "2", "--lora-targets",
            "to_q,add_k_proj", "--log-every", "1"]
    assert main(args) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["objective"] == {"weighting_scheme": "mode", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.0,
                                    "attention_norm": "joint", "packed": False, "guidance": None}
    assert summary["supervised_groups"] == {"joint_1": 1, "joint_2": 1}
    assert summary["lora"]["targets"] == ["to_q", "add_k_proj"] and summary["config"]["max_sequence_length"] == 12
    assert summary["final_losses"]["token"] > 0


@pytest.mark.parametrize("model, kw, message", [
    ("sd3", dict(snr_gamma=5.0), "--snr-gamma: not used in training a SD3 / SD3.5 model"),
    ("flux", dict(prediction_type="v_prediction", noise_offset=0.1), "--prediction-type, --noise-offset: not used"),
    ("flux", dict(text_encoder="x"), "--text-encoder: not used"),
    ("sd3", dict(guidance_scale=5.0), "--guidance-scale: not used in training a SD3 / SD3.5 model"),
    ("base", dict(weighting_scheme="mode"), "--weighting-scheme: not used in training a SD1.x / SD2.x model"),
    ("base", dict(lora_rank=4, quantize_base="nf4"), "--quantize-base: not used"),
    ("sd3", dict(layers=("mid",)), "--layers 'mid': name a transformer block"),
    ("flux", dict(layers=("double_7",)), "--layers double_7: this transformer has no such block .* double_0-2, single_0-1"),
    ("sd3", dict(quantize_base="nf4"), "--quantize-base goes with --lora-rank"),
    ("sd3", dict(weighting_scheme="uniform"), "--weighting-scheme must be one of"),
])
def test_refusals_come_before_any_weight_is_read(setup, tmp_path, monkeypatch, model, kw, message):
    import tcompose.models.families as families

    def no_loading(*_a, **_k):
        raise AssertionError("weights were read before the refusal")

    monkeypatch.setattr(families, "load_components", no_loading)
    with pytest.raises(UserError, match=message):
        train(config(setup, tmp_path / "out", model, **kw))
