"""Grounding losses: the reference's values, a float64 transcription of its loops, and the cases it broke on."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tcompose.grounding.losses import (
    _bce,
    attention_in_mask,
    grounding_losses,
    pad_words,
    pixel_loss,
    reduce_over_words,
    resize_mask,
    token_loss,
)


def reference_losses(maps, masks, words):
    """The original's loops (get_grounding_loss_by_layer), transcribed in float64. maps: list of [heads, HW, T]."""
    maps = [m.double() for m in maps]
    masks = masks.double()
    token = 0.0
    for m in maps:
        for w, toks in enumerate(words):
            obj = 0.0
            for t in toks:
                a = m[:, :, t]
                act = (a * masks[w]).sum(-1) / a.sum(-1)
                obj += (1.0 - act.mean()) ** 2
            token += obj / len(toks)
    token = token / len(words)
    avg = torch.stack([m.mean(0) for m in maps]).sum(0) / len(maps)
    pixel = 0.0
    for w, toks in enumerate(words):
        p = torch.stack([avg[:, t] for t in toks]).sum(0)
        pixel += F.binary_cross_entropy(p, masks[w])
    return token, pixel / len(words)


def random_case(seed, n_maps=3, heads=4, side=8, t=77, n_words=3):
    g = torch.Generator().manual_seed(seed)
    attn = torch.randn(n_maps, heads, side * side, t, generator=g).mul(3).softmax(-1)
    masks = (torch.rand(n_words, side * side, generator=g) > 0.6).float()
    words = [[1 + 3 * i + j for j in range(1 + i % 3)] for i in range(n_words)]
    return attn, masks, words


def test_reference_values(test_data):
    d = json.loads((test_data / "reference" / "tokencompose_losses_res8.json").read_text())
    attn = torch.tensor(d["attn_logits"], dtype=torch.float32).reshape(1, 8, 64, 77).softmax(-1)
    words = d["inputs"]["words"]
    m0 = torch.zeros(8, 8)
    m0[2:4, 1:4] = 1
    masks = torch.stack([m0, torch.tensor(d["mask_word1"]).reshape(8, 8), torch.zeros(8, 8), torch.ones(8, 8)]).reshape(4, 64)
    exp = d["expected_float32"]
    assert token_loss(attn, masks, words).item() == pytest.approx(exp["token_loss"], rel=1e-5)
    assert pixel_loss(attn, masks, words).item() == pytest.approx(exp["pixel_loss"], rel=1e-5)
    for i, w in enumerate(words):
        per = d["expected_per_word_float64"][f"word{i}"]
        assert token_loss(attn, masks[i : i + 1], [w]).item() == pytest.approx(per["token_loss"], rel=1e-5, abs=1e-7)
        assert pixel_loss(attn, masks[i : i + 1], [w]).item() == pytest.approx(per["pixel_loss"], rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_float64_transcription(seed):
    attn, masks, words = random_case(seed)
    ref_tok, ref_pix = reference_losses(list(attn), masks, words)
    assert token_loss(attn, masks, words).item() == pytest.approx(ref_tok.item(), rel=1e-5)
    assert pixel_loss(attn, masks, words).item() == pytest.approx(ref_pix.item(), rel=1e-5)


def test_batched_equals_a_float64_recomputation_per_example_and_word():
    a1, m1, w1 = random_case(3, n_words=3)
    a2, m2, w2 = random_case(4, n_words=1)
    index, valid = pad_words([w1, w2])
    maps = [torch.stack([a1[i], a2[i]]) for i in range(a1.shape[0])]
    masks = torch.zeros(2, 3, 64)
    masks[0] = m1
    masks[1, :1] = m2
    tok, pix = grounding_losses(maps, masks, index, valid)
    assert tok.shape == pix.shape == (2, 3)
    assert tok[1, 1:].abs().sum() == 0 and pix[1, 1:].abs().sum() == 0  # padding words contribute nothing
    # every real word against the transcription of the original's loops, that word alone (independent of the code)
    for i, (a, m, words) in enumerate(((a1, m1, w1), (a2, m2, w2))):
        for j, toks in enumerate(words):
            ref_tok, ref_pix = reference_losses(list(a), m[j : j + 1], [toks])
            assert tok[i, j].item() == pytest.approx(ref_tok.item(), rel=1e-5), (i, j)
            assert pix[i, j].item() == pytest.approx(ref_pix.item(), rel=1e-5), (i, j)
    # the batch's loss: each example's mean over its own words (3 and 1, not 3 + 1 padded slots), then over examples
    (t1, p1), (t2, p2) = reference_losses(list(a1), m1, w1), reference_losses(list(a2), m2, w2)
    assert reduce_over_words(tok, valid).item() == pytest.approx(((t1 + t2) / 2).item(), rel=1e-5)
    assert reduce_over_words(pix, valid).item() == pytest.approx(((p1 + p2) / 2).item(), rel=1e-5)


def test_zero_attention_column_gives_no_nan():
    attn, masks, words = random_case(5, n_words=2)
    attn = attn.clone()
    attn[..., words[0][0]] = 0.0  # a token with no attention anywhere: the reference divides 0 by 0
    attn.requires_grad_(True)
    loss = token_loss(attn, masks, words) + pixel_loss(attn, masks, words)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(attn.grad).all()
    # the starved token counts as nothing inside its mask: its per-map loss is exactly 1
    only = token_loss(attn.detach()[:1], masks[:1], [words[0]])
    assert only.item() == pytest.approx(1.0)


def test_no_words_is_zero_and_backpropagates():
    attn = torch.rand(2, 4, 64, 77).softmax(-1).requires_grad_(True)
    for fn in (token_loss, pixel_loss):
        loss = fn(attn, torch.zeros(0, 64), [])
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(attn.grad, torch.zeros_like(attn))
        attn.grad = None


def test_summed_probabilities_above_one_do_not_crash():
    attn = torch.full((1, 2, 16, 77), 1e-4)
    attn[..., 3] = 0.7
    attn[..., 4] = 0.6  # the word's two tokens sum to 1.3 everywhere
    attn.requires_grad_(True)
    masks = torch.zeros(1, 16)
    masks[0, :8] = 1
    loss = pixel_loss(attn, masks, [[3, 4]])
    loss.backward()
    # clamped to 1: inside the mask -log(1) = 0, outside torch's log clamp gives 100
    assert loss.item() == pytest.approx(50.0)
    assert torch.isfinite(attn.grad).all()


def test_bce_equals_torch_on_unit_interval():
    p = torch.cat([torch.rand(200), torch.tensor([0.0, 1.0, 0.0, 1.0])]).double().requires_grad_(True)
    y = torch.cat([(torch.rand(200) > 0.5).double(), torch.tensor([0.0, 1.0, 1.0, 0.0]).double()])
    ours = _bce(p, y)
    theirs = F.binary_cross_entropy(p.detach(), y, reduction="none")
    torch.testing.assert_close(ours, theirs)
    ours[:200].sum().backward()
    p2 = p.detach()[:200].clone().requires_grad_(True)
    F.binary_cross_entropy(p2, y[:200], reduction="sum").backward()
    torch.testing.assert_close(p.grad[:200], p2.grad)


def test_resize_mask_is_bilinear_then_positive():
    mask = torch.zeros(2, 32, 32)
    mask[0, 4:12, 8:20] = 1
    out = resize_mask(mask, 8)
    manual = F.interpolate(mask[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0] > 0
    assert out.shape == (2, 8, 8) and out.dtype == torch.float32
    assert torch.equal(out.bool(), manual)
    assert out[1].sum() == 0


def test_mask_that_vanishes_at_8x8_gives_finite_losses():
    big = torch.zeros(1, 512, 512)
    big[0, 100, 100] = 1  # one pixel: bilinear at 8x8 samples no covered point
    small = resize_mask(big, 8).reshape(1, 64)
    assert small.sum() == 0
    attn = torch.randn(2, 4, 64, 77).softmax(-1).requires_grad_(True)
    loss = token_loss(attn, small, [[5]]) + pixel_loss(attn, small, [[5]])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(attn.grad).all()
    assert token_loss(attn, small, [[5]]).item() == pytest.approx(2.0)  # 1 per map, 2 maps


def test_attention_in_mask_is_the_mass_share():
    attn = torch.zeros(1, 1, 4, 77)
    attn[..., 0, 2] = 0.3
    attn[..., 1, 2] = 0.1  # token 2: 0.3 inside (pixel 0), 0.1 outside
    masks = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    index, valid = pad_words([[[2]]])
    score = attention_in_mask([attn], masks, index, valid)  # one map [B=1, heads=1, HW=4, T]
    assert score.item() == pytest.approx(0.75)
