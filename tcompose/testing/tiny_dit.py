"""Tiny random diffusion transformers (SD3 / SD3.5 MMDiT, FLUX.1) for tests, the demo and the bench.

Built as diffusers' own fast tests build them (its ``tests/pipelines/stable_diffusion_3/``, ``tests/pipelines/flux/``
and ``tests/models/transformers/test_models_transformer_sd3.py``): the model classes with small widths, random
weights under a fixed seed, a VAE without quant convs, ``FlowMatchEulerDiscreteScheduler``. Where those tests
download ``hf-internal-testing/tiny-random-clip`` and ``tiny-random-t5``, the tokenizers here are made in code,
offline: CLIP's from :mod:`tcompose.data.clip_bpe` (as :mod:`.tiny_sd` does), and a small T5-style tokenizer
(:func:`build_tiny_t5_tokenizer`: a ``tokenizers`` Unigram model over a word list, Metaspace pre-tokenisation,
``</s>`` appended, as T5's fast tokenizer; no sentencepiece needed). Long words are split into two pieces and
unknown ones fall back to letters, so captions have multi-piece words, and the fast tokenizer returns character
offsets.

    write_tiny_sd3_pipeline(dir)    # StableDiffusion3Pipeline.from_pretrained(dir): SD3.5 layout
    write_tiny_flux_pipeline(dir)   # FluxPipeline.from_pretrained(dir): FLUX.1-dev layout

Layouts (each tiny model has the real one's kinds of block, at a small width):

- SD3.5 (``TINY_SD35``): 4 joint blocks, dual attention (an image-only second attention) in blocks 0 and 1,
  RMS qk-norm, patch 2, 4 heads of 8; the last block is ``context_pre_only``. VAE: 4 latent channels, x2
  downsampling, so a 32 px image is 16 x 16 latents and an 8 x 8 patch grid.
- FLUX.1-dev (``TINY_FLUX``): 3 double-stream and 2 single-stream blocks, guidance embedding, rotary axes
  (4, 4, 8) over 2 heads of 16. VAE as above; the pipeline packs 2 x 2 latent patches, so 32 px -> 8 x 8 tokens.

``SD3_MEDIUM``, ``SD35_MEDIUM``, ``SD35_LARGE`` and ``FLUX_DEV`` are the real transformers' shapes (from their
``transformer/config.json``), for the bench's random real-size models and for tests of the per-model defaults.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Iterable

from ..data.clip_bpe import common_words
from ..io.files import atomic_folder
from ..models.loading import no_hf_progress_bars
from .build import seeded
from .tiny_sd import build_tiny_text_encoder, build_tiny_text_encoder_2, write_tokenizer

#: SD3.5-medium's layout, tiny (dual attention in the first blocks, RMS qk-norm).
TINY_SD35: dict[str, Any] = dict(
    sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8,
    num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=96, pooled_projection_dim=64,
    pos_embed_max_size=32, dual_attention_layers=(0, 1), qk_norm="rms_norm",
)
#: FLUX.1-dev's layout, tiny (double- and single-stream blocks, guidance embedding).
TINY_FLUX: dict[str, Any] = dict(
    patch_size=1, in_channels=16, num_layers=3, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
)
_COMMON_SD3 = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                   joint_attention_dim=4096, pooled_projection_dim=2048)
#: stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json (random weights: benchmarks only).
SD3_MEDIUM: dict[str, Any] = dict(_COMMON_SD3, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                  pos_embed_max_size=192, dual_attention_layers=(), qk_norm=None)
#: stabilityai/stable-diffusion-3.5-medium, transformer/config.json.
SD35_MEDIUM: dict[str, Any] = dict(_COMMON_SD3, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                   pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
#: stabilityai/stable-diffusion-3.5-large, transformer/config.json.
SD35_LARGE: dict[str, Any] = dict(_COMMON_SD3, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                                  pos_embed_max_size=192, dual_attention_layers=(), qk_norm="rms_norm")
#: black-forest-labs/FLUX.1-dev, transformer/config.json.
FLUX_DEV: dict[str, Any] = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))

#: A small T5 encoder (gated-GELU feed-forward, as T5 v1.1 / T5-XXL that SD3 and FLUX use).
TINY_T5: dict[str, Any] = dict(d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                               relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0)
#: SD3.5's scheduler_config.json; FLUX.1-dev's adds resolution-dependent shifting.
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
#: The tiny VAE: two levels (x2 downsampling), no quant convs, SD3's scaling and shift factors.
TINY_DIT_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                    scaling_factor=1.5035, sample_size=32)

_SUFFIXES = ("s", "es", "er", "ers", "ing", "ed", "ly", "y")


def build_tiny_sd3_transformer(seed: int = 0, **overrides: Any):
    """A random ``SD3Transformer2DModel`` in SD3.5's layout (``TINY_SD35`` then ``overrides``); global RNG untouched."""
    from diffusers import SD3Transformer2DModel

    return seeded(seed, lambda: SD3Transformer2DModel(**{**TINY_SD35, **overrides}))


def build_tiny_flux_transformer(seed: int = 0, **overrides: Any):
    """A random ``FluxTransformer2DModel`` in FLUX.1-dev's layout (``TINY_FLUX`` then ``overrides``)."""
    from diffusers import FluxTransformer2DModel

    return seeded(seed, lambda: FluxTransformer2DModel(**{**TINY_FLUX, **overrides}))


def build_tiny_dit_vae(seed: int = 0, **overrides: Any):
    """A random ``AutoencoderKL`` as SD3 / FLUX pipelines take it (``TINY_DIT_VAE`` then ``overrides``)."""
    from diffusers import AutoencoderKL

    return seeded(seed, lambda: AutoencoderKL(**{**TINY_DIT_VAE, **overrides}))


def build_tiny_t5_encoder(vocab_size: int, seed: int = 0, d_model: int = 32, **overrides: Any):
    """A random ``T5EncoderModel`` (``TINY_T5`` then ``overrides``): pad id 0, ``</s>`` id 1, as T5's vocabulary."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                   **{**TINY_T5, **overrides})
    return seeded(seed, lambda: T5EncoderModel(cfg))


def tiny_t5_vocabulary(words: Iterable[str] | None = None) -> list[tuple[str, float]]:
    """(piece, log-probability) of the tiny T5 tokenizer, in id order: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``▁`` 3,
    then the pieces sorted. Words of up to 6 letters are one piece (``▁cat``) and also a word-inner piece (``cat``,
    for compounds: "skateboard" -> ``▁skate`` ``board``); longer words are two pieces, cut in the middle
    (``▁elep`` ``hant``); common suffixes, and every ASCII letter, digit and punctuation mark (with and without
    ``▁``) catch the rest, so any ASCII text tokenises without ``<unk>``."""
    scores: dict[str, float] = {}

    def add(piece: str, score: float) -> None:
        scores.setdefault(piece, score)

    for word in sorted(set(common_words() if words is None else words)):
        if len(word) > 6:
            half = len(word) // 2
            add("\u2581" + word[:half], -9.0)
            add(word[half:], -9.0)
        else:
            add("\u2581" + word, -8.0)
            add(word, -10.0)
    for suffix in _SUFFIXES:
        add(suffix, -9.5)
    for ch in string.ascii_letters + string.digits + string.punctuation:
        add(ch, -12.0)
        add("\u2581" + ch, -11.5)
    return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -6.0)] + sorted(scores.items())


def build_tiny_t5_tokenizer(words: Iterable[str] | None = None, model_max_length: int = 512):
    """A T5-style fast tokenizer made in code (``T5TokenizerFast`` over a Unigram model of
    :func:`tiny_t5_vocabulary`, Metaspace pre-tokenizer, ``</s>`` appended): no sentencepiece, no network; it
    returns ``offset_mapping`` and splits long and unknown words into several pieces."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=tiny_t5_vocabulary(words), extra_ids=0, model_max_length=model_max_length)


def _clip_tokenizer(out: Path, tokenizer_source, corpus) -> tuple[Any, dict[str, int]]:
    from transformers import CLIPTokenizer

    write_tokenizer(out, tokenizer_source, corpus)
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    return CLIPTokenizer.from_pretrained(out), vocab


def _clip_ids(vocab: dict[str, int]) -> dict[str, int]:
    eos = vocab["<|endoftext|>"]
    return dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos)


def _save(pipe, out_dir: str | Path, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True or another folder")
    with atomic_folder(out) as tmp, no_hf_progress_bars():
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def corpus_words(corpus: Iterable[str] | None) -> list[str] | None:
    """The tiny T5 vocabulary's words: the bundled common words plus the lowercase letter runs of ``corpus``."""
    if corpus is None:
        return None
    import re

    return common_words() + [w for text in corpus for w in re.findall(r"[a-z]+", text.lower())]


def tiny_sd3_pipeline(seed: int = 0, tokenizer_source: str | Path | None = None, corpus: Iterable[str] | None = None,
                      transformer_kwargs: dict[str, Any] | None = None, work_dir: str | Path | None = None):
    """A random ``StableDiffusion3Pipeline`` in SD3.5's layout, in memory: two CLIP text encoders with projection
    (width 32 each: 64-wide pooled text and CLIP embeddings, zero-padded to the T5 width as SD3 pads them), a T5
    encoder of width ``joint_attention_dim`` (96), their tokenizers, the tiny VAE and the flow-matching scheduler.
    ``tokenizer_source``/``corpus``: the CLIP tokenizer, as :func:`tcompose.testing.tiny_sd.write_tiny_pipeline`
    takes them; ``work_dir`` a scratch folder for its files (a temporary one by default)."""
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    corpus = None if corpus is None else list(corpus)  # read twice: the CLIP and the T5 vocabularies
    transformer = build_tiny_sd3_transformer(seed, **(transformer_kwargs or {}))
    cfg = transformer.config
    with tempfile.TemporaryDirectory(dir=work_dir) as scratch:
        tokenizer, vocab = _clip_tokenizer(Path(scratch) / "tokenizer", tokenizer_source, corpus)
    width = cfg.pooled_projection_dim // 2
    text = [build_tiny_text_encoder_2(len(vocab), seed + 2 + i, hidden_size=width, **_clip_ids(vocab)) for i in (0, 1)]
    tokenizer_3 = build_tiny_t5_tokenizer(corpus_words(corpus))
    t5 = build_tiny_t5_encoder(len(tokenizer_3), seed + 4, d_model=cfg.joint_attention_dim)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=build_tiny_dit_vae(seed + 1, latent_channels=cfg.in_channels), text_encoder=text[0], tokenizer=tokenizer,
        text_encoder_2=text[1], tokenizer_2=tokenizer, text_encoder_3=t5, tokenizer_3=tokenizer_3)


def tiny_flux_pipeline(seed: int = 0, tokenizer_source: str | Path | None = None, corpus: Iterable[str] | None = None,
                       transformer_kwargs: dict[str, Any] | None = None, work_dir: str | Path | None = None):
    """A random ``FluxPipeline`` in FLUX.1-dev's layout, in memory: a CLIP text encoder (its pooled output, width
    ``pooled_projection_dim``), a T5 encoder of width ``joint_attention_dim``, their tokenizers, the tiny VAE with
    ``in_channels / 4`` latent channels (FLUX packs 2 x 2 patches) and the scheduler with dynamic shifting."""
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    corpus = None if corpus is None else list(corpus)  # read twice: the CLIP and the T5 vocabularies
    transformer = build_tiny_flux_transformer(seed, **(transformer_kwargs or {}))
    cfg = transformer.config
    with tempfile.TemporaryDirectory(dir=work_dir) as scratch:
        tokenizer, vocab = _clip_tokenizer(Path(scratch) / "tokenizer", tokenizer_source, corpus)
    text = build_tiny_text_encoder(len(vocab), seed + 2, hidden_size=cfg.pooled_projection_dim, hidden_act="gelu",
                                   **_clip_ids(vocab))
    tokenizer_2 = build_tiny_t5_tokenizer(corpus_words(corpus))
    t5 = build_tiny_t5_encoder(len(tokenizer_2), seed + 4, d_model=cfg.joint_attention_dim)
    return FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=build_tiny_dit_vae(seed + 1, latent_channels=cfg.in_channels // 4), text_encoder=text,
        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2)


def write_tiny_sd3_pipeline(out_dir: str | Path, seed: int = 0, tokenizer_source: str | Path | None = None,
                            corpus: Iterable[str] | None = None, transformer_kwargs: dict[str, Any] | None = None,
                            overwrite: bool = False) -> Path:
    """Write :func:`tiny_sd3_pipeline` with ``save_pretrained`` (``StableDiffusion3Pipeline.from_pretrained(out_dir)``
    loads it offline); written to a temporary folder and renamed, so ``out_dir`` is complete or absent."""
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    pipe = tiny_sd3_pipeline(seed, tokenizer_source, corpus, transformer_kwargs, work_dir=Path(out_dir).parent)
    return _save(pipe, out_dir, overwrite)


def write_tiny_flux_pipeline(out_dir: str | Path, seed: int = 0, tokenizer_source: str | Path | None = None,
                             corpus: Iterable[str] | None = None, transformer_kwargs: dict[str, Any] | None = None,
                             overwrite: bool = False) -> Path:
    """Write :func:`tiny_flux_pipeline` with ``save_pretrained`` (``FluxPipeline.from_pretrained(out_dir)`` loads
    it offline); written to a temporary folder and renamed, so ``out_dir`` is complete or absent."""
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    pipe = tiny_flux_pipeline(seed, tokenizer_source, corpus, transformer_kwargs, work_dir=Path(out_dir).parent)
    return _save(pipe, out_dir, overwrite)
