"""Validation images during train-unet: seeded images of a few prompts, each noun's attention beside them.

    tcompose train-unet ... --validation-prompt "a cat and a wine glass" --validation-prompt "a dog on a sofa" \\
        --validation-every 500

Every ``--validation-every`` steps (and after the last one) the main process builds an inference pipeline
from the weights being trained (the model's own inference scheduler), generates one image per prompt with
the seed ``tcompose generate`` gives prompt i, image 0 (:func:`tcompose.models.sampling.image_seed`), and
records the supervised cross-attention of every denoising step (:func:`tcompose.grounding.attention_maps
.accumulate_attention`). One PNG per evaluation, ``OUT/validation/step-NNNNNN.png``: a row per prompt, the
image then one heat map per noun phrase of the prompt (the attnviz panel), also logged to tensorboard
(``validation``). The training's random state is not touched: generation draws only from its own seeded
generators, so a run with validation trains exactly the weights of one without. With ``--cache-text`` the prompts
are encoded once before the text encoders are freed (:func:`validation_embeddings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.text import noun_phrases
from ..grounding.attention_maps import accumulate_attention, word_maps
from ..io.figures import PanelRow, draw_attention_figure
from ..models.sampling import generate_batch, image_seed, inference_scheduler


def validation_pipeline(model: str, revision: str | None, comps):
    """An inference pipeline of the model's family around the components being trained (no copy), with the
    model's own inference scheduler."""
    from ..models.components import model_index

    scheduler = inference_scheduler(model, revision)
    pipe = comps.pipeline(scheduler, options=comps.family.pipeline_options(model_index(model, revision)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def validation_embeddings(pipe, prompts: Sequence[str], guidance: float):
    """The prompts' embeddings (and the empty prompt's, where ``guidance`` runs an unconditional pass), encoded now:
    :func:`render_validation` then needs no text encoder."""
    from ..models.sampling import PromptEmbeddings

    embeddings = PromptEmbeddings(pipe)
    embeddings(list(prompts), guidance > 1 and embeddings.family.classifier_free_guidance)
    return embeddings


def prompt_words(comps, prompt: str) -> dict[str, list[int]]:
    """The prompt's noun phrases that sit in its tokens, with their token positions (the model family's)."""
    words = noun_phrases(prompt)
    return {w: pos for w, pos in zip(words, comps.phrase_positions(prompt, words)) if pos is not None}


@torch.no_grad()
def render_validation(pipe, comps, prompts: Sequence[str], seed: int, steps: int, guidance: float, resolution: int,
                      layers: Sequence[str], path: Path, panel: int = 192, embeddings=None) -> np.ndarray:
    """Generate ``prompts`` with ``pipe`` (built around ``comps``, :func:`validation_pipeline`) with capture on and
    draw the grid to ``path``; returns it as uint8 [H, W, 3]. ``embeddings``: the prompts' encoded beforehand
    (:func:`validation_embeddings`); None: the pipeline's text encoders encode them."""
    from PIL import Image

    seeds = [image_seed(seed, i, 0) for i in range(len(prompts))]
    unet = comps.denoiser
    was_training = unet.training
    unet.eval()
    try:
        cfg_pass = guidance > 1 and comps.family.classifier_free_guidance  # the pipeline's batch holds both halves
        with accumulate_attention(unet, layers, cfg_pass, capture=comps.objective.capture) as acc:
            images, _ = generate_batch(pipe, list(prompts), seeds, steps, guidance, resolution, resolution,
                                       embeddings=embeddings)
    finally:
        unet.train(was_training)
    tokens = acc.token_maps().float().cpu()  # [B, T, S, S]
    rows = []
    for i, prompt in enumerate(prompts):
        words = word_maps(tokens[i], prompt_words(comps, prompt))
        title = prompt if len(prompt) <= 34 else prompt[:33] + "…"
        rows.append(PanelRow(f"prompt {i}", images[i], list(words.items()), image_title=title))
    draw_attention_figure(rows, path, panel, scale="per-map")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
