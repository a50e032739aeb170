"""The SD3 / SD3.5 and FLUX.1 families on tiny random pipelines (tcompose.testing.tiny_dit): each model is served by
its family; the text conditioning, the phrase positions, the packed latents and the images are what diffusers'
own StableDiffusion3Pipeline / FluxPipeline compute; folders missing a part and swaps the families do not take
are refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from tcompose.grounding.flow_matching import image_ids, pack_latents, unpack_latents
from tcompose.io.errors import UserError
from tcompose.models.families import (components_of_pipeline, family_named, family_of, family_of_model,
                                      family_of_pipeline, load_components)
from tcompose.models.loading import ModelFolderError
from tcompose.models.sampling import PromptEmbeddings, generate_batch
from tcompose.testing.tiny_dit import write_tiny_flux_pipeline, write_tiny_sd3_pipeline

CAPTIONS = ["a skateboarder and a hot dog beside a dog", "a cat on a wine-glass table"]
PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
L = 24  # T5 tokens: short, so the tests stay fast


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_families")
    return {"sd3": write_tiny_sd3_pipeline(root / "sd3", corpus=CAPTIONS),
            "flux": write_tiny_flux_pipeline(root / "flux", corpus=CAPTIONS)}


def components(models, name):
    comps = load_components(models[name])
    comps.max_sequence_length = L
    return comps


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_each_model_is_served_by_its_family(models, name):
    comps = components(models, name)
    assert comps.family is family_named(name) is family_of_model(models[name]) is family_of(comps.unet)
    assert comps.denoiser is comps.unet and type(comps.unet).__name__.endswith("Transformer2DModel")
    pipe = comps.pipeline(comps.noise_scheduler)
    assert isinstance(pipe, PIPELINES[name]) and family_of_pipeline(pipe) is comps.family
    assert pipe.transformer is comps.unet and pipe.vae is comps.vae  # no copies
    assert len(comps.text_encoders) == {"sd3": 3, "flux": 2}[name]
    back = components_of_pipeline(pipe)
    assert back.denoiser is comps.unet and back.text_encoders == comps.text_encoders
    assert not comps.family.has_safety_checker and not comps.family.supports_attend_excite
    with pytest.raises(UserError, match="no safety checker"):
        comps.pipeline(comps.noise_scheduler, safety_checker=object())


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_reading_in_bf16_gives_the_bits_of_reading_in_float32_then_casting(models, name):
    """What a bf16 LoRA run relies on to read the model in bf16 (the host never holds it in float32): every weight of
    every part is bf16 and equals the float32 read cast to bf16."""
    wide, narrow = load_components(models[name]), load_components(models[name], dtype=torch.bfloat16)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(wide, part) is None:
            continue
        a, b = getattr(wide, part).state_dict(), getattr(narrow, part).state_dict()
        assert a.keys() == b.keys()
        for key, value in a.items():
            if value.is_floating_point():
                assert b[key].dtype == torch.bfloat16 and torch.equal(value.to(torch.bfloat16), b[key]), (part, key)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_text_conditioning_equals_the_pipelines_encode_prompt(models, name):
    """encode_text of tokenize's ids == the pipeline's own encode_prompt (run as its __call__ runs it: no grad),
    bit for bit; PromptEmbeddings (generation) gives the same per prompt."""
    comps = components(models, name)
    cond = comps.encode_text(comps.tokenize(CAPTIONS))
    pipe = PIPELINES[name].from_pretrained(models[name])
    with torch.no_grad():
        if name == "sd3":
            emb, _, pooled, _ = pipe.encode_prompt(CAPTIONS, CAPTIONS, CAPTIONS, do_classifier_free_guidance=False,
                                                   max_sequence_length=L)
        else:
            emb, pooled, text_ids = pipe.encode_prompt(CAPTIONS, CAPTIONS, max_sequence_length=L)
            assert torch.equal(cond["txt_ids"], text_ids)
    assert torch.equal(cond["encoder_hidden_states"], emb) and torch.equal(cond["pooled_projections"], pooled)
    width = comps.unet.config.joint_attention_dim
    assert emb.shape == (2, (77 if name == "sd3" else 0) + L, width)
    got = PromptEmbeddings(comps.pipeline(comps.noise_scheduler))(CAPTIONS, guidance=False)
    assert got["prompt_embeds"].shape[1] == comps.family.default_max_sequence_length + (77 if name == "sd3" else 0)


def test_sd3_phrase_positions_land_on_the_phrase_columns(models):
    """SD3's columns: CLIP's 77 (their ids the phrase's BPE tokens), then T5's (their ids the phrase's pieces in
    the caption, shifted by 77); the conditioning's T5 columns are T5's hidden states at those positions."""
    comps = components(models, "sd3")
    caption = CAPTIONS[0]
    ids = comps.tokenize([caption])
    hot_dog, dog, skater = comps.phrase_positions(caption, ["hot dog", "dog", "skateboarder"])
    clip, t5 = ids["input_ids"][0], ids["input_ids_3"][0]
    for positions, phrase in ((hot_dog, "hot dog"), (skater, "skateboarder")):
        in_clip = [p for p in positions if p < 77]
        in_t5 = [p - 77 for p in positions if p >= 77]
        assert clip[in_clip].tolist() == comps.tokenizer(phrase, add_special_tokens=False).input_ids
        assert comps.tokenizer_3.decode(t5[in_t5]).replace(" ", "") == phrase.replace(" ", "")
    assert len([p for p in skater if p >= 77]) == 2  # a multi-piece word: every piece
    assert not set(dog) & set(hot_dog)  # "dog" claims the second dog, not the one inside "hot dog"
    cond = comps.encode_text(ids)
    with torch.no_grad():
        t5_states = comps.text_encoder_3(ids["input_ids_3"])[0]
    assert torch.equal(cond["encoder_hidden_states"][0, 77:], t5_states[0])


def test_flux_phrase_positions_are_t5_positions(models):
    comps = components(models, "flux")
    caption = CAPTIONS[1]
    ids = comps.tokenize([caption])["input_ids_2"][0]
    cat, glass = comps.phrase_positions(caption, ["cat", "wine glass"])
    assert comps.tokenizer_2.decode(ids[cat]) == "cat"
    assert comps.tokenizer_2.decode(ids[glass]).replace(" ", "") == "wineglass"  # "-" is skipped, as for CLIP


def test_packing_is_fluxs_own():
    latents = torch.randn(2, 4, 6, 8)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), latents)
    assert torch.equal(unpack_latents(packed, 6, 8), FluxPipeline._unpack_latents(packed, 6 * 8, 8 * 8, 8))
    assert torch.equal(image_ids(3, 4), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_generate_batch_is_the_pipelines_own_call(models, name):
    """Per-image seeds: generate_batch's images are the pipeline's own call with the same generators (FLUX: the
    initial noise packed as its pipeline packs it; no unconditional pass)."""
    comps = components(models, name)
    pipe = comps.pipeline(comps.noise_scheduler)
    pipe.set_progress_bar_config(disable=True)
    guidance = comps.family.default_guidance
    images, nsfw = generate_batch(pipe, CAPTIONS[:1], [3], steps=2, guidance=guidance, height=32, width=32)
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8 and nsfw is None
    with torch.no_grad():
        out = pipe(CAPTIONS[:1], num_inference_steps=2, guidance_scale=guidance, height=32, width=32, output_type="pt",
                   generator=[torch.Generator().manual_seed(3)]).images
    expected = out.float().mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_folder_without_its_text_encoders_is_refused(models, name, tmp_path):
    broken = tmp_path / name
    shutil.copytree(models[name], broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelFolderError, match="no text_encoder_2/"):
        load_components(broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(ModelFolderError, match=r"missing unet/ or transformer/\."):
        load_components(broken)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_swaps_the_families_do_not_take_are_refused(models, name):
    with pytest.raises(UserError, match="--text-encoder"):
        load_components(models[name], text_encoder=models[name])


def test_example_conditioning_runs_the_transformers(models):
    for name in ("sd3", "flux"):
        comps = components(models, name)
        family, config = comps.family, dict(comps.unet.config)
        cond = family.example_conditioning(config, 2, 8, 12, torch.Generator().manual_seed(0))
        latents = torch.randn(2, family.latent_channels(config), 8, 8)
        with torch.no_grad():
            out = comps.objective.predict(comps.unet, latents, torch.tensor([100.0, 500.0]), cond)
        assert out.shape == latents.shape, name
        assert sum(family.attention_groups(config, (8, 8)).values()) == len(family.attention_groups(config, (8, 8)))


def test_guidance_is_fed_only_to_a_transformer_that_embeds_it():
    """FLUX.1-dev embeds the guidance scale (training feeds --guidance-scale), schnell does not; SD3 never."""
    flux, sd3 = family_named("flux"), family_named("sd3")
    assert flux.configure_objective({"guidance_embeds": True}, {"guidance_scale": 4.0}).guidance == 4.0
    assert flux.configure_objective({"guidance_embeds": True}, {}).guidance == 3.5
    assert flux.configure_objective({"guidance_embeds": False}, {"guidance_scale": 4.0}).guidance is None
    objective = sd3.configure_objective({}, {"weighting_scheme": "mode", "attention_norm": "joint", "guidance_scale": 2})
    assert (objective.weighting_scheme, objective.attention_norm, objective.guidance, objective.packed) == \
        ("mode", "joint", None, False)
