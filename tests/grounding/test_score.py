"""The grounding score and the word maps that show it: recomputed in float64 from the raw captured maps."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tcompose.data.synthetic import make_scenes
from tcompose.grounding.attention import attention_groups, capture_cross_attention
from tcompose.grounding.score import grounding_score, word_attention
from tcompose.masks.config import MasksConfig
from tcompose.masks.stage import run as make_masks
from tcompose.models.families import load_components
from tcompose.testing.tiny_sd import write_tiny_pipeline
from tcompose.train.examples import TrainingExamples, collate, prepare_rows

RES = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    scenes = make_scenes(root / "scenes", n_images=6, size=64, seed=1)
    make_masks(MasksConfig(coco_dir=scenes, output=root / "masks", split="train2017", captions="all"), progress=False)
    captions = json.loads((scenes / "annotations" / "captions_train2017.json").read_text())["annotations"]
    caps = [a["caption"] for a in captions]
    c = load_components(str(write_tiny_pipeline(root / "base", corpus=caps, seed=0)))
    prep = prepare_rows(root / "masks", c)
    latent = RES // (2 ** (len(c.vae.config.block_out_channels) - 1))
    examples = TrainingExamples(prep, RES, (c.unet.config.in_channels, latent, latent), 1000, seed=0)
    batch = collate([examples[(r, 0)] for r in range(3)])
    layers = tuple(attention_groups(c.unet.config, (latent, latent)))
    return c, batch, layers


def _reference_shares(c, batch, layers, timesteps, seed):
    """Float64, loop by loop: per word, the share sum(A * M) / sum(A) of each layer, head and token, averaged
    (M: the mask resized bilinearly to the layer's side, then anything above 0 counts, as the reference did)."""
    g = torch.Generator().manual_seed(seed)
    latents = c.vae.encode(batch["pixel_values"]).latent_dist.mean * c.vae.config.scaling_factor
    hidden = c.text_encoder(batch["input_ids"])[0]
    index, valid = batch["word_index"], batch["word_valid"]
    b, w, _ = index.shape
    sums, counts = torch.zeros(b, w, dtype=torch.float64), torch.zeros(b, w, dtype=torch.float64)
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=g)
        ts = torch.full((b,), t, dtype=torch.long)
        with capture_cross_attention(c.unet, layers) as store, torch.no_grad():
            c.unet(c.noise_scheduler.add_noise(latents, noise, ts), ts, encoder_hidden_states=hidden)
        for maps in store.maps.values():
            for a in maps:  # [B, heads, HW, T]
                side = int(a.shape[2] ** 0.5)
                m = F.interpolate(batch["masks"], size=(side, side), mode="bilinear", align_corners=False) > 0
                for i in range(b):
                    for j in range(w):
                        if not valid[i, j].any():
                            continue
                        ratios = []
                        for k in index[i, j][valid[i, j]].tolist():
                            att = a[i, :, :, k].double()  # [heads, HW]
                            mask = m[i, j].flatten().double()
                            ratios.append((att * mask).sum(-1) / att.sum(-1))  # [heads]
                        sums[i, j] += torch.stack(ratios).mean()
                        counts[i, j] += 1
    return sums / counts.clamp_min(1), valid.any(-1)


def test_score_and_word_shares_match_a_float64_recomputation(setup):
    c, batch, layers = setup
    timesteps = (200, 700)
    want, valid = _reference_shares(c, batch, layers, timesteps, seed=3)
    got = word_attention(c, batch, layers, timesteps, seed=3)
    assert torch.equal(got["valid"], valid) and valid.sum() >= 4
    torch.testing.assert_close(got["share"][valid].double(), want[valid], rtol=0, atol=2e-5)
    score = grounding_score(c, [batch], layers, timesteps, seed=3)
    assert score["words"] == int(valid.sum())
    assert score["score"] == pytest.approx(float(want[valid].mean()), abs=2e-5)


def test_word_maps_are_the_sums_of_their_tokens_attention(setup):
    c, batch, layers = setup
    got = word_attention(c, batch, layers, (500,), seed=0)
    maps, valid = got["maps"], got["valid"]
    b, w = valid.shape
    assert maps.shape[:2] == (b, w) and maps.shape[-1] == maps.shape[-2] == max(
        int(g.split("_")[1]) for g in layers)
    assert (maps >= 0).all() and (maps <= 1 + 1e-5).all()  # a share of each pixel's attention
    assert (maps[~valid] == 0).all()
    # one word alone: its tokens' head- and layer-averaged attention, summed; two-token words weigh both
    g = torch.Generator().manual_seed(0)
    latents = c.vae.encode(batch["pixel_values"]).latent_dist.mean * c.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    ts = torch.full((b,), 500, dtype=torch.long)
    with capture_cross_attention(c.unet, layers) as store, torch.no_grad():
        c.unet(c.noise_scheduler.add_noise(latents, noise, ts), ts,
               encoder_hidden_states=c.text_encoder(batch["input_ids"])[0])
    side = maps.shape[-1]
    total, n = 0, 0
    for a_list in store.maps.values():
        for a in a_list:
            s = int(a.shape[2] ** 0.5)
            up = a.double().mean(1).permute(0, 2, 1).reshape(b, -1, s, s)
            total = total + F.interpolate(up, size=(side, side), mode="bilinear", align_corners=False)
            n += 1
    tokens = total / n  # [B, T, S, S]
    i, j = 0, 0
    pos = batch["word_index"][i, j][batch["word_valid"][i, j]].tolist()
    torch.testing.assert_close(maps[i, j].double(), tokens[i, pos].sum(0), rtol=0, atol=1e-5)
