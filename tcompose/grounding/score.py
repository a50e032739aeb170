"""The grounding score: how much of each noun token's cross-attention falls inside its object's mask.

For held-out examples, at a fixed set of timesteps with fixed noise, the UNet runs once with capture on;
for each supervised layer, head and noun token the share ``sum_u A*M / sum_u A`` is taken, averaged over
heads and the word's tokens, then over layers (each supervised layer weighs the same), words and examples.
1.0 is perfect grounding; attention spread evenly over the image scores the masks' mean area (``chance``).
It is the direct measure of what the grounding losses do.
"""

from __future__ import annotations

import torch

from .attention import capture_cross_attention
from .losses import attention_in_mask, resize_mask
from .objective import encode_text

DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)


@torch.no_grad()
def grounding_score(unet, vae, text_encoder, noise_scheduler, batches, layers, timesteps=DEFAULT_TIMESTEPS,
                    seed: int = 0, text_encoder_2=None) -> dict:
    """Mean attention-in-mask share over ``batches`` (collated held-out examples) and ``timesteps``.

    ``text_encoder_2``: SDXL's second encoder (the batches then carry ``input_ids_2`` and ``time_ids``).
    Returns ``{"score", "chance", "per_group": {group: score}, "words", "examples", "timesteps"}``.
    """
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    total = chance_total = 0.0
    n_words = n_examples = 0
    per_group: dict[str, list[float]] = {}  # group -> [sum of word shares, word count]
    g = torch.Generator().manual_seed(seed)
    for batch in batches:
        valid = batch["word_valid"].to(device)
        word_valid = valid.any(-1)
        if not word_valid.any():
            continue
        px = batch["pixel_values"].to(device, vae.dtype)
        dist = vae.encode(px).latent_dist
        latents = dist.mean * vae.config.scaling_factor
        on = {k: batch[k].to(device) for k in ("input_ids", "input_ids_2", "time_ids") if k in batch}
        cond = encode_text(text_encoder, on["input_ids"], text_encoder_2, on.get("input_ids_2"), on.get("time_ids"))
        index = batch["word_index"].to(device)
        masks_full = batch["masks"].to(device)
        sums = torch.zeros(word_valid.shape, device=device)
        chance = torch.zeros(word_valid.shape, device=device)
        layer_count = 0
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=g).to(device, latents.dtype)
            ts = torch.full((latents.shape[0],), t, device=device, dtype=torch.long)
            noisy = noise_scheduler.add_noise(latents, noise, ts)
            with capture_cross_attention(unet, layers) as store:
                unet(noisy.to(unet.dtype), ts, **cond)
            for group, maps in store.maps.items():
                side = int(maps[0].shape[2] ** 0.5)
                m = resize_mask(masks_full, side).flatten(-2)
                share = attention_in_mask(maps, m, index, valid)  # [B, W], mean over this group's layers
                sums += share * len(maps)
                chance += m.mean(-1) * len(maps)
                layer_count += len(maps)
                acc = per_group.setdefault(group, [0.0, 0])
                acc[0] += float(share[word_valid].sum())
                acc[1] += int(word_valid.sum())
        per_word = sums / layer_count
        total += float(per_word[word_valid].sum())
        chance_total += float((chance / layer_count)[word_valid].sum())
        n_words += int(word_valid.sum())
        n_examples += int(word_valid.any(-1).sum())
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
