"""tcompose.models: tokenizers on disk, tiny pipelines, loading, text-encoder swaps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tcompose.data import clip_bpe
from tcompose.data.clip_bpe import find_clip_bpe, write_clip_tokenizer
from tcompose.models.loading import ModelFolderError
from tcompose.models.components import TextEncoderMismatchError, check_text_encoder, load_text_encoder
from tcompose.models.families import load_components
from tcompose.testing.tiny_sd import (
    build_tiny_text_encoder,
    build_tiny_unet,
    count_parameters,
    tiny_unet_config,
    write_tiny_pipeline,
)


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory) -> Path:
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd", seed=0)


@pytest.fixture(scope="module")
def comps(tiny_pipe):
    return load_components(tiny_pipe)


# ------------------------------------------------------------------------------------------------ tokenizers


def test_real_clip_vocabulary(clip_bpe, tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok", bpe_path=clip_bpe))
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    pieces = tok.convert_ids_to_tokens(tok("skateboarder", add_special_tokens=False).input_ids)
    assert pieces == ["skate", "boarder</w>"]
    assert tok.model_max_length == 77 and tok.pad_token_id == 49407
    vocab = json.loads((tmp_path / "tok" / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|startoftext|>"] == 49406


def test_small_tokenizer_loads_and_round_trips(tmp_path):
    from transformers import CLIPTokenizer

    corpus = ["A purple hexagon beside a turquoise pyramid.", "Two purple hexagons on the grass"]
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok", corpus=corpus))
    n = len(tok)
    assert 600 < n <= 4096
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (n - 2, n - 1, n - 1)
    vocab = json.loads((tmp_path / "tok" / "vocab.json").read_text(encoding="utf-8"))
    symbols = list(clip_bpe.bytes_to_unicode().values())
    assert list(vocab)[:512] == symbols + [s + "</w>" for s in symbols]  # CLIP's order
    # common words and corpus words are whole tokens; unknown words fall back to byte pieces
    for word in ["giraffe", "skateboarder", "hexagon", "turquoise"]:
        assert tok.convert_ids_to_tokens(tok(word, add_special_tokens=False).input_ids) == [word + "</w>"]
    for text in ["A Red cube, next to a blue sphere!", "xylophonist's café 🙂 42"]:
        ids = tok(text).input_ids
        assert ids[0] == n - 2 and ids[-1] == n - 1 and tok.unk_token_id not in ids[1:-1]
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ", "") == text.lower().replace(" ", "")
    # deterministic: the same input writes the same vocabulary
    write_clip_tokenizer(tmp_path / "again", corpus=corpus)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "tok" / name).read_bytes()


def test_find_clip_bpe(tmp_path, monkeypatch):
    fake = tmp_path / "data" / "clip-bpe" / clip_bpe.CLIP_BPE_FILENAME
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"")
    monkeypatch.setenv("TCOMPOSE_TEST_DATA", str(tmp_path / "data"))
    assert find_clip_bpe() == fake
    monkeypatch.setenv("TCOMPOSE_TEST_DATA", str(tmp_path / "nothing"))
    monkeypatch.setattr(clip_bpe, "_REPO_SHARED_DATA", tmp_path / "nothing-either")
    assert find_clip_bpe() is None


# ------------------------------------------------------------------------------------------------ tiny models


def test_tiny_unet_size_and_medium_config():
    assert 0.9e6 < count_parameters(build_tiny_unet(0)) < 1.3e6
    medium = tiny_unet_config("medium")
    assert medium["block_out_channels"] == (64, 128, 256)
    assert 10e6 < count_parameters(build_tiny_unet(0, size="medium")) < 20e6
    a, b = build_tiny_unet(3), build_tiny_unet(3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="huge"):
        tiny_unet_config("huge")


def test_load_components_of_tiny_pipeline(tiny_pipe, comps):
    from diffusers import DDPMScheduler

    assert sorted(p.name for p in tiny_pipe.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae",
    ]
    assert not list(tiny_pipe.parent.glob(".*tmp*"))  # the temporary folder was renamed away
    assert isinstance(comps.noise_scheduler, DDPMScheduler)
    cfg = comps.noise_scheduler.config
    assert (cfg.beta_schedule, cfg.num_train_timesteps, cfg.clip_sample) == ("scaled_linear", 1000, False)
    assert cfg.beta_start == pytest.approx(0.00085) and cfg.beta_end == pytest.approx(0.012)
    assert comps.tokenizer.model_max_length == 77
    assert comps.text_encoder.config.vocab_size == len(comps.tokenizer)
    assert comps.text_encoder.config.eos_token_id == comps.tokenizer.eos_token_id
    ids = comps.tokenizer(["a red cube"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = comps.text_encoder(ids)[0]
        latents = comps.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        out = comps.unet(latents, torch.tensor([10]), encoder_hidden_states=emb).sample
    assert emb.shape == (1, 77, 32) and latents.shape == (1, 4, 32, 32) and out.shape == (1, 4, 32, 32)


def test_cross_attention_map_sizes(comps):
    seen: list[tuple[str, int]] = []

    def record(name):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.append((name, hidden.shape[1]))  # [B, HW, C]: one attention map per HW query

        return hook

    hooks = [
        module.register_forward_hook(record(name), with_kwargs=True)
        for name, module in comps.unet.named_modules()
        if name.endswith("attn2")
    ]
    try:
        with torch.no_grad():
            comps.unet(torch.zeros(1, 4, 32, 32), torch.tensor([1]), encoder_hidden_states=torch.zeros(1, 77, 32))
    finally:
        for h in hooks:
            h.remove()
    sizes = [(name.split(".")[0], hw) for name, hw in seen]
    assert sizes == [("down_blocks", 1024), ("down_blocks", 256), ("mid_block", 256),
                     ("up_blocks", 256), ("up_blocks", 256), ("up_blocks", 1024), ("up_blocks", 1024)]


def test_stable_diffusion_pipeline_runs(tiny_pipe):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red cube", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(out.images)).all()


def test_tiny_pipeline_with_real_vocabulary(clip_bpe, tmp_path):
    comps = load_components(write_tiny_pipeline(tmp_path / "sd", tokenizer_source=clip_bpe))
    assert len(comps.tokenizer) == comps.text_encoder.config.vocab_size == 49408
    assert comps.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_write_tiny_pipeline_refuses_a_nonempty_folder(tmp_path):
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_tiny_pipeline(tmp_path / "sd")
    assert (tmp_path / "sd" / "keep.txt").exists()


def test_load_components_dtype(tiny_pipe):
    comps = load_components(tiny_pipe, dtype=torch.bfloat16)
    assert comps.unet.dtype == comps.vae.dtype == comps.text_encoder.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------- text-encoder swaps


def _text_weights(model) -> torch.Tensor:
    return model.get_input_embeddings().weight


def test_text_encoder_swap_plain_folder(tiny_pipe, comps, tmp_path):
    te = build_tiny_text_encoder(len(comps.tokenizer), seed=7)
    te.save_pretrained(tmp_path / "te")
    swapped = load_components(tiny_pipe, text_encoder=tmp_path / "te")
    assert torch.equal(_text_weights(swapped.text_encoder), _text_weights(te))
    assert not torch.equal(_text_weights(swapped.text_encoder), _text_weights(comps.text_encoder))
    assert len(swapped.tokenizer) == len(comps.tokenizer)  # no tokenizer beside it: the base model's


def test_text_encoder_swap_pipeline_style_folder(tiny_pipe, tmp_path):
    from transformers import CLIPTokenizer

    folder = write_clip_tokenizer(tmp_path / "clip" / "tokenizer", corpus=["zz qq"] * 3, vocab_size=700)
    tok = CLIPTokenizer.from_pretrained(folder)
    te = build_tiny_text_encoder(len(tok), seed=8)
    te.save_pretrained(tmp_path / "clip" / "text_encoder")
    swapped = load_components(tiny_pipe, text_encoder=str(tmp_path / "clip"))
    assert torch.equal(_text_weights(swapped.text_encoder), _text_weights(te))
    assert len(swapped.tokenizer) == len(tok)  # its own tokenizer wins


def test_text_encoder_swap_full_clip_model(tiny_pipe, comps, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    text_cfg = build_tiny_text_encoder(len(comps.tokenizer)).config.to_dict()
    vision_cfg = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      image_size=32, patch_size=8)
    torch.manual_seed(9)
    clip = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=32))
    clip.save_pretrained(tmp_path / "clip")
    assert json.loads((tmp_path / "clip" / "config.json").read_text())["model_type"] == "clip"
    text, tokenizer = load_text_encoder(tmp_path / "clip", base_tokenizer=comps.tokenizer)
    assert type(text).__name__ == "CLIPTextModel"
    for name, value in clip.text_model.state_dict().items():
        assert torch.equal(text.state_dict()[name], value), name
    assert tokenizer is comps.tokenizer
    swapped = load_components(tiny_pipe, text_encoder=tmp_path / "clip")
    assert torch.equal(_text_weights(swapped.text_encoder), _text_weights(clip.text_model))


def test_text_encoder_width_mismatch_is_a_clear_error(tiny_pipe, comps, tmp_path):
    build_tiny_text_encoder(len(comps.tokenizer), hidden_size=48).save_pretrained(tmp_path / "wide")
    with pytest.raises(TextEncoderMismatchError, match=r"hidden size 48 != UNet cross_attention_dim 32"):
        load_components(tiny_pipe, text_encoder=tmp_path / "wide")
    short = build_tiny_text_encoder(len(comps.tokenizer), max_position_embeddings=16)
    with pytest.raises(TextEncoderMismatchError, match=r"max_position_embeddings 16 < prompt length 77"):
        check_text_encoder(short, comps.unet, comps.tokenizer)
    check_text_encoder(comps.text_encoder, comps.unet, comps.tokenizer)  # the matching pair passes


def test_not_a_text_encoder_folder(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelFolderError, match="'bert' is not a CLIP text model"):
        load_text_encoder(tmp_path / "bert")


# -------------------------------------------------------------------------------------------- loading errors


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFolderError, match="model folder not found") as err:
        load_components(tmp_path / "no-such-model")
    assert str(tmp_path / "no-such-model") in str(err.value)
    with pytest.raises(ModelFolderError, match="not found"):
        load_components("./no/such/model")


def test_incomplete_local_folder_names_the_missing_subfolders(tiny_pipe, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipe, broken)
    shutil.rmtree(broken / "vae")
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(ModelFolderError, match=r"missing vae/, scheduler/") as err:
        load_components(broken)
    assert isinstance(err.value, ValueError) and str(broken) in str(err.value)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument:UserWarning")
def test_uncached_hub_id_offline_reraises_with_a_hint():
    with pytest.raises(OSError) as err:
        load_components("tcompose-tests/no-such-model", local_files_only=True)
    notes = " ".join(getattr(err.value, "__notes__", []))
    assert "HF_HUB_OFFLINE" in notes and "tcompose download" in notes
