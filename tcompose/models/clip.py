"""CLIP models for ``train-clip``: random builders (tiny, ViT-B/16, ViT-L/14), loading, locking, optimizer
groups, and the export whose text tower Stable Diffusion 1.x loads as its text encoder.

    model = build_clip("tiny", seed=0, vocab_size=len(tokenizer))   # ~0.1M + vocab x 32 parameters
    write_tiny_clip("tiny-clip", tokenizer_source=None)              # a CLIPModel folder, tokenizer included
    model, tokenizer = load_clip("openai/clip-vit-large-patch14")    # hub id or local CLIPModel folder
    lock_towers(model, lock_vision=True, lock_text=False)            # requires_grad per tower / layer
    export_clip(model, tokenizer, preprocess_config, OUT)            # OUT/, OUT/text_encoder, OUT/tokenizer

The tiny text tower has width 32 and 77 positions: the ``cross_attention_dim`` of
:func:`tcompose.tiny_models.build_tiny_unet`, so a finetuned tiny CLIP conditions a tiny SD. ViT-L/14's text
tower (768 wide, 77 positions) is Stable Diffusion 1.x's text encoder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

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
LOGIT_SCALE_MAX = 4.605170185988092  # ln(100): CLIP clamps the learnt temperature at 1/100


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


def preprocess_config(image_size: int) -> dict:
    """CLIP's image preprocessing (``CLIPImageProcessor``'s ``preprocessor_config.json``) at ``image_size``."""
    return {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }


def write_tiny_clip(out_dir: str | Path, tokenizer_source: str | Path | None = None, seed: int = 0, size: str = "tiny",
                    corpus: Iterable[str] | None = None) -> Path:
    """Write a random CLIPModel folder (weights, tokenizer, ``preprocessor_config.json``) atomically.

    ``tokenizer_source`` as in :func:`tcompose.tiny_models.write_tiny_pipeline`: None -> a small BPE learnt from
    ``corpus``; CLIP's ``bpe_simple_vocab_16e6.txt.gz`` -> the real vocabulary; a tokenizer folder -> copied.
    """
    from .tiny_models import _write_tokenizer

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; pick another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_tokenizer(tmp, tokenizer_source, corpus)
        vocab = json.loads((tmp / "vocab.json").read_text(encoding="utf-8"))
        model = build_clip(size, seed, vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                           eos_token_id=vocab["<|endoftext|>"])
        model.save_pretrained(tmp, safe_serialization=True)
        cfg = preprocess_config(model.config.vision_config.image_size)
        (tmp / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_clip(model: str | os.PathLike, revision: str | None = None, local_files_only: bool | None = None):
    """``(CLIPModel, CLIPTokenizer)`` from a hub id or a local CLIPModel folder (safetensors only, float32)."""
    from transformers import CLIPModel, CLIPTokenizer

    from .models import ModelFolderError, _hub_hint, _local_path

    local = _local_path(model)
    kw: dict[str, Any] = {}
    if local is None:
        kw["revision"] = revision
        if local_files_only is not None:
            kw["local_files_only"] = local_files_only
    elif not (local / "config.json").is_file() or json.loads((local / "config.json").read_text()).get("model_type") != "clip":
        raise ModelFolderError(f"{local}: not a CLIPModel folder (config.json with model_type 'clip'); pass e.g. "
                               "openai/clip-vit-large-patch14 or a folder written by CLIPModel.save_pretrained")
    source = str(local or model)
    with _hub_hint(source, local_files_only):
        clip, info = CLIPModel.from_pretrained(source, use_safetensors=True, output_loading_info=True, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(source, **kw)
    if info.get("missing_keys"):
        raise ModelFolderError(f"{source}: {len(info['missing_keys'])} CLIP weights missing from the checkpoint "
                               f"(e.g. {sorted(info['missing_keys'])[0]})")
    return clip, tokenizer


def load_preprocess_config(model: str | os.PathLike, image_size: int, revision: str | None = None) -> dict:
    """The model's ``preprocessor_config.json`` (local folder or hub cache), else CLIP's at ``image_size``."""
    path = Path(model).expanduser()
    if path.is_dir():
        file = path / "preprocessor_config.json"
    else:
        try:
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(str(model), "preprocessor_config.json", revision=revision))
        except Exception:  # noqa: BLE001  (absent, offline without a cache: CLIP's defaults are the answer)
            file = None
    if file is not None and file.is_file():
        return {**preprocess_config(image_size), **json.loads(file.read_text())}
    return preprocess_config(image_size)


def lock_towers(model, lock_vision: bool = False, lock_text: bool = False, unlocked_text_layers: int = 0,
                learn_temperature: bool = True) -> dict[str, int]:
    """Set ``requires_grad``: ``lock_vision`` freezes the vision tower and its projection; ``lock_text`` the text
    tower and its projection, except (``unlocked_text_layers`` N > 0) the last N transformer layers, the final
    layer norm and the text projection. ``learn_temperature`` False freezes ``logit_scale``. Returns counts."""
    layers = model.text_model.encoder.layers
    if unlocked_text_layers and not lock_text:
        raise ValueError("--unlocked-text-layers only applies with --lock-text")
    if not 0 <= unlocked_text_layers <= len(layers):
        raise ValueError(f"--unlocked-text-layers must be in [0, {len(layers)}] (the text tower's layers), got {unlocked_text_layers}")
    model.requires_grad_(True)
    if lock_vision:
        model.vision_model.requires_grad_(False)
        model.visual_projection.requires_grad_(False)
    if lock_text:
        model.text_model.requires_grad_(False)
        model.text_projection.requires_grad_(False)
        if unlocked_text_layers:
            for layer in layers[len(layers) - unlocked_text_layers:]:
                layer.requires_grad_(True)
            model.text_model.final_layer_norm.requires_grad_(True)
            model.text_projection.requires_grad_(True)
    model.logit_scale.requires_grad_(learn_temperature)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError("nothing left to train: every tower is locked and the temperature is fixed")
    return {"trainable": trainable, "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad)}


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Parameters spared from weight decay: norms, biases, logit_scale, class embedding (all < 2-D), and the
    token and position embedding tables. Weight matrices, incl. the patch projection, decay."""
    return param.ndim < 2 or name.endswith(("token_embedding.weight", "position_embedding.weight"))


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters: with ``weight_decay`` and without (see :func:`no_decay`)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}) if g["params"]]


def enable_checkpointing(model) -> None:
    """Recompute transformer layers in backward (non-reentrant, so frozen inputs need no ``requires_grad``)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "disable_input_require_grads"):
        try:
            model.disable_input_require_grads()  # not needed without reentrant checkpointing
        except AttributeError:
            pass


def text_tower(model):
    """The CLIPModel's text tower as a standalone float32 ``CLIPTextModel`` (what SD's ``text_encoder/`` holds)."""
    from transformers import CLIPTextModel

    text = CLIPTextModel(model.config.text_config)
    want = set(text.state_dict())
    src = {k: v for k, v in model.state_dict().items() if k.startswith("text_model.")}
    if not want & set(src):  # transformers 5: CLIPTextModel holds the layers directly
        src = {k[len("text_model."):]: v for k, v in src.items()}
    missing, unexpected = text.load_state_dict(src, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"text tower export: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return text.float().eval()


def save_tokenizer(tokenizer, folder: Path) -> None:
    """``save_pretrained`` plus ``vocab.json`` / ``merges.txt`` (transformers 5 writes only ``tokenizer.json``;
    SD's tokenizer folders and slow tokenizers read the BPE files)."""
    tokenizer.save_pretrained(folder)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not (Path(folder) / "vocab.json").is_file() and backend is not None and hasattr(backend.model, "save"):
        backend.model.save(str(folder))


def export_clip(model, tokenizer, preprocess: dict, out: str | Path) -> Path:
    """Write ``OUT/`` (CLIPModel, tokenizer, ``preprocessor_config.json``), ``OUT/text_encoder`` (CLIPTextModel)
    and ``OUT/tokenizer``; each entry is written beside OUT first and renamed into place."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".export.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        save_tokenizer(tokenizer, tmp / "tokenizer")
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocess, indent=2) + "\n")
        text_tower(model).save_pretrained(tmp / "text_encoder", safe_serialization=True)
        for entry in sorted(tmp.iterdir()):
            dest = out / entry.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(entry, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
