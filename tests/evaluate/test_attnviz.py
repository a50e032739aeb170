"""`tcompose attnviz`: model spec parsing, heat-map maths against a float64 reference, the figure and raw maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tcompose.cli import main
from tcompose.evaluate.attnviz import AttnvizConfig, draw_figure, figure_size, load_maps, maps_path, run
from tcompose.evaluate.generate import GenerateConfig
from tcompose.evaluate.generate import run as generate
from tcompose.evaluate.settings import GenerationSettings
from tcompose.grounding.attention_maps import MapAccumulator, combine_groups, group_hw, normalize, parse_steps, word_maps
from tcompose.models.spec import ModelSpec, parse_model_spec, parse_model_specs
from tcompose.testing.tiny_sd import write_tiny_pipeline

PROMPT = "A cat and a wine glass"
SIZE = 32


# ---------------------------------------------------------------------------------------------------------
# --model NAME=ID_OR_PATH parsing


def test_parse_model_spec():
    assert parse_model_spec("SD=CompVis/stable-diffusion-v1-4") == ModelSpec("SD", "CompVis/stable-diffusion-v1-4")
    assert parse_model_spec(" tc = runs/tc ") == ModelSpec("tc", "runs/tc")
    assert parse_model_spec("mine=CompVis/sd,unet=runs/tc/unet,text-encoder=runs/clip,revision=fp16") == ModelSpec(
        "mine", "CompVis/sd", unet="runs/tc/unet", text_encoder="runs/clip", revision="fp16")
    assert parse_model_spec("CompVis/stable-diffusion-v1-4") == ModelSpec("stable-diffusion-v1-4",
                                                                          "CompVis/stable-diffusion-v1-4")
    assert parse_model_spec("/data/runs/a=b/") == ModelSpec("a_b", "/data/runs/a=b/")  # "/data/runs/a" is no name
    assert parse_model_spec("x=m,unet=u,").unet == "u"
    for bad, message in [("SD=", "no model"), ("SD=m,vae=v", "unknown option"), ("SD=m,unet", "unknown option"),
                         ("SD=m,unet=", "no value"), ("SD=m,unet=a,unet=b", "twice")]:
        with pytest.raises(ValueError, match=message):
            parse_model_spec(bad)
    with pytest.raises(ValueError, match="named 'a'"):
        parse_model_specs(["a=x", "a=y"])


# ---------------------------------------------------------------------------------------------------------
# Aggregation maths


def _softmax_maps(gen, b, heads, hw, t):
    return torch.softmax(torch.randn(b, heads, hw, t, generator=gen) * 3, dim=-1)


def _bilinear_up_f64(m: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of [..., h, w] (align_corners=False, edge clamped), written out in float64."""
    h, w = m.shape[-2:]

    def taps(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, None)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, fy = taps(h, size)
    x0, x1, fx = taps(w, size)
    rows = m[..., y0, :] * (1 - fy)[:, None] + m[..., y1, :] * fy[:, None]
    return rows[..., x0] * (1 - fx) + rows[..., x1] * fx


def test_accumulator_matches_float64_reference():
    gen = torch.Generator().manual_seed(0)
    heads, t, steps = 3, 7, 3
    layers = {"up_4": 2, "mid_2": 1}
    recorded = [{g: [_softmax_maps(gen, 4, heads, int(g[-1]) ** 2, t) for _ in range(n)] for g, n in layers.items()}
                for _ in range(steps)]
    acc = MapAccumulator(guidance=True)
    for maps in recorded:
        acc.add(maps)
    got = acc.token_maps()  # [2, T, 4, 4]
    # reference: float64, cond half (batch items 2, 3), mean over steps x layers x heads, upsample, layer-weighted
    ref = np.zeros((2, t, 4, 4))
    for g, n in layers.items():
        side = int(g[-1])
        stack = np.stack([np.stack([m.double().numpy() for m in step[g]]) for step in recorded])  # S,L,B,H,HW,T
        mean = stack[:, :, 2:].mean(axis=(0, 1, 3))  # [2, HW, T]
        mean = mean.transpose(0, 2, 1).reshape(2, t, side, side)
        ref += n * (_bilinear_up_f64(mean, 4) if side != 4 else mean)
    ref /= sum(layers.values())
    np.testing.assert_allclose(got.double().numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(got.sum(dim=1).numpy(), 1.0, atol=1e-5)  # a distribution over tokens per pixel
    assert acc.steps == steps and acc.counts == {"up_4": 6, "mid_2": 3}
    no_cfg = MapAccumulator(guidance=False)
    no_cfg.add(recorded[0])
    assert no_cfg.token_maps().shape == (4, t, 4, 4)


def test_small_pieces():
    assert group_hw("up_16", 256) == (16, 16) and group_hw("down_8x12", 96) == (8, 12)
    with pytest.raises(ValueError, match="not 16x16"):
        group_hw("up_16", 100)
    tokens = torch.rand(5, 3, 3)
    w = word_maps(tokens, {"a": [1], "ab": [2, 3]})
    assert torch.equal(w["a"], tokens[1]) and torch.allclose(w["ab"], tokens[2] + tokens[3])
    with pytest.raises(ValueError, match="outside"):
        word_maps(tokens, {"x": [5]})
    n = normalize(torch.tensor([[2.0, 4.0], [3.0, 6.0]]))
    assert n.min() == 0 and n.max() == 1 and n[0, 1] == 0.5
    assert torch.equal(normalize(torch.ones(2, 2)), torch.zeros(2, 2))
    assert parse_steps(None, 4) == parse_steps("all", 4) == [0, 1, 2, 3]
    assert parse_steps("0-1, 3", 5) == [0, 1, 3] and parse_steps("3-", 5) == [3, 4] and parse_steps("2,9", 4) == [2]
    for bad in ("a", "3-1", "9"):
        with pytest.raises(ValueError):
            parse_steps(bad, 4)
    two = combine_groups({"a": torch.ones(1, 2, 4, 4), "b": torch.zeros(1, 2, 2, 2)}, {"a": 3, "b": 1})
    assert two.shape == (1, 2, 4, 4) and torch.allclose(two, torch.full_like(two, 0.75))


# ---------------------------------------------------------------------------------------------------------
# The stage


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("attnviz-models")
    base = write_tiny_pipeline(root / "base", corpus=[PROMPT], seed=0)
    return {"base": base, "other": write_tiny_pipeline(root / "other", tokenizer_source=base, seed=3)}


def test_attnviz_figure_and_maps(models, tmp_path):
    fig = tmp_path / "fig.png"
    cfg = AttnvizConfig(prompt=PROMPT, models=[f"SD={models['base']}", f"TC={models['base']},unet={models['other']}"],
                        output=fig, words=["cat", "wine glass"], panel=64,
                        settings=GenerationSettings(steps=3, height=SIZE, width=SIZE, device="cpu"))
    out = run(cfg, progress=False)
    # the figure: one row per model, the image + one panel per word, titled; its pixel size is fixed
    assert out["panels"] == [(r, c, t) for r in (0, 1) for c, t in enumerate(["image", "cat", "wine glass"])]
    with Image.open(fig) as im:
        im.load()
        assert im.format == "PNG" and im.size == figure_size(2, 2, 64) == (32 + 3 * 64 + 100, 2 * (24 + 64))
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10
    # the raw maps: per-token distributions that sum to 1 at each pixel; a word = the sum of its tokens
    res = load_maps(maps_path(fig))
    assert res.prompt == PROMPT and res.words == ["cat", "wine glass"] and [r.name for r in res.rows] == ["SD", "TC"]
    assert res.meta["layers"] == ["mid", "up"] and res.meta["seed"] == 0 and res.meta["steps"] == 3
    for row in res.rows:
        assert row.tokens.shape == (77, SIZE // 2, SIZE // 2) and row.tokens.dtype == torch.float32
        assert row.tokens.min() >= 0
        torch.testing.assert_close(row.tokens.sum(dim=0), torch.ones(SIZE // 2, SIZE // 2), atol=1e-5, rtol=0)
        assert row.positions == {"cat": [2], "wine glass": [5, 6]}
        torch.testing.assert_close(row.words["wine glass"], row.tokens[5] + row.tokens[6])
        assert row.image.shape == (SIZE, SIZE, 3) and row.image.dtype == np.uint8
    assert not torch.allclose(res.rows[0].tokens, res.rows[1].tokens)  # the swapped UNet attends elsewhere
    # the image is the one `generate` makes for prompt 0, image 0 with the same seed (capture changes nothing)
    generate(GenerateConfig(model=str(models["base"]), output=tmp_path / "gen", prompts=[PROMPT],
                            settings=GenerationSettings(steps=3, height=SIZE, width=SIZE, device="cpu")),
             progress=False)
    gen = np.asarray(Image.open(tmp_path / "gen" / "images" / "00000_00.png"), dtype=np.int16)
    assert np.abs(gen - res.rows[0].image.astype(np.int16)).max() <= 1
    # drawing again from the saved maps gives the same figure
    draw_figure(res, tmp_path / "again.png", panel=64)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again.png").convert("RGB")), pixels)


def test_attnviz_timesteps_and_layers_change_the_maps(models, tmp_path):
    common = dict(prompt=PROMPT, models=[f"SD={models['base']}"], words=["cat"], panel=32,
                  settings=GenerationSettings(steps=3, height=SIZE, width=SIZE, device="cpu"))
    run(AttnvizConfig(output=tmp_path / "all.png", **common), progress=False)
    run(AttnvizConfig(output=tmp_path / "first.png", timesteps="0", layers=("up_16",), **common), progress=False)
    a, b = load_maps(tmp_path / "all.safetensors"), load_maps(tmp_path / "first.safetensors")
    assert b.meta["timesteps"] == "0" and b.meta["layers"] == ["up_16"]
    torch.testing.assert_close(b.rows[0].tokens.sum(dim=0), torch.ones(16, 16), atol=1e-5, rtol=0)
    assert not torch.allclose(a.rows[0].words["cat"], b.rows[0].words["cat"])
    # the same image: capturing other layers only changes float rounding (explicit fp32 softmax instead of SDPA)
    assert np.abs(a.rows[0].image.astype(int) - b.rows[0].image.astype(int)).max() <= 1


def test_cli_attnviz(models, tmp_path, capsys):
    fig = tmp_path / "cli.png"
    base = ["attnviz", "--prompt", PROMPT, "--model", f"SD={models['base']}", "--steps", "2", "--height", str(SIZE),
            "--width", str(SIZE), "--panel", "48"]
    assert main([*base, "--words", "cat,wine glass", "--output", str(fig)]) == 0
    assert Image.open(fig).size == figure_size(1, 2, 48)
    assert main(["attnviz", "--from-maps", str(maps_path(fig)), "--output", str(tmp_path / "re.png"),
                 "--panel", "48"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "re.png")), np.asarray(Image.open(fig)))
    for args, message in [(["--words", "dog"], "'dog' does not occur"), (["--layers", "side"], "unknown layer"),
                          (["--timesteps", "5-1"], "empty range")]:
        capsys.readouterr()
        code = main([*base, *args, "--output", str(tmp_path / "bad.png")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad.png").exists()


def test_default_words_are_the_prompts_noun_phrases():
    from tcompose.evaluate.attnviz import default_words

    assert default_words(PROMPT) == ["cat", "wine glass"]
    with pytest.raises(ValueError, match="no noun phrases"):
        default_words("running quickly")


def test_every_input_and_output_is_checked_before_generating(models, tmp_path, capsys):
    base = ["attnviz", "--prompt", PROMPT, "--model", f"SD={models['base']}", "--steps", "2", "--height", str(SIZE),
            "--width", str(SIZE), "--panel", "32"]
    # a group the UNet does not have at this size: the error lists the ones it has, and nothing is drawn
    assert main([*base, "--layers", "up_4", "--output", str(tmp_path / "bad" / "fig.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--layers up_4" in err and "its groups are down_16" in err, err
    assert not (tmp_path / "bad").exists()
    # the maps file is read as such or refused in one line
    (tmp_path / "notmaps.safetensors").write_bytes(b"\x00" * 64)
    assert main(["attnviz", "--from-maps", str(tmp_path / "notmaps.safetensors"), "--output", str(tmp_path / "x.png")]) == 2
    assert "not a safetensors file" in capsys.readouterr().err
    # an output folder that does not exist yet is made, and the maps beside it get the umask's mode
    import os

    fig = tmp_path / "new" / "deeper" / "fig.png"
    old = os.umask(0o022)
    try:
        assert main([*base, "--words", "cat", "--output", str(fig)]) == 0
    finally:
        os.umask(old)
    assert fig.is_file() and maps_path(fig).stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("extra,named", [(["--words", "cat"], "--words"), (["--timesteps", "0-3"], "--timesteps"),
                                         (["--layers", "up"], "--layers"), (["--model", "A=x"], "--model"),
                                         (["--prompt", "a cat", "--steps", "3"], "--prompt, --steps")])
def test_from_maps_refuses_options_it_cannot_honour(tmp_path, capsys, extra, named):
    from tcompose.cli import main

    args = ["attnviz", "--from-maps", str(tmp_path / "maps.safetensors"), "--output", str(tmp_path / "x.png")]
    assert main([*args, *extra, "--panel", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"does not take {named};" in err and "without --from-maps" in err
    assert not (tmp_path / "x.png").exists()
