"""Tiny random OWLv2, OWL-ViT and Mask2Former models (the evaluation's detectors: multigen and visor's OWL, GenEval's
Mask2Former), for tests and benchmarks, written as Hugging Face folders that ``--detector DIR`` loads as a hub
checkpoint; with the real-size shapes the bench uses (``OWLV2_SIZES["large"]``, ...). The outputs are meaningless;
the configs, the processors and the plumbing are the real ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..models.clip import CLIP_MEAN, CLIP_STD
from ..models.loading import no_hf_progress_bars
from .build import seeded, write_folder


# ----------------------------------------------------------------------------------------------------------
# What OWLv2 and OWL-ViT share: a CLIP text tower with 16-token queries, and its tokenizer


def _owl_text_config(spec: dict, vocab_size: int, bos_token_id: int | None, eos_token_id: int | None) -> dict:
    """The text config of an OWL model of ``spec`` (16 positions; ids default to the vocabulary's last two)."""
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    return dict(spec["text"], vocab_size=vocab_size, max_position_embeddings=16,
                bos_token_id=vocab_size - 2 if bos_token_id is None else bos_token_id, eos_token_id=eos,
                pad_token_id=eos)


def _write_owl_tokenizer(out: Path, tokenizer_source: str | Path | None, queries: list[str]) -> dict[str, int]:
    """A 16-token CLIP tokenizer in ``out`` (the real BPE from ``tokenizer_source``, else one trained on the
    detector's ``queries``); returns its vocabulary."""
    from ..data.clip_bpe import write_clip_tokenizer

    write_clip_tokenizer(out, bpe_path=tokenizer_source, corpus=None if tokenizer_source else queries)
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["model_max_length"] = 16
    cfg_path.write_text(json.dumps(tok_cfg, indent=2))
    return json.loads((out / "vocab.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------------
# OWLv2 (multigen's detector)

#: Architectures: ``large`` is OWLv2-L/14 (owlv2-large-patch14-ensemble's shapes, 1008 px, 72 x 72 boxes).
OWLV2_SIZES = {
    "tiny": dict(text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=64, patch_size=16),
                 projection_dim=32),
    "large": dict(text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                  vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=1008, patch_size=14),
                  projection_dim=768),
}


def owlv2_config(size: str = "tiny", vocab_size: int = 49408, bos_token_id: int | None = None,
                 eos_token_id: int | None = None):
    """An ``Owlv2Config`` of one of :data:`OWLV2_SIZES` (16-token queries, as every OWLv2)."""
    from transformers import Owlv2Config

    spec = OWLV2_SIZES[size]
    text = _owl_text_config(spec, vocab_size, bos_token_id, eos_token_id)
    return Owlv2Config(text_config=text, vision_config=dict(spec["vision"]), projection_dim=spec["projection_dim"])


def build_owlv2(size: str = "tiny", seed: int = 0, **config_kwargs: Any):
    """A random ``Owlv2ForObjectDetection`` of :func:`owlv2_config` ``(size)``."""
    from transformers import Owlv2ForObjectDetection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Owlv2ForObjectDetection(owlv2_config(size, **config_kwargs)).eval()


def write_tiny_owlv2(out_dir: str | Path, tokenizer_source: str | Path | None = None, seed: int = 0,
                     size: str = "tiny") -> Path:
    """Write a random OWLv2 folder that :meth:`tcompose.evaluate.detect.Owlv2Detector.load` (and ``Owlv2ForObjectDetection`` /
    ``AutoTokenizer.from_pretrained``) reads: safetensors weights, a 16-token CLIP tokenizer (the real BPE from
    ``tokenizer_source`` = ``bpe_simple_vocab_16e6.txt.gz``, else a small one trained on category names), and
    ``preprocessor_config.json``."""
    from ..data.categories import ADE20K_150, COCO_80

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the detector's queries (evaluate.detect)
    vocab = _write_owl_tokenizer(out, tokenizer_source, [f"a photo of a {n}" for n in COCO_80 + ADE20K_150])
    model = build_owlv2(size, seed, vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                        eos_token_id=vocab["<|endoftext|>"])
    with no_hf_progress_bars():
        model.save_pretrained(out, safe_serialization=True)
    n = model.config.vision_config.image_size
    pre = {"image_processor_type": "Owlv2ImageProcessor", "do_rescale": True, "rescale_factor": 1 / 255,
           "do_pad": True, "do_resize": True, "size": {"height": n, "width": n}, "do_normalize": True,
           "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return out


# ----------------------------------------------------------------------------------------------------------
# OWL-ViT (visor's detector)

#: Architectures: ``base`` is OWL-ViT B/32 (owlvit-base-patch32's shapes, 768 px, 24 x 24 boxes).
OWLVIT_SIZES = {
    "tiny": dict(text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=64, patch_size=16),
                 projection_dim=32),
    "base": dict(text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
                 vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             image_size=768, patch_size=32),
                 projection_dim=512),
}


def owlvit_config(size: str = "tiny", vocab_size: int = 49408, bos_token_id: int | None = None,
                  eos_token_id: int | None = None):
    """An ``OwlViTConfig`` of one of :data:`OWLVIT_SIZES` (16-token queries, as every OWL-ViT)."""
    from transformers import OwlViTConfig

    spec = OWLVIT_SIZES[size]
    text = _owl_text_config(spec, vocab_size, bos_token_id, eos_token_id)
    return OwlViTConfig(text_config=text, vision_config=dict(spec["vision"]), projection_dim=spec["projection_dim"])


def build_owlvit(size: str = "tiny", seed: int = 0, **config_kwargs: Any):
    """A random ``OwlViTForObjectDetection`` of :func:`owlvit_config` ``(size)``."""
    from transformers import OwlViTForObjectDetection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return OwlViTForObjectDetection(owlvit_config(size, **config_kwargs)).eval()


def write_tiny_owlvit(out_dir: str | Path, tokenizer_source: str | Path | None = None, seed: int = 0,
                      size: str = "tiny") -> Path:
    """Write a random OWL-ViT folder that :meth:`tcompose.evaluate.detect.OwlVitDetector.load` (and
    ``OwlViTForObjectDetection`` / ``AutoTokenizer.from_pretrained``) reads, laid out as :func:`write_tiny_owlv2`
    with OWL-ViT's ``preprocessor_config.json`` (bicubic resize to the model's square input, no padding)."""
    from ..data.categories import COCO_80

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _write_owl_tokenizer(out, tokenizer_source, [f"a photo of a {n}" for n in COCO_80])
    model = build_owlvit(size, seed, vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"])
    with no_hf_progress_bars():
        model.save_pretrained(out, safe_serialization=True)
    n = model.config.vision_config.image_size
    pre = {"image_processor_type": "OwlViTImageProcessor", "do_resize": True, "size": {"height": n, "width": n},
           "resample": 3, "do_center_crop": True, "crop_size": {"height": n, "width": n}, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
           "image_std": list(CLIP_STD)}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return out


# ----------------------------------------------------------------------------------------------------------
# Mask2Former (geneval's detector)


def mask2former_config(size: str = "tiny", labels=None):
    """A ``Mask2FormerConfig`` with COCO's 80 labels (``labels``: other names): ``"tiny"`` (tests: a
    1-block-per-stage Swin of width 8, width 32, 1 encoder and 2 decoder layers, 10 queries) or ``"small"``
    (Swin-S COCO instance, facebook/mask2former-swin-small-coco-instance's shapes, random weights)."""
    from transformers import Mask2FormerConfig, SwinConfig

    from ..data.categories import COCO_80

    names = list(labels or COCO_80)
    ids = dict(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if size == "small":
        return Mask2FormerConfig(backbone_config=SwinConfig(embed_dim=96, depths=[2, 2, 18, 2],
                                                            num_heads=[3, 6, 12, 24], window_size=7,
                                                            out_features=stages), **ids)
    if size != "tiny":
        raise ValueError(f"size must be 'tiny' or 'small', got {size!r}")
    return Mask2FormerConfig(
        backbone_config=SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                                   image_size=64, out_features=stages),
        feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32, encoder_layers=1,
        decoder_layers=2, num_attention_heads=2, dim_feedforward=32, num_queries=10, **ids)


def build_mask2former(size: str = "tiny", seed: int = 0, labels=None):
    """A random ``Mask2FormerForUniversalSegmentation`` of :func:`mask2former_config` (eval mode)."""
    from transformers import Mask2FormerForUniversalSegmentation

    cfg = mask2former_config(size, labels)
    return seeded(seed, lambda: Mask2FormerForUniversalSegmentation(cfg)).eval()


def write_tiny_mask2former(out_dir: str | os.PathLike, seed: int = 0, labels=None) -> Path:
    """Save a tiny random Mask2Former (safetensors, COCO's 80 labels) with a ``preprocessor_config.json``
    (ImageNet mean and std) to ``out_dir``: what ``tcompose geneval --detector DIR`` loads."""
    def write(tmp: Path) -> None:
        build_mask2former("tiny", seed, labels).save_pretrained(tmp, safe_serialization=True)
        pre = {"image_processor_type": "Mask2FormerImageProcessor", "image_mean": [0.485, 0.456, 0.406],
               "image_std": [0.229, 0.224, 0.225], "size": {"shortest_edge": 800, "longest_edge": 1333},
               "size_divisor": 32, "num_labels": len(labels or []) or 80}
        (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))

    return write_folder(out_dir, write)
