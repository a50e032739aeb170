"""Tiny random Stable Diffusion models for tests, the offline demo and benchmarks, written as diffusers folders.

``write_tiny_pipeline(dir)`` writes what ``StableDiffusionPipeline.from_pretrained(dir, safety_checker=None)``
and ``tcompose.models.load_components(dir)`` load: a ~1M-parameter UNet (``size="medium"``: ~17.7M, SD1.x's
block layout), a small AutoencoderKL (64 px images -> 32x32x4 latents), a small CLIPTextModel whose width is
the UNet's ``cross_attention_dim``, a CLIP tokenizer (small trained BPE, or the real vocabulary), and SD1.4's
scheduler settings.

Cross-attention maps of the tiny UNet at 32x32 latents (every block has cross-attention, 8 heads per layer):
down_32 (1 layer), down_16 (1), mid_16 (1), up_16 (2), up_32 (2); HW = 1024 or 256, T = 77.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

from .clip_bpe import write_clip_tokenizer
from .loading import no_hf_progress_bars

_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")

_TINY_UNET: dict[str, Any] = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
)
_MEDIUM_UNET: dict[str, Any] = dict(
    _TINY_UNET, layers_per_block=2, block_out_channels=(64, 128, 256),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, norm_num_groups=32,
)
# Stable Diffusion 1.4's UNet (CompVis/stable-diffusion-v1-4, unet/config.json), randomly initialised: ~860M
# parameters, for GPU benchmarks only (never built in tests).
_SD14_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
UNET_SIZES: dict[str, dict[str, Any]] = {"tiny": _TINY_UNET, "medium": _MEDIUM_UNET, "sd14": _SD14_UNET}
# SD1.4's scheduler_config.json (PNDM for inference; DDPMScheduler.from_pretrained reads the same file,
# clip_sample False included, which PNDM itself ignores).
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, clip_sample=False,
)

#: SD1.x's VAE and text-encoder shapes (random weights; benchmarks build real-size pipelines from them).
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512)
SD_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


def tiny_unet_config(size: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """UNet2DConditionModel kwargs: ``tiny`` (~1.06M parameters) or ``medium`` (~17.7M), then ``overrides``."""
    if size not in UNET_SIZES:
        raise ValueError(f"unknown UNet size {size!r}; choose one of {sorted(UNET_SIZES)}")
    return {**UNET_SIZES[size], **overrides}


def build_tiny_unet(seed: int = 0, size: str = "tiny", **overrides: Any):
    """A randomly initialised UNet2DConditionModel (see :func:`tiny_unet_config`); global RNG untouched."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**tiny_unet_config(size, **overrides))


def build_tiny_vae(seed: int = 0, **overrides: Any):
    """A random AutoencoderKL: 3 -> 4 latent channels, downsampling x2 (64 px images -> 32x32 latents)."""
    from diffusers import AutoencoderKL

    cfg = dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=16, sample_size=64,
    )
    cfg.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**cfg)


def build_tiny_text_encoder(
    vocab_size: int,
    seed: int = 0,
    hidden_size: int = 32,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    **overrides: Any,
):
    """A random CLIPTextModel (3 layers, 4 heads, MLP 2 x hidden, 77 positions). Special ids default to CLIP's layout:
    ``<|startoftext|>`` = vocab_size - 2, ``<|endoftext|>`` = vocab_size - 1 = padding."""
    from transformers import CLIPTextConfig, CLIPTextModel

    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    cfg = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden_size,
        hidden_act="quick_gelu", bos_token_id=vocab_size - 2 if bos_token_id is None else bos_token_id,
        eos_token_id=eos, pad_token_id=eos if pad_token_id is None else pad_token_id,
    )
    cfg.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(CLIPTextConfig(**cfg))


def write_tokenizer(out: Path, source: str | Path | None, corpus: Iterable[str] | None) -> None:
    if source is None:
        write_clip_tokenizer(out, corpus=corpus)
        return
    src = Path(source)
    if src.is_file():
        write_clip_tokenizer(out, bpe_path=src)
        return
    if (src / "tokenizer").is_dir():
        src = src / "tokenizer"
    if not (src / "vocab.json").is_file() or not (src / "merges.txt").is_file():
        raise FileNotFoundError(f"{source}: expected CLIP's bpe_simple_vocab_16e6.txt.gz or a tokenizer folder "
                                "with vocab.json and merges.txt")
    out.mkdir(parents=True)
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)


def write_tiny_pipeline(
    out_dir: str | Path,
    tokenizer_source: str | Path | None = None,
    seed: int = 0,
    unet_kwargs: dict[str, Any] | None = None,
    size: str = "tiny",
    corpus: Iterable[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete random Stable Diffusion folder (``StableDiffusionPipeline.from_pretrained`` loads it).

    ``tokenizer_source``: None -> a small BPE trained on ``corpus`` + common words (deterministic, offline);
    a path to CLIP's ``bpe_simple_vocab_16e6.txt.gz`` -> the real 49,408-token vocabulary; a tokenizer folder
    (or a pipeline folder) -> its CLIP tokenizer files copied. The text encoder's width follows the UNet's
    ``cross_attention_dim``. Written to a temporary folder and renamed, so ``out_dir`` is complete or absent.
    """
    import diffusers

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True or another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write_tokenizer(tmp / "tokenizer", tokenizer_source, corpus)
        vocab = json.loads((tmp / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
        bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        unet = build_tiny_unet(seed, size=size, **(unet_kwargs or {}))
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        build_tiny_vae(seed + 1).save_pretrained(tmp / "vae", safe_serialization=True)
        text = build_tiny_text_encoder(
            len(vocab), seed + 2, hidden_size=unet.config.cross_attention_dim, bos_token_id=bos, eos_token_id=eos,
            pad_token_id=eos,
        )
        with no_hf_progress_bars():
            text.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        (tmp / "scheduler").mkdir()
        sched = {"_class_name": "PNDMScheduler", "_diffusers_version": diffusers.__version__, **SD_SCHEDULER}
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
        index = {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
            "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
