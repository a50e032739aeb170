"""Stable Diffusion components: loading from a hub id or a local diffusers folder; tiny random builders.

Loading (what the stages use)::

    comps = load_components("CompVis/stable-diffusion-v1-4", revision=None, text_encoder=None)
    comps.unet, comps.vae, comps.text_encoder, comps.tokenizer, comps.noise_scheduler

``model`` is a hub id (``HF_HUB_OFFLINE=1`` works with a warm cache) or a local folder with ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` (what ``StableDiffusionPipeline.save_pretrained``
writes). ``noise_scheduler`` is the training scheduler, ``DDPMScheduler`` read from ``scheduler/`` (as
diffusers' ``train_text_to_image.py`` does). ``text_encoder`` swaps in another CLIP text model (see
:func:`load_text_encoder`); its width must match the UNet's ``cross_attention_dim``.

Tiny models (tests, the offline demo, benchmarks; defined in :mod:`tcompose.tiny_models`, re-exported here)::

    path = write_tiny_pipeline("tiny-sd")        # ~1M-parameter UNet, 64 px images -> 32x32 latents
    StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    write_tiny_pipeline("medium-sd", size="medium")   # ~18M-parameter UNet, same layout as SD1.x

The tiny UNet has cross-attention in every block; at 32x32 latents its maps are 32x32 (down, up) and
16x16 (down, mid, up): groups down_32, down_16, mid_16, up_16, up_32 with 8 heads each.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .clip_bpe import find_clip_bpe, write_clip_tokenizer
from .tiny_models import (
    UNET_SIZES,
    build_tiny_text_encoder,
    build_tiny_unet,
    build_tiny_vae,
    count_parameters,
    tiny_unet_config,
    write_tiny_pipeline,
)

__all__ = [
    "SDComponents", "ModelFolderError", "TextEncoderMismatchError", "load_components", "load_text_encoder",
    "check_text_encoder", "tiny_unet_config", "build_tiny_unet", "build_tiny_vae", "build_tiny_text_encoder",
    "write_tiny_pipeline", "write_clip_tokenizer", "find_clip_bpe", "count_parameters", "UNET_SIZES",
]

PIPELINE_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ModelFolderError(ValueError):
    """A model path that is not a usable folder (missing, or without the expected subfolders/files)."""


class TextEncoderMismatchError(ValueError):
    """A text encoder that cannot condition this UNet (width or context length)."""


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion model that training and inference need."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any


def _tf_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers >= 4.56 names the argument ``dtype``; older versions ``torch_dtype``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _local_path(name: str | os.PathLike) -> Path | None:
    """The local folder ``name`` names, None for a hub id; ModelFolderError for a local path that is absent."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelFolderError(
                f"{path} is a file; pass a model folder or a hub id such as CompVis/stable-diffusion-v1-4"
            )
        return path
    text = str(name)
    parts = text.replace("\\", "/").split("/")
    local_like = (
        isinstance(name, Path) or text.startswith((".", "/", "~")) or "\\" in text or len(parts) > 2
        or (len(parts) == 2 and Path(parts[0]).is_dir())
    )
    if local_like:
        raise ModelFolderError(
            f"{path}: model folder not found. Pass an existing local folder (e.g. one written by "
            "`StableDiffusionPipeline.save_pretrained` or `tcompose train-unet`) or a hub id such as "
            "CompVis/stable-diffusion-v1-4."
        )
    return None


def _offline(local_files_only: bool | None) -> bool:
    if local_files_only:
        return True
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def _hub_hint(model_id: str, local_files_only: bool | None) -> Iterator[None]:
    """Re-raise a hub loading error unchanged, with a one-line hint attached."""
    try:
        yield
    except (OSError, ValueError) as err:
        if isinstance(err, ModelFolderError):
            raise
        if _offline(local_files_only):
            hint = (f"hint: {model_id!r} is not in the local Hugging Face cache and offline mode (HF_HUB_OFFLINE=1 / "
                    f"local_files_only) forbids downloading it: fetch it once with network (`tcompose download "
                    f"{model_id}`), point HF_HOME at a warm cache, or pass a local diffusers folder.")
        else:
            hint = (f"hint: could not load {model_id!r} from the Hugging Face Hub: check the id and --revision and "
                    "the network, or pass a local diffusers folder.")
        err.add_note(hint)
        raise


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Drop a logger's records below ERROR. A filter, not setLevel: transformers reads its logger's level."""
    import logging

    log = logging.getLogger(logger_name)
    drop = lambda record: record.levelno >= logging.ERROR  # noqa: E731
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


@contextlib.contextmanager
def no_hf_progress_bars() -> Iterator[None]:
    """Turn off transformers' per-model progress bars ("Loading weights", "Writing model shards") inside the
    block: one bar per component is noise next to a stage's own progress bar."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _clip_text_from_pretrained(source: str | Path, **kwargs: Any):
    """CLIPTextModel.from_pretrained (safetensors only) that fails on missing weights (a text tower must load
    completely) and keeps quiet about the unused vision tower of a CLIPModel checkpoint."""
    from transformers import CLIPTextModel

    with _quiet("transformers.modeling_utils"):
        model, info = CLIPTextModel.from_pretrained(source, output_loading_info=True, use_safetensors=True, **kwargs)
    missing = list(info.get("missing_keys") or [])
    if missing:
        where = f"{source}/{kwargs['subfolder']}" if kwargs.get("subfolder") else str(source)
        raise ModelFolderError(f"{where}: {len(missing)} text-encoder weights missing from the checkpoint "
                               f"(e.g. {sorted(missing)[0]}); it is not a CLIP text model checkpoint")
    return model


def _has_tokenizer(folder: Path) -> bool:
    if (folder / "tokenizer.json").is_file():
        return True
    return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


def load_text_encoder(
    path_or_id: str | os.PathLike,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    base_tokenizer: Any = None,
    local_files_only: bool | None = None,
) -> tuple[Any, Any]:
    """(CLIPTextModel, tokenizer) from a folder or hub id.

    Accepts: a folder with ``text_encoder/`` and ``tokenizer/`` subfolders (a pipeline, or what
    ``train-clip`` writes); a CLIPTextModel folder (``model_type`` clip_text_model); a full CLIPModel folder
    or hub id (its text tower is taken). Without tokenizer files beside the weights, ``base_tokenizer`` is used.
    """
    from transformers import CLIPTokenizer

    local = _local_path(path_or_id)
    if local is not None:
        if (local / "text_encoder").is_dir():
            model_dir, tok_dir = local / "text_encoder", local / "tokenizer"
        elif (local / "config.json").is_file():
            model_type = json.loads((local / "config.json").read_text()).get("model_type")
            if model_type not in ("clip_text_model", "clip"):
                raise ModelFolderError(
                    f"{local / 'config.json'}: model_type {model_type!r} is not a CLIP text model; pass a "
                    "CLIPTextModel or CLIPModel folder, or a folder with text_encoder/ and tokenizer/"
                )
            model_dir, tok_dir = local, local
        else:
            raise ModelFolderError(
                f"{local}: neither text_encoder/ nor config.json found; pass a CLIPTextModel or CLIPModel folder "
                "(save_pretrained output) or a folder with text_encoder/ and tokenizer/ subfolders"
            )
        text_model = _clip_text_from_pretrained(model_dir, **_tf_dtype(dtype))
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir) if _has_tokenizer(tok_dir) else base_tokenizer
        if tokenizer is None:
            raise ModelFolderError(f"{tok_dir}: no tokenizer files (vocab.json + merges.txt or tokenizer.json) "
                                   "and no base model tokenizer to fall back on")
        return text_model, tokenizer
    hub: dict[str, Any] = {"revision": revision}
    if local_files_only is not None:
        hub["local_files_only"] = local_files_only
    model_id = str(path_or_id)
    with _hub_hint(model_id, local_files_only):
        try:  # a CLIPModel / CLIPTextModel repository
            text_model = _clip_text_from_pretrained(model_id, **hub, **_tf_dtype(dtype))
            sub: dict[str, str] = {}
        except OSError as first:  # a diffusers pipeline repository
            try:
                text_model = _clip_text_from_pretrained(model_id, subfolder="text_encoder", **hub, **_tf_dtype(dtype))
            except OSError:
                raise first from None
            sub = {"subfolder": "tokenizer"}
        try:
            tokenizer = CLIPTokenizer.from_pretrained(model_id, **sub, **hub)
        except OSError:
            if base_tokenizer is None:
                raise
            tokenizer = base_tokenizer
    return text_model, tokenizer


def check_text_encoder(text_encoder: Any, unet: Any, tokenizer: Any = None) -> None:
    """Raise TextEncoderMismatchError unless ``text_encoder`` can condition ``unet`` with 77-token prompts."""
    hidden = text_encoder.config.hidden_size
    cross = unet.config.cross_attention_dim
    crosses = set(cross) if isinstance(cross, (list, tuple)) else {cross}
    if crosses != {hidden}:
        raise TextEncoderMismatchError(
            f"text encoder hidden size {hidden} != UNet cross_attention_dim {cross}: use a text encoder of width "
            f"{cross} (SD1.x: CLIP ViT-L/14, 768; SD2.x: OpenCLIP ViT-H, 1024)"
        )
    length = 77
    if tokenizer is not None and 0 < int(tokenizer.model_max_length) < 100_000:
        length = int(tokenizer.model_max_length)
    positions = text_encoder.config.max_position_embeddings
    if positions < length:
        raise TextEncoderMismatchError(
            f"text encoder max_position_embeddings {positions} < prompt length {length} (tokenizer.model_max_length): "
            "it cannot encode a padded prompt"
        )
    if tokenizer is not None and len(tokenizer) > text_encoder.config.vocab_size:
        raise TextEncoderMismatchError(
            f"tokenizer has {len(tokenizer)} tokens but the text encoder's vocab_size is "
            f"{text_encoder.config.vocab_size}: pair the text encoder with its own tokenizer"
        )


def load_components(
    model: str | os.PathLike,
    revision: str | None = None,
    text_encoder: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    local_files_only: bool | None = None,
) -> SDComponents:
    """UNet, VAE, text encoder, tokenizer and the DDPM training scheduler of a hub id or local folder.

    Weights are read from safetensors only. ``revision`` applies to a hub id; ``local_files_only`` None
    follows ``HF_HUB_OFFLINE``. Raises ModelFolderError (a ValueError) for a missing or incomplete local
    folder, TextEncoderMismatchError when the text encoder cannot condition the UNet.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    local = _local_path(model)
    kw: dict[str, Any] = {}
    if local is not None:
        need = [s for s in PIPELINE_SUBFOLDERS if not (s == "text_encoder" and text_encoder is not None)]
        missing = [s for s in need if not (local / s).is_dir()]
        if missing:
            raise ModelFolderError(
                f"{local} is not a diffusers Stable Diffusion folder: missing {', '.join(s + '/' for s in missing)}. "
                "Pass a folder written by `StableDiffusionPipeline.save_pretrained` (unet/, vae/, text_encoder/, "
                "tokenizer/, scheduler/) or a hub id such as CompVis/stable-diffusion-v1-4."
            )
        source = str(local)
        context: contextlib.AbstractContextManager = contextlib.nullcontext()
    else:
        source = str(model)
        kw["revision"] = revision
        if local_files_only is not None:
            kw["local_files_only"] = local_files_only
        context = _hub_hint(source, local_files_only)
    with context:
        weights = {"use_safetensors": True, **kw}
        if dtype != torch.float32:  # float32 is the default; diffusers >= 0.42 warns on `torch_dtype`
            weights["torch_dtype"] = dtype
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **weights)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
        if text_encoder is None:
            text_model = _clip_text_from_pretrained(source, subfolder="text_encoder", **kw, **_tf_dtype(dtype))
    if text_encoder is not None:
        text_model, tokenizer = load_text_encoder(
            text_encoder, revision=None, dtype=dtype, base_tokenizer=tokenizer, local_files_only=local_files_only
        )
    check_text_encoder(text_model, unet, tokenizer)
    return SDComponents(unet=unet, vae=vae, text_encoder=text_model, tokenizer=tokenizer, noise_scheduler=scheduler)
