"""The grounding score: how much of each noun token's cross-attention falls inside its object's mask.

For held-out examples, at a fixed set of timesteps with fixed noise, the UNet runs once with capture on;
for each supervised layer, head and noun token the share ``sum_u A*M / sum_u A`` is taken, averaged over
heads and the word's tokens, then over layers (each supervised layer weighs the same), words and examples.
1.0 is perfect grounding; attention spread evenly over the image scores the masks' mean area (``chance``).
It is the direct measure of what the grounding losses do.

:func:`word_attention` shows what the number measures: for one batch, each word's attention map (averaged over
the same timesteps, layers and heads; pixel values are the share of the pixel's attention going to the word)
beside its share inside the mask, computed exactly as the score computes it.
"""

from __future__ import annotations

import torch

from .attention_maps import MapAccumulator
from .losses import attention_in_mask, resize_mask

DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)


def _batch_shares(model, batch, layers, timesteps, g: torch.Generator, acc: MapAccumulator | None = None) -> dict:
    """One batch at every timestep (fresh noise from ``g`` each): per word ``[B, W]`` its share inside its mask
    and the mask's area (both averaged over layers, every layer weighing the same, and timesteps), per group the
    shares; each evaluation's maps are also added to ``acc`` when given."""
    unet, noise_scheduler, objective = model.denoiser, model.noise_scheduler, model.objective
    device = next(unet.parameters()).device
    valid = batch["word_valid"].to(device)
    latents, cond = model.encode_batch({k: v.to(device) for k, v in batch.items()}, sample=False)
    index = batch["word_index"].to(device)
    masks_full = batch["masks"].to(device)
    sums = torch.zeros(valid.shape[:2], device=device)
    chance = torch.zeros(valid.shape[:2], device=device)
    per_group: dict[str, list[torch.Tensor]] = {}
    layer_count = 0
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=g).to(device, latents.dtype)
        ts = torch.full((latents.shape[0],), t, device=device, dtype=torch.long)
        noisy, _ = objective.training_inputs(noise_scheduler, latents, noise, ts)
        with objective.capture(unet, layers) as store:
            objective.predict(unet, noisy.to(unet.dtype), ts, cond)
        if acc is not None:
            acc.add(store.maps)
        for group, maps in store.maps.items():
            side = int(maps[0].shape[2] ** 0.5)
            m = resize_mask(masks_full, side).flatten(-2)
            share = attention_in_mask(maps, m, index, valid)  # [B, W], mean over this group's layers
            sums += share * len(maps)
            chance += m.mean(-1) * len(maps)
            layer_count += len(maps)
            per_group.setdefault(group, []).append(share)
    return {"share": sums / layer_count, "chance": chance / layer_count, "valid": valid.any(-1),
            "per_group": {k: torch.stack(v).mean(0) for k, v in per_group.items()}}


@torch.no_grad()
def grounding_score(model, batches, layers, timesteps=DEFAULT_TIMESTEPS, seed: int = 0) -> dict:
    """Mean attention-in-mask share over ``batches`` (collated held-out examples) and ``timesteps``.

    ``model``: the loaded components of a model family (:class:`tcompose.models.families.Components`): its
    ``denoiser``, ``noise_scheduler`` and ``objective``, and ``encode_batch(batch, sample=False)`` (clean latents,
    the VAE posterior's mean, and the text conditioning). Returns ``{"score", "chance", "per_group": {group: score}, "words", "examples", "timesteps"}``.
    """
    unet = model.denoiser
    was_training = unet.training
    unet.eval()
    total = chance_total = 0.0
    n_words = n_examples = 0
    per_group: dict[str, list[float]] = {}  # group -> [sum of word shares, word count]
    g = torch.Generator().manual_seed(seed)
    try:
        for batch in batches:
            if not batch["word_valid"].any():
                continue
            r = _batch_shares(model, batch, layers, timesteps, g)
            word_valid = r["valid"]
            total += float(r["share"][word_valid].sum())
            chance_total += float(r["chance"][word_valid].sum())
            n_words += int(word_valid.sum())
            n_examples += int(word_valid.any(-1).sum())
            for group, share in r["per_group"].items():
                acc = per_group.setdefault(group, [0.0, 0])
                acc[0] += float(share[word_valid].sum()) * len(timesteps)
                acc[1] += int(word_valid.sum()) * len(timesteps)
    finally:
        unet.train(was_training)
    if n_words == 0:
        return {"score": None, "chance": None, "per_group": {}, "words": 0, "examples": 0, "timesteps": list(timesteps)}
    return {
        "score": total / n_words,
        "chance": chance_total / n_words,
        "per_group": {k: v[0] / v[1] for k, v in sorted(per_group.items())},
        "words": n_words,
        "examples": n_examples,
        "timesteps": list(timesteps),
    }


@torch.no_grad()
def word_attention(model, batch, layers, timesteps=DEFAULT_TIMESTEPS, seed: int = 0) -> dict:
    """Each word's attention on one collated batch, with the share the grounding score gives it (``model`` as for
    :func:`grounding_score`).

    Returns ``maps [B, W, S, S]`` (the sum of the word's token maps, averaged over ``timesteps``, layers and
    heads, upsampled to the largest group's side S: each pixel's share of attention that goes to the word),
    ``share [B, W]`` and ``chance [B, W]`` (as :func:`grounding_score` computes them, the same noise for the
    same ``seed``) and ``valid [B, W]``. Padding words have zero maps and are not valid.
    """
    unet = model.denoiser
    was_training = unet.training
    unet.eval()
    acc = MapAccumulator(guidance=False)
    try:
        r = _batch_shares(model, batch, layers, timesteps, torch.Generator().manual_seed(seed), acc)
    finally:
        unet.train(was_training)
    tokens = acc.token_maps()  # [B, T, S, S]
    index = batch["word_index"].to(tokens.device)  # [B, W, K]
    valid = batch["word_valid"].to(tokens.device)
    b, w, k = index.shape
    picked = torch.gather(tokens, 1, index.reshape(b, w * k, 1, 1).expand(-1, -1, *tokens.shape[-2:]))
    picked = picked.reshape(b, w, k, *tokens.shape[-2:]) * valid[..., None, None].to(tokens.dtype)
    return {"maps": picked.sum(2), "share": r["share"], "chance": r["chance"], "valid": r["valid"]}
