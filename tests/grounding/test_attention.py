"""Cross-attention capture: same output as the plain UNet, processors restored, gradients with checkpointing."""

from __future__ import annotations

import pytest
import torch

from tcompose.grounding.attention import average_maps, capture_cross_attention, cross_attention_modules
from tcompose.grounding.losses import grounding_losses, pad_words
from tcompose.testing.tiny_sd import build_tiny_unet


@pytest.fixture(scope="module")
def unet():
    return build_tiny_unet(seed=0).eval()


def inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 32, 32, generator=g)
    emb = torch.randn(batch, 77, 32, generator=g)
    t = torch.tensor([10, 700][:batch])
    return x, t, emb


def test_capture_output_equals_plain_and_processors_come_back(unet):
    x, t, emb = inputs()
    before = dict(unet.attn_processors)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=emb).sample
        with capture_cross_attention(unet, ("mid", "up")) as store:
            captured = unet(x, t, encoder_hidden_states=emb).sample
    assert (captured - plain).abs().max().item() <= 1e-5
    assert set(store.maps) == {"mid_16", "up_16", "up_32"}
    assert len(store.maps["up_32"]) == 2 and store.maps["up_32"][0].shape == (2, 8, 1024, 77)
    for maps in store.maps.values():
        for m in maps:
            assert m.dtype == torch.float32
            torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]))  # softmax over tokens
    after = unet.attn_processors
    assert all(after[k] is v for k, v in before.items())


def test_only_selected_layers_are_replaced(unet):
    x, t, emb = inputs()
    seen = {}
    with capture_cross_attention(unet, ("up_16",)) as store:
        for name, block, module in cross_attention_modules(unet):
            seen[name] = type(module.get_processor()).__name__
        self_attn = [type(p).__name__ for n, p in unet.attn_processors.items() if ".attn1." in n]
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=emb)
    assert set(store.maps) == {"up_16"}
    assert all(name == "AttnProcessor2_0" for name in self_attn)
    assert all(v == "AttnProcessor2_0" for n, v in seen.items() if n.startswith(("down", "mid")))


def test_unknown_layer_names_are_refused(unet):
    with pytest.raises(ValueError, match="unknown layer"):
        with capture_cross_attention(unet, ("left",)):
            pass


def test_maps_are_fp32_under_bf16_autocast(unet):
    x, t, emb = inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with capture_cross_attention(unet, ("up",)) as store:
            unet(x, t, encoder_hidden_states=emb)
    assert all(m.dtype == torch.float32 for maps in store.maps.values() for m in maps)
    am = average_maps(store)
    assert am["up_16"].shape == (2, 16, 16, 77)


def _grads(unet, checkpointing: bool):
    unet = build_tiny_unet(seed=0)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    x, t, emb = inputs()
    index, valid = pad_words([[[1], [2, 3]], [[4]]])
    g = torch.Generator().manual_seed(1)
    with capture_cross_attention(unet, ("mid", "up")) as store:
        unet(x, t, encoder_hidden_states=emb)
        loss = 0.0
        for maps in store.maps.values():
            masks = (torch.rand(2, 2, maps[0].shape[2], generator=g) > 0.5).float()
            tok, pix = grounding_losses(maps, masks, index, valid)
            loss = loss + tok.sum() + pix.sum()
        loss.backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}, {k: len(v) for k, v in store.maps.items()}


def test_gradients_reach_maps_with_gradient_checkpointing(unet):
    plain, n_plain = _grads(unet, checkpointing=False)
    ckpt, n_ckpt = _grads(unet, checkpointing=True)
    assert n_plain == n_ckpt  # recomputation in backward added no maps
    key = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert plain[key].abs().sum() > 0
    assert set(plain) == set(ckpt)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-6)
