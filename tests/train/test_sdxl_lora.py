"""TokenCompose on SDXL (two text encoders, micro-conditioning) and as LoRA adapters, on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tcompose.data.text import phrases_token_positions, tokenize_captions
from tcompose.grounding.objective import tokencompose_losses
from tcompose.models.lora import DEFAULT_TARGETS, add_lora, lora_parameter_count
from tcompose.models.spec import parse_model_spec
from tcompose.models.families import components_of_pipeline, family_named, load_components
from tcompose.testing.tiny_sd import build_tiny_unet, write_tiny_pipeline
from tcompose.train.config import TrainUnetConfig
from tcompose.train.examples import TrainingExamples, prepare_rows
from tcompose.train.loop import run as train

from helpers import make_training_setup, tiny_train_config

RES = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_training_setup(tmp_path_factory.mktemp("sdxl"), n_images=12, seed=5,
                               models={"sdxl": {"size": "tiny-sdxl"}, "sd": {}})


def small(setup, output, model="sdxl", **kw) -> TrainUnetConfig:
    return tiny_train_config(setup, output, model, **({"max_steps": 2} | kw))


def image(pipe, prompt="a red ball and a blue cup", seed=0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, height=RES, width=RES, generator=g, output_type="np").images[0]


# ------------------------------------------------------------------------------------------------------ SDXL


def test_one_set_of_token_positions_serves_both_sdxl_tokenizers(tmp_path, clip_bpe, coco_mini):
    """The second tokenizer pads with "!"; on real COCO captions and CLIP's real BPE every phrase's positions agree."""
    model = write_tiny_pipeline(tmp_path / "xl", tokenizer_source=clip_bpe, size="tiny-sdxl")
    comps = load_components(model)
    t1, t2 = comps.tokenizer, comps.tokenizer_2
    assert t2.pad_token == "!" and t1.pad_token != "!"
    captions = [a["caption"] for a in json.loads((coco_mini / "annotations" / "captions_val2017.json").read_text())["annotations"]][:200]
    ids1, ids2 = tokenize_captions(t1, captions), tokenize_captions(t2, captions)
    assert not torch.equal(ids1, ids2)  # the padding differs...
    for i, caption in enumerate(captions):
        end = int((ids1[i] == t1.eos_token_id).nonzero()[0]) + 1
        assert torch.equal(ids1[i, :end], ids2[i, :end]), caption  # ...the caption's own tokens do not
        words = caption.lower().strip(" .").split()[-2:]
        assert phrases_token_positions(t1, caption, words) == phrases_token_positions(t2, caption, words)


def test_sdxl_text_conditioning_equals_the_pipelines_own(setup):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(setup["sdxl"])
    prompt = "a red ball and a blue cup"
    emb, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    ids = tokenize_captions(pipe.tokenizer, [prompt])
    ids2 = tokenize_captions(pipe.tokenizer_2, [prompt])
    time_ids = torch.tensor([[64.0, 96.0, 0.0, 16.0, 64.0, 64.0]])
    comps = components_of_pipeline(pipe)
    assert comps.family is family_named("sdxl")
    cond = comps.encode_text({"input_ids": ids, "input_ids_2": ids2, "time_ids": time_ids})
    torch.testing.assert_close(cond["encoder_hidden_states"], emb)
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], pooled)
    assert torch.equal(cond["added_cond_kwargs"]["time_ids"], time_ids)


def test_sdxl_examples_carry_the_micro_conditioning_of_their_crop(setup):
    comps = load_components(setup["sdxl"])
    prep = prepare_rows(setup["masks"], comps)
    assert prep.token_ids["input_ids_2"].shape == prep.token_ids["input_ids"].shape
    ex = TrainingExamples(prep, 48, (4, 24, 24), 1000, seed=0)[(0, 0)]
    # the synthetic scenes are 64 x 64: no resize crop offset, original (h, w) = (64, 64), target 48 x 48
    assert ex["time_ids"].tolist() == [64.0, 64.0, 0.0, 0.0, 48.0, 48.0] and "input_ids_2" in ex


def test_sdxl_trains_with_the_grounding_losses_and_loads_as_an_sdxl_pipeline(setup, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    summary = train(small(setup, tmp_path / "run"))
    assert summary["family"] == "sdxl" and summary["steps"] == 2
    assert summary["supervised_groups"] == {"mid_8": 2, "up_8": 4}  # the tiny SDXL at 16x16 latents
    assert summary["final_losses"]["token"] > 0 and summary["final_losses"]["pixel"] > 0
    assert summary["grounding_before"]["score"] is not None and summary["grounding_after"]["score"] is not None
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "run")
    assert image(pipe).shape == (RES, RES, 3)
    trained = load_file(tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_file(setup["sdxl"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(trained[k], base[k]) for k in base)


def test_map_reduction_mean_divides_each_groups_token_loss_by_its_map_count(setup):
    comps = load_components(setup["sdxl"])
    prep = prepare_rows(setup["masks"], comps)
    from tcompose.train.examples import collate

    batch = collate([TrainingExamples(prep, RES, (4, 16, 16), 1000, seed=0)[(i, i)] for i in range(2)])
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = comps.encode_text(batch)
    out = {r: tokencompose_losses(comps.unet, latents, cond, batch, comps.noise_scheduler, ("up_8",), 1.0, 0.1,
                                  map_reduction=r) for r in ("sum", "mean")}
    torch.testing.assert_close(out["mean"]["token"], out["sum"]["token"] / 4)  # up_8 has 4 maps
    torch.testing.assert_close(out["mean"]["pixel"], out["sum"]["pixel"])  # the pixel loss averages maps anyway


# ------------------------------------------------------------------------------------------------------ LoRA


def test_lora_trains_only_its_adapters_and_the_grounding_losses_reach_them():
    unet = build_tiny_unet(0)
    names = add_lora(unet, rank=4)
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert set(trainable) == set(names) and all("lora_" in n for n in names)
    assert sum(p.numel() for p in trainable.values()) == lora_parameter_count(unet.config, 4, DEFAULT_TARGETS)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    # the token loss alone: its gradient reaches the adapters of the supervised layers' to_q and to_k
    g = torch.Generator().manual_seed(0)
    latents, emb = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    masks = torch.zeros(1, 1, 64, 64)
    masks[..., :32, :32] = 1
    batch = {"noise": torch.randn(1, 4, 32, 32, generator=g), "timesteps": torch.tensor([500]), "masks": masks,
             "word_index": torch.tensor([[[2]]]), "word_valid": torch.tensor([[[True]]])}
    from tcompose.testing.tiny_sd import SD_SCHEDULER
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k not in ("skip_prk_steps", "set_alpha_to_one", "steps_offset")})
    losses = tokencompose_losses(unet, latents, emb, batch, sched, ("up",), 1.0, 0.0,
                                 backward=lambda total: (total - losses_ldm(unet, latents, emb, batch, sched)).backward())
    assert losses["token"] > 0
    for name, p in trainable.items():
        if name.startswith("up_blocks") and ".attn2.to_k." in name and "lora_B" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def losses_ldm(unet, latents, emb, batch, sched):
    """The denoising loss of the same forward, so that ``total - ldm`` leaves the grounding terms alone."""
    with torch.no_grad():
        return tokencompose_losses(unet, latents, emb, batch, sched, ("up",), 0.0, 0.0)["ldm"]


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_lora_output_loads_changes_images_and_fuses_to_base_plus_adapters(setup, tmp_path, model):
    from diffusers import DiffusionPipeline

    out = tmp_path / "lora"
    summary = train(small(setup, out, model=model, lora_rank=4, lora_alpha=8, fuse=True, checkpoint_every=1))
    n = lora_parameter_count(load_components(setup[model]).unet.config, 4)
    assert summary["trainable_parameters"] == n and summary["lora"]["rank"] == 4
    ckpt = load_file(out / "checkpoints" / "step-000002" / "model.safetensors")
    assert sum(t.numel() for t in ckpt.values()) == n and all("lora_" in k for k in ckpt)  # adapters only
    assert not (out / "unet").exists() and (out / "pytorch_lora_weights.safetensors").is_file()

    base = DiffusionPipeline.from_pretrained(setup[model])
    plain = image(base)
    base.load_lora_weights(out)
    assert np.abs(image(base) - plain).max() > 1e-4  # the adapters change the image
    # the fused pipeline: every weight the adapters do not touch is the base's, bit for bit; the targeted ones
    # are base + (alpha / r) B A
    fused = load_file(out / "fused" / "unet" / "diffusion_pytorch_model.safetensors")
    original = load_file(setup[model] / "unet" / "diffusion_pytorch_model.safetensors")
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    targeted = 0
    for key, w in original.items():
        module = key.removesuffix(".weight")
        down, up = lora.get(f"unet.{module}.lora.down.weight"), lora.get(f"unet.{module}.lora.up.weight")
        if down is None:
            assert torch.equal(fused[key], w), key
        else:
            targeted += 1
            torch.testing.assert_close(fused[key], w + 2.0 * up @ down, rtol=1e-5, atol=1e-6)
    assert targeted > 0


def test_lora_resume_is_exact_and_refuses_another_rank(setup, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(small(setup, straight, model="sd", lora_rank=4, max_steps=4, eval_fraction=0.0))
    train(small(setup, resumed, model="sd", lora_rank=4, max_steps=2, eval_fraction=0.0, checkpoint_every=2))
    with pytest.raises(ValueError, match="--lora-rank 4 -> 8"):
        train(small(setup, resumed, model="sd", lora_rank=8, max_steps=4, eval_fraction=0.0, resume="latest"))
    with pytest.raises(ValueError, match=r"--lora-targets to_q,to_k,to_v,to_out.0 -> to_q,to_k"):
        train(small(setup, resumed, model="sd", lora_rank=4, lora_targets=("to_q", "to_k"), max_steps=4,
                    eval_fraction=0.0, resume="latest"))
    train(small(setup, resumed, model="sd", lora_rank=4, max_steps=4, eval_fraction=0.0, resume="latest"))
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_spec_takes_a_lora():
    spec = parse_model_spec("xl=stabilityai/stable-diffusion-xl-base-1.0,lora=runs/xl-lora,lora_scale=0.8")
    assert (spec.lora, spec.lora_scale) == ("runs/xl-lora", 0.8)
    for bad, message in [("a=m,lora_scale=0.5", "goes with lora"), ("a=m,lora=d,lora_scale=x", "not a number"),
                         ("a=m,lora=d,lora_scale=nan", "finite")]:
        with pytest.raises(ValueError, match=message):
            parse_model_spec(bad)


def test_a_lora_run_generates_with_its_folder_as_the_model(setup, tmp_path):
    from tcompose.evaluate.generate import GenerateConfig
    from tcompose.evaluate.generate import run as generate

    out = tmp_path / "lora"
    train(small(setup, out, model="sd", lora_rank=4, eval_fraction=0.0))
    from tcompose.evaluate.settings import GenerationSettings

    common = dict(prompts=["a red ball"], settings=GenerationSettings(steps=2, height=RES, width=RES, device="cpu"))
    generate(GenerateConfig(model=str(out), output=tmp_path / "g1", **common), progress=False)
    generate(GenerateConfig(model=str(setup["sd"]), lora=str(out), output=tmp_path / "g2", **common), progress=False)
    generate(GenerateConfig(model=str(setup["sd"]), output=tmp_path / "g3", **common), progress=False)
    from PIL import Image

    a, b, c = (np.asarray(Image.open(tmp_path / g / "images" / "00000_00.png"), dtype=np.int16) for g in ("g1", "g2", "g3"))
    assert np.array_equal(a, b) and np.abs(a - c).max() > 0
