"""Tiny random Stable Diffusion models for tests, the offline demo and benchmarks, written as diffusers folders.

``write_tiny_pipeline(dir)`` writes what ``StableDiffusionPipeline.from_pretrained(dir, safety_checker=None)``
and ``tcompose.models.load_components(dir)`` load: a ~1M-parameter UNet (``size="medium"``: ~17.7M, SD1.x's
block layout), a small AutoencoderKL (64 px images -> 32x32x4 latents), a small CLIPTextModel whose width is
the UNet's ``cross_attention_dim``, a CLIP tokenizer (small trained BPE, or the real vocabulary), and SD1.4's
scheduler settings.

Cross-attention maps of the tiny UNet at 32x32 latents (every block has cross-attention, 8 heads per layer):
down_32 (1 layer), down_16 (1), mid_16 (1), up_16 (2), up_32 (2); HW = 1024 or 256, T = 77. The tiny SDXL
(``size="tiny-sdxl"``, SDXL's block layout) at 32x32 latents: down_16 (2 layers), mid_16 (2), up_16 (4).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

from ..data.clip_bpe import write_clip_tokenizer
from ..io.files import atomic_folder
from ..models.loading import no_hf_progress_bars

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
# SDXL's layout (stabilityai/stable-diffusion-xl-base-1.0 has this shape at full size): no cross-attention in the
# first block, more transformer layers deeper down, micro-conditioning ("text_time": pooled text + 6 time ids).
# The tiny one has two text encoders of width 32 (cross_attention_dim 64 = 32 + 32; pooled 32 + 6 x 8 time ids).
_TINY_SDXL_UNET: dict[str, Any] = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
    cross_attention_dim=64, norm_num_groups=16,
)
# SDXL base 1.0's UNet (unet/config.json), randomly initialised: ~2.57B parameters (GPU benchmarks only).
_SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, cross_attention_dim=2048,
    norm_num_groups=32,
)
UNET_SIZES: dict[str, dict[str, Any]] = {"tiny": _TINY_UNET, "medium": _MEDIUM_UNET, "sd14": _SD14_UNET,
                                         "tiny-sdxl": _TINY_SDXL_UNET, "sdxl": _SDXL_UNET}
SDXL_SIZES = ("tiny-sdxl", "sdxl")  # the sizes with SDXL's layout: two text encoders
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
#: SDXL's second text encoder (OpenCLIP ViT-bigG/14's text tower, with its 1280-wide projection).
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280, hidden_act="gelu")
#: SDXL's scheduler_config.json (Euler discrete for inference; DDPMScheduler reads the same betas for training).
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
    timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon", use_karras_sigmas=False,
    clip_sample=False, sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True,
)


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


def build_tiny_text_encoder_2(vocab_size: int, seed: int = 0, hidden_size: int = 32, bos_token_id: int | None = None,
                              eos_token_id: int | None = None, pad_token_id: int | None = None, **overrides: Any):
    """SDXL's second text encoder, tiny: a random CLIPTextModelWithProjection (its ``text_embeds`` are the
    pooled embedding SDXL's micro-conditioning takes), projection as wide as the hidden states."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    cfg = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden_size, hidden_act="gelu",
        bos_token_id=vocab_size - 2 if bos_token_id is None else bos_token_id, eos_token_id=eos,
        pad_token_id=eos if pad_token_id is None else pad_token_id,
    )
    cfg.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(CLIPTextConfig(**cfg))


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
    out.mkdir(parents=True, exist_ok=True)
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
    ``cross_attention_dim``. ``size="tiny-sdxl"`` writes an SDXL pipeline (``StableDiffusionXLPipeline``): two
    text encoders of half the UNet's width (the second one with projection, padding with "!"), micro-conditioning
    and SDXL's Euler scheduler. Written to a temporary folder and renamed, so ``out_dir`` is complete or absent.
    """
    import diffusers

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True or another folder")
    with atomic_folder(out) as tmp:
        write_tokenizer(tmp / "tokenizer", tokenizer_source, corpus)
        vocab = json.loads((tmp / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
        bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        unet = build_tiny_unet(seed, size=size, **(unet_kwargs or {}))
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        build_tiny_vae(seed + 1).save_pretrained(tmp / "vae", safe_serialization=True)
        sdxl = size in SDXL_SIZES
        width = unet.config.cross_attention_dim // 2 if sdxl else unet.config.cross_attention_dim
        text = build_tiny_text_encoder(len(vocab), seed + 2, hidden_size=width, bos_token_id=bos, eos_token_id=eos,
                                       pad_token_id=eos)
        with no_hf_progress_bars():
            text.save_pretrained(tmp / "text_encoder", safe_serialization=True)
            if sdxl:  # the second encoder pads with "!", as SDXL's does; the same BPE, so the same token positions
                pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
                build_tiny_text_encoder_2(len(vocab), seed + 3, hidden_size=width, projection_dim=pooled,
                                          bos_token_id=bos, eos_token_id=eos, pad_token_id=vocab["!"]
                                          ).save_pretrained(tmp / "text_encoder_2", safe_serialization=True)
        if sdxl:
            shutil.copytree(tmp / "tokenizer", tmp / "tokenizer_2")
            for name in ("tokenizer_config.json", "special_tokens_map.json"):
                f = tmp / "tokenizer_2" / name
                if f.is_file():
                    f.write_text(json.dumps({**json.loads(f.read_text()), "pad_token": "!"}, indent=2) + "\n")
        (tmp / "scheduler").mkdir()
        sched_class, sched_cfg = ("EulerDiscreteScheduler", SDXL_SCHEDULER) if sdxl else ("PNDMScheduler", SD_SCHEDULER)
        sched = {"_class_name": sched_class, "_diffusers_version": diffusers.__version__, **sched_cfg}
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
        common = {"_diffusers_version": diffusers.__version__, "feature_extractor": [None, None],
                  "image_encoder": [None, None], "scheduler": ["diffusers", sched_class],
                  "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                  "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
        if sdxl:
            index = {"_class_name": "StableDiffusionXLPipeline", **common, "force_zeros_for_empty_prompt": True,
                     "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                     "tokenizer_2": ["transformers", "CLIPTokenizer"]}
        else:
            index = {"_class_name": "StableDiffusionPipeline", **common, "requires_safety_checker": False,
                     "safety_checker": [None, None]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
