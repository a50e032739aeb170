"""The model-family seam: each tiny model is served by its own family, and what a family gives equals what
diffusers' own pipeline of that family computes."""

from __future__ import annotations

import pytest
import torch

from tcompose.models.families import (FAMILIES, family_named, family_of, family_of_model, family_of_pipeline,
                                      load_components)
from tcompose.models.sampling import PromptEmbeddings
from tcompose.testing.tiny_sd import UNET_SIZES, write_tiny_pipeline

CAPTIONS = ["a red ball and a blue cup", "a cat on a sofa"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {"sd": write_tiny_pipeline(root / "sd", corpus=CAPTIONS),
            "sdxl": write_tiny_pipeline(root / "sdxl", corpus=CAPTIONS, size="tiny-sdxl")}


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_each_model_is_served_by_its_family(models, name):
    comps = load_components(models[name])
    assert comps.family is family_named(name) is family_of_model(models[name]) is family_of(comps.unet)
    assert comps.family.owns_pipeline(comps.pipeline(comps.noise_scheduler))
    assert len(comps.text_encoders) == {"sd": 1, "sdxl": 2}[name]


def test_the_families_partition_the_unet_layouts():
    """Every UNet layout tcompose builds belongs to exactly one family."""
    for size, config in UNET_SIZES.items():
        owners = [f.name for f in FAMILIES if f.matches(dict(config))]
        assert owners == (["sdxl"] if "sdxl" in size else ["sd"]), size


def test_an_unknown_denoiser_is_refused_by_name():
    with pytest.raises(ValueError, match="UNet3DConditionModel"):
        family_of({"_class_name": "UNet3DConditionModel"})
    with pytest.raises(ValueError, match="unknown model family 'kandinsky'"):
        family_named("kandinsky")


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_prompt_embeddings_equal_the_pipelines_own(models, name):
    """The family's per-prompt embeddings, batched by PromptEmbeddings, are what the pipeline's encode_prompt gives
    (with guidance: SDXL's empty prompt is zeros, as force_zeros_for_empty_prompt says)."""
    comps = load_components(models[name])
    pipe = comps.pipeline(comps.noise_scheduler)
    got = PromptEmbeddings(pipe)(CAPTIONS, guidance=True)
    if name == "sd":
        cond, uncond = pipe.encode_prompt(CAPTIONS, "cpu", 1, True, negative_prompt=[""] * 2)
        torch.testing.assert_close(got["prompt_embeds"], cond)
        torch.testing.assert_close(got["negative_prompt_embeds"], uncond)
    else:
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(CAPTIONS, device="cpu", num_images_per_prompt=1,
                                                          do_classifier_free_guidance=True)
        torch.testing.assert_close(got["prompt_embeds"], emb)
        torch.testing.assert_close(got["pooled_prompt_embeds"], pooled)
        assert not got["negative_prompt_embeds"].any() and not got["negative_pooled_prompt_embeds"].any()
        torch.testing.assert_close(got["negative_prompt_embeds"], neg)
        torch.testing.assert_close(got["negative_pooled_prompt_embeds"], neg_pooled)
    assert family_of_pipeline(pipe) is comps.family


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_phrase_positions_point_at_the_phrase_tokens(models, name):
    comps = load_components(models[name])
    caption = CAPTIONS[0]
    positions = comps.phrase_positions(caption, ["blue cup", "ball"])
    ids = comps.tokenize([caption])["input_ids"][0]
    cup = comps.tokenizer("blue cup", add_special_tokens=False).input_ids
    ball = comps.tokenizer("ball", add_special_tokens=False).input_ids
    assert ids[positions[0]].tolist() == cup and ids[positions[1]].tolist() == ball


def test_example_conditioning_runs_the_denoiser(models):
    """The family's random conditioning has the shapes its denoiser takes (the bench's training step)."""
    for name, path in models.items():
        comps = load_components(path)
        family, config = comps.family, dict(comps.unet.config)
        cond = family.example_conditioning(config, 2, 8, 77, torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = comps.unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), **cond).sample
        assert out.shape == (2, 4, 8, 8), name
        assert sum(family.attention_groups(config, (8, 8)).values()) > 0


def test_per_block_cross_attention_widths_are_one_width():
    """diffusers allows cross_attention_dim per block (all equal when one text encoder conditions them)."""
    config = {**UNET_SIZES["tiny"], "cross_attention_dim": (32, 32)}
    cond = family_of(config).example_conditioning(config, 1, 8, 77, torch.Generator().manual_seed(0))
    assert cond["encoder_hidden_states"].shape == (1, 77, 32)


def test_a_unet_of_another_family_is_refused(models, tmp_path):
    from tcompose.evaluate.sampling import load_pipeline

    with pytest.raises(ValueError, match="SDXL denoiser, but .* is SD1.x / SD2.x"):
        load_pipeline(str(models["sd"]), unet=str(models["sdxl"]), device="cpu")
