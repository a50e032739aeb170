"""TokenCompose's grounding losses on cross-attention maps, as pure tensor functions.

Faithful to the original implementation (mlpc-ucsd/TokenCompose, ``get_grounding_loss_by_layer``) for one
example and one layer group, where that implementation is defined:

    token = (1/W) sum_maps sum_w (1/|T_w|) sum_{t in T_w} (1 - mean_heads(sum_u A*M / sum_u A))^2
    pixel = (1/W) sum_w BCE_mean(sum_{t in T_w} mean_maps mean_heads A[..., t], M_w)

and better where it breaks: a token whose attention sums to 0 over the map counts as "nothing inside the
mask" (ratio 0) instead of NaN; an example with no words gives 0 and still backpropagates; a word whose
summed probabilities exceed 1 is clamped to 1 inside the BCE instead of raising.

The training path uses the batched form, :func:`grounding_losses`, which takes every map of a group for a
whole batch at once; words are padded to ``[B, W, K]`` token indices with a validity mask, so examples with
different numbers of words share one set of tensor operations (no Python loop over examples or tokens).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

#: How a group's token loss combines its maps: "sum" (the reference's; it grows with the group's map count) or "mean".
MAP_REDUCTIONS = ("sum", "mean")
# torch's BCELoss clamps each log term at -100; the reference's value at p == 0 or p == 1 is that clamp.
_LOG_CLAMP = -100.0


def resize_mask(mask: Tensor, size: int) -> Tensor:
    """Resize masks ``[..., H, W]`` to ``[..., size, size]`` as the reference did.

    Bilinear, ``align_corners=False``, no antialiasing, then binarised with ``> 0``. Returns float32 {0, 1}.
    """
    lead = mask.shape[:-2]
    x = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return (x > 0).float().reshape(*lead, size, size)


def pad_words(words_per_example: Sequence[Sequence[Sequence[int]]], device=None) -> tuple[Tensor, Tensor]:
    """Pad each example's words (lists of token positions) to ``index [B, W, K]`` and ``valid [B, W, K]``.

    Padding entries point at token 0 and are masked out by ``valid``.
    """
    b = len(words_per_example)
    w = max((len(ws) for ws in words_per_example), default=0)
    k = max((len(t) for ws in words_per_example for t in ws), default=0)
    index = torch.zeros(b, max(w, 1), max(k, 1), dtype=torch.long)
    valid = torch.zeros(b, max(w, 1), max(k, 1), dtype=torch.bool)
    for i, ws in enumerate(words_per_example):
        for j, toks in enumerate(ws):
            if toks:
                index[i, j, : len(toks)] = torch.as_tensor(list(toks), dtype=torch.long)
                valid[i, j, : len(toks)] = True
    return index.to(device), valid.to(device)


def _gather_tokens(maps: Sequence[Tensor], index: Tensor) -> Tensor:
    """Stack the group's maps ``L x [B, H, HW, T]`` keeping only the words' tokens: ``[B, L, H, HW, J]``."""
    b, w, k = index.shape
    flat = index.reshape(b, 1, 1, w * k)
    out = []
    for m in maps:
        if m.shape[0] != b:
            raise ValueError(f"attention maps have batch {m.shape[0]} but the word index has batch {b}")
        out.append(torch.gather(m, -1, flat.expand(b, m.shape[1], m.shape[2], w * k)))
    return torch.stack(out, dim=1)


def _in_mask_ratio(sel: Tensor, masks: Tensor, k: int) -> Tensor:
    """Per head, the share of each token's attention mass inside its word's mask: ``[B, L, H, J]``."""
    b, _, _, hw, _ = sel.shape
    w = masks.shape[1]
    if masks.shape != (b, w, hw):
        raise ValueError(f"masks must be [B={b}, W={w}, HW={hw}] to match the attention maps, got {tuple(masks.shape)}")
    tok_masks = masks.to(sel.dtype).unsqueeze(2).expand(b, w, k, hw).reshape(b, w * k, hw)
    inside = torch.einsum("blhuj,bju->blhj", sel, tok_masks)
    total = sel.sum(dim=3)
    # A column that sums to 0 has no attention inside the mask: ratio 0, loss 1, and no 0/0.
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(sel.dtype).tiny), torch.zeros_like(total))


def _bce(p: Tensor, target: Tensor) -> Tensor:
    """Elementwise BCE equal to torch's ``BCELoss`` on [0, 1]; inputs above 1 are clamped to 1, finite gradients."""
    p = p.clamp(0.0, 1.0)
    one_minus = 1.0 - p
    tiny = torch.finfo(p.dtype).tiny
    log_p = torch.where(p > 0, torch.log(p.clamp_min(tiny)), torch.full_like(p, _LOG_CLAMP)).clamp_min(_LOG_CLAMP)
    log_q = torch.where(one_minus > 0, torch.log(one_minus.clamp_min(tiny)), torch.full_like(p, _LOG_CLAMP))
    return -(target * log_p + (1.0 - target) * log_q.clamp_min(_LOG_CLAMP))


def grounding_losses(maps: Sequence[Tensor], masks: Tensor, index: Tensor, valid: Tensor,
                     map_reduction: str = "sum") -> tuple[Tensor, Tensor]:
    """Per-word token and pixel losses of one layer group for a batch.

    Args:
        maps: the group's attention probabilities, ``L x [B, heads, HW, T]`` (softmax over T).
        masks: ``[B, W, HW]`` binary {0, 1} at the maps' resolution.
        index, valid: ``[B, W, K]`` token positions of each word and which entries are real (:func:`pad_words`).
        map_reduction: ``"sum"`` (the reference's) or ``"mean"`` of the token loss over the group's L maps.

    Returns:
        ``(token [B, W], pixel [B, W])``; 0 where a word is padding. Token losses are summed (or averaged) over
        the group's maps and averaged over a word's tokens; pixel losses use the word's tokens summed after
        averaging maps and heads (so ``map_reduction`` does not change them).
    """
    b, w, k = index.shape
    sel = _gather_tokens(maps, index).float()  # [B, L, H, HW, J]
    valid_f = valid.to(sel.dtype)
    n_tok = valid_f.sum(-1).clamp_min(1.0)  # [B, W]

    ratio = _in_mask_ratio(sel, masks, k).mean(dim=2)  # [B, L, J] (mean over heads)
    per_map = (1.0 - ratio).square()
    per_token = (per_map.sum(dim=1) if map_reduction == "sum" else per_map.mean(dim=1)).reshape(b, w, k)
    token = (per_token * valid_f).sum(-1) / n_tok

    avg = sel.mean(dim=(1, 2)).reshape(b, -1, w, k)  # [B, HW, W, K] (mean over maps and heads)
    word_map = (avg * valid_f.unsqueeze(1)).sum(-1).transpose(1, 2)  # [B, W, HW]
    pixel = _bce(word_map, masks.to(sel.dtype)).mean(-1)

    word_valid = valid.any(-1).to(sel.dtype)
    return token * word_valid, pixel * word_valid


def reduce_over_words(per_word: Tensor, valid: Tensor) -> Tensor:
    """Mean over each example's real words (0 for an example with none), then mean over the batch."""
    n_words = valid.any(-1).sum(-1)  # [B]
    per_example = per_word.sum(-1) / n_words.clamp_min(1).to(per_word.dtype)
    return per_example.mean()


def attention_in_mask(maps: Sequence[Tensor], masks: Tensor, index: Tensor, valid: Tensor) -> Tensor:
    """Grounding score per word ``[B, W]``: the share of a word's attention inside its mask.

    Averaged over the group's maps, heads and the word's tokens; 0 for padding words. 1 is perfect grounding;
    a uniform map scores the mask's area fraction.
    """
    b, w, k = index.shape
    sel = _gather_tokens(maps, index).float()
    ratio = _in_mask_ratio(sel, masks, k).mean(dim=(1, 2)).reshape(b, w, k)
    valid_f = valid.to(ratio.dtype)
    return (ratio * valid_f).sum(-1) / valid_f.sum(-1).clamp_min(1.0)


def _single(attn: Tensor, masks: Tensor, words: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor, Tensor]:
    if attn.dim() != 4:
        raise ValueError(f"attn must be [n_maps, heads, HW, T], got shape {tuple(attn.shape)}")
    if masks.shape[0] != len(words):
        raise ValueError(f"{masks.shape[0]} masks for {len(words)} words")
    index, valid = pad_words([words], device=attn.device)
    maps = list(attn.unsqueeze(1).unbind(0))  # n_maps x [1, heads, HW, T]
    if not words:
        masks = attn.new_zeros(1, 1, attn.shape[2])
    else:
        masks = masks.reshape(1, len(words), -1)
    token, pixel = grounding_losses(maps, masks, index, valid)
    return token, pixel, valid


def token_loss(attn: Tensor, masks: Tensor, words: Sequence[Sequence[int]]) -> Tensor:
    """TokenCompose token loss of one example and one layer group (scalar).

    ``attn [n_maps, heads, HW, T]`` probabilities, ``masks [n_words, HW]`` binary, ``words`` token positions.
    """
    token, _, valid = _single(attn, masks, words)
    return reduce_over_words(token, valid)


def pixel_loss(attn: Tensor, masks: Tensor, words: Sequence[Sequence[int]]) -> Tensor:
    """TokenCompose pixel loss (BCE of a word's attention map against its mask) of one example, one group."""
    _, pixel, valid = _single(attn, masks, words)
    return reduce_over_words(pixel, valid)
