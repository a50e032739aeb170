"""Tiny random GroundingDINO, SAM, SAM-HQ and CLIP models (tests, benchmarks), written as Hugging Face folders
(the evaluation's detectors, OWL and Mask2Former: :mod:`.tiny_detectors`).

``write_tiny_grounding_dino(dir)``, ``write_tiny_sam(dir)`` (``hq=True``: SAM-HQ) and ``write_tiny_clip(dir)``
save a randomly initialised model (safetensors) and its processor with ``save_pretrained``, so
``tcompose masks --detector DIR --segmenter DIR --clip-model DIR`` loads them the way it loads hub checkpoints.
The outputs are meaningless; the shapes, the processors and every piece of plumbing are the real ones.

- GroundingDINO: a 1-block-per-stage Swin backbone, a 1-layer BERT text backbone, 1 encoder and 2 decoder
  layers (2, because the box heads of layers > 0 are tied to layer 0's), ``d_model`` 32, 30 queries.
  GroundingDINO hard-codes BERT's ids of ``[CLS]`` 101, ``[SEP]`` 102, ``.`` 1012 and ``?`` 1029 as phrase
  delimiters, so the WordPiece vocabulary written here (:func:`bert_vocab`) keeps BERT's layout: specials at
  0/100-103, ``.`` at 1012, ``?`` at 1029, then words, letters and ``##`` letters (every lower-case ASCII
  word tokenizes, no ``[UNK]``). Images are resized to a 128 px shortest edge (the 4th level is 2x2).
- SAM / SAM-HQ: a 2-layer ViT at 64 px (patch 16 -> a 4x4 embedding grid), the real prompt encoder and mask
  decoder at width 32.
- CLIP: 2-layer text and vision towers of width 32 at 32 px, with the small trained CLIP BPE tokenizer.

Real-size configurations, built from configs without downloading (GPU benchmarks only; never in tests):
:func:`grounding_dino_config` ``("real")`` is GroundingDINO-T (Swin-T backbone, BERT-base text backbone, 900
queries, 256 text tokens, what ``IDEA-Research/grounding-dino-tiny`` holds) and :func:`sam_config`
``("real", hq=True)`` SAM-HQ ViT-H (32 layers of width 1280, global attention at 7/15/23/31, 1024 px).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from ..io.files import atomic_folder
from ..models.clip import preprocess_config
from ..models.loading import no_hf_progress_bars
from .build import seeded, write_folder
from .tiny_sd import write_tokenizer

# BERT's (bert-base-uncased) ids that GroundingDINO's text masking relies on.
BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
_PUNCT = list("!\"#$%&'(),-/:;<=>@[\\]^_`{|}~*+")
_WORDS = (
    "a an the and of on in with at by to near next two three some many small large red blue green yellow white "
    "black brown man woman men women person people child dog dogs cat cats horse bird car bus truck train boat "
    "plane bike table chair bench bed couch sofa tv laptop phone book clock vase cup bowl glass wine bottle fork "
    "knife spoon plate pizza cake sandwich banana apple orange ball kite umbrella bag tie street road field grass "
    "water sky snow beach room kitchen wall floor window door tree building sign light fire hydrant stop square "
    "circle triangle scene picture photo sitting standing holding"
).split()


def bert_vocab(words: Iterable[str] = ()) -> list[str]:
    """A WordPiece vocabulary in BERT's layout (see the module docstring), with ``words`` added."""
    size = 1030
    vocab = [f"[unused{i}]" for i in range(size)]
    for token, i in BERT_SPECIAL_IDS.items():
        vocab[i] = token
    free = [i for i in range(104, size) if vocab[i].startswith("[unused")]
    extra = _PUNCT + [str(d) for d in range(10)] + [chr(c) for c in range(97, 123)]
    extra += ["##" + chr(c) for c in range(97, 123)] + ["##" + str(d) for d in range(10)]
    seen = set(vocab)
    for w in [*extra, *_WORDS, *(w.lower() for w in words)]:
        if w in seen or not w:
            continue
        seen.add(w)
        if free:
            vocab[free.pop(0)] = w
        else:
            vocab.append(w)
    return vocab


def bert_tokenizer(words: Iterable[str] = ()):
    """A BertTokenizer over :func:`bert_vocab`."""
    from transformers import BertTokenizer

    vocab = bert_vocab(words)
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, model_max_length=512)


def grounding_dino_config(size: str = "tiny", vocab_size: int = 30522, **overrides: Any):
    """GroundingDinoConfig: ``"tiny"`` (tests) or ``"real"`` (GroundingDINO-T, random weights)."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    if size == "real":
        return GroundingDinoConfig(
            backbone_config=SwinConfig(
                embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                out_features=["stage2", "stage3", "stage4"],
            ),
            text_config=BertConfig(vocab_size=vocab_size),
            **overrides,
        )
    if size != "tiny":
        raise ValueError(f"size must be 'tiny' or 'real', got {size!r}")
    cfg = dict(
        backbone_config=SwinConfig(
            embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=64,
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=256,
        ),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=30, encoder_n_points=2,
        decoder_n_points=2, max_text_len=256,
    )
    cfg.update(overrides)
    return GroundingDinoConfig(**cfg)


def sam_config(size: str = "tiny", hq: bool = True):
    """SamHQConfig (``hq``) or SamConfig: ``"tiny"`` (tests) or ``"real"`` (ViT-H, random weights)."""
    from transformers import SamConfig, SamHQConfig

    if size == "real":
        vision = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                      global_attn_indexes=[7, 15, 23, 31], mlp_dim=5120)
        decoder: dict[str, Any] = {"vit_dim": 1280} if hq else {}
        prompt: dict[str, Any] = {}
    elif size == "tiny":
        vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, global_attn_indexes=[1],
                      mlp_dim=64, image_size=64, patch_size=16, output_channels=32, window_size=2, num_pos_feats=16)
        decoder = dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
        if hq:
            decoder["vit_dim"] = 32
        prompt = dict(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=4)
    else:
        raise ValueError(f"size must be 'tiny' or 'real', got {size!r}")
    cls = SamHQConfig if hq else SamConfig
    return cls(vision_config=vision, mask_decoder_config=decoder, prompt_encoder_config=prompt)


def build_grounding_dino(size: str = "tiny", seed: int = 0, vocab_size: int | None = None, **overrides: Any):
    """A random GroundingDinoForObjectDetection (eval mode)."""
    from transformers import GroundingDinoForObjectDetection

    cfg = grounding_dino_config(size, vocab_size or (30522 if size == "real" else len(bert_vocab())), **overrides)
    return seeded(seed, lambda: GroundingDinoForObjectDetection(cfg)).eval()


def build_sam(size: str = "tiny", hq: bool = True, seed: int = 0):
    """A random SamHQModel (``hq``) or SamModel (eval mode)."""
    from transformers import SamHQModel, SamModel

    cfg = sam_config(size, hq)
    return seeded(seed, lambda: (SamHQModel if hq else SamModel)(cfg)).eval()


def write_tiny_grounding_dino(out_dir: str | os.PathLike, words: Iterable[str] = (), seed: int = 0,
                              **overrides: Any) -> Path:
    """Save a tiny GroundingDINO + GroundingDinoProcessor (128 px shortest edge) to ``out_dir``."""
    from transformers import GroundingDinoProcessor
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil

    tokenizer = bert_tokenizer(words)

    def write(tmp: Path) -> None:
        build_grounding_dino("tiny", seed, vocab_size=len(tokenizer), **overrides).save_pretrained(tmp)
        image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 128, "longest_edge": 192})
        GroundingDinoProcessor(image_processor, tokenizer).save_pretrained(tmp)

    return write_folder(out_dir, write)


def write_tiny_sam(out_dir: str | os.PathLike, hq: bool = True, seed: int = 0) -> Path:
    """Save a tiny SAM-HQ (``hq``) or SAM + its processor (64 px, masks at 16 px) to ``out_dir``."""
    from transformers import SamHQProcessor, SamProcessor
    from transformers.models.sam import SamImageProcessorPil

    def write(tmp: Path) -> None:
        build_sam("tiny", hq, seed).save_pretrained(tmp)
        image_processor = SamImageProcessorPil(
            size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
            mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16},
        )
        (SamHQProcessor if hq else SamProcessor)(image_processor).save_pretrained(tmp)

    return write_folder(out_dir, write)


# ----------------------------------------------------------------------------------------------------------
# CLIP (train-clip, --captions clip-best)

_TINY = dict(
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4),
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
    projection_dim=32,
)
# openai/clip-vit-base-patch16 and openai/clip-vit-large-patch14 (config.json), randomly initialised.
_VIT_B = dict(
    text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16),
    projection_dim=512,
)
_VIT_L = dict(
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=14),
    projection_dim=768,
)
CLIP_SIZES: dict[str, dict[str, Any]] = {"tiny": _TINY, "vit-b": _VIT_B, "vit-l": _VIT_L}
CLIP_VOCAB_SIZE = 49408


def build_clip(size: str = "tiny", seed: int = 0, vocab_size: int = CLIP_VOCAB_SIZE, bos_token_id: int | None = None,
               eos_token_id: int | None = None, pad_token_id: int | None = None):
    """A randomly initialised ``CLIPModel`` of ``size`` (tiny, vit-b, vit-l); the global RNG is untouched.

    Special ids default to CLIP's layout (``<|startoftext|>`` = vocab_size - 2, ``<|endoftext|>`` = the last id
    = padding). 77 text positions, quick_gelu, CLIP's initial temperature (logit_scale ln(1/0.07)).
    """
    from transformers import CLIPConfig, CLIPModel

    if size not in CLIP_SIZES:
        raise ValueError(f"unknown CLIP size {size!r}; choose one of {sorted(CLIP_SIZES)}")
    spec = CLIP_SIZES[size]
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    text = dict(spec["text"], vocab_size=vocab_size, max_position_embeddings=77, hidden_act="quick_gelu",
                projection_dim=spec["projection_dim"], bos_token_id=vocab_size - 2 if bos_token_id is None else bos_token_id,
                eos_token_id=eos, pad_token_id=eos if pad_token_id is None else pad_token_id)
    vision = dict(spec["vision"], hidden_act="quick_gelu", projection_dim=spec["projection_dim"])
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec["projection_dim"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(config)


def write_tiny_clip(out_dir: str | Path, tokenizer_source: str | Path | None = None, seed: int = 0, size: str = "tiny",
                    corpus: Iterable[str] | None = None) -> Path:
    """Write a random CLIPModel folder (weights, tokenizer, ``preprocessor_config.json``) atomically.

    ``tokenizer_source`` as in :func:`tcompose.testing.tiny_sd.write_tiny_pipeline`: None -> a small BPE learnt from
    ``corpus``; CLIP's ``bpe_simple_vocab_16e6.txt.gz`` -> the real vocabulary; a tokenizer folder -> copied.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; pick another folder")
    with atomic_folder(out) as tmp:
        write_tokenizer(tmp, tokenizer_source, corpus)
        vocab = json.loads((tmp / "vocab.json").read_text(encoding="utf-8"))
        model = build_clip(size, seed, vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                           eos_token_id=vocab["<|endoftext|>"])
        with no_hf_progress_bars():
            model.save_pretrained(tmp, safe_serialization=True)
        cfg = preprocess_config(model.config.vision_config.image_size)
        (tmp / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
