"""CLIP models: loading a CLIPModel (hub id or folder), its preprocessing config, and the export whose text
tower Stable Diffusion 1.x loads as its text encoder.

    model, tokenizer = load_clip("openai/clip-vit-large-patch14")    # hub id or local CLIPModel folder
    export_clip(model, tokenizer, preprocess_config, OUT)            # OUT/, OUT/text_encoder, OUT/tokenizer

ViT-L/14's text tower (768 wide, 77 positions) is Stable Diffusion 1.x's text encoder. Random CLIP models
(tiny, ViT-B/16, ViT-L/14) are built by :mod:`tcompose.testing.tiny_vision`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..io.files import atomic_folder, match_umask
from .loading import ModelFolderError, hub_hint, local_path

#: CLIP's image normalisation (every OpenAI CLIP and OWL model uses it).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_config(image_size: int) -> dict:
    """CLIP's image preprocessing (``CLIPImageProcessor``'s ``preprocessor_config.json``) at ``image_size``."""
    return {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
    }


def load_clip(model: str | os.PathLike, revision: str | None = None, local_files_only: bool | None = None):
    """``(CLIPModel, CLIPTokenizer)`` from a hub id or a local CLIPModel folder (safetensors only, float32)."""
    from transformers import CLIPModel, CLIPTokenizer

    local = local_path(model)
    kw: dict[str, Any] = {}
    if local is None:
        kw["revision"] = revision
        if local_files_only is not None:
            kw["local_files_only"] = local_files_only
    elif not (local / "config.json").is_file() or json.loads((local / "config.json").read_text()).get("model_type") != "clip":
        raise ModelFolderError(f"{local}: not a CLIPModel folder (config.json with model_type 'clip'); pass e.g. "
                               "openai/clip-vit-large-patch14 or a folder written by CLIPModel.save_pretrained")
    source = str(local or model)
    with hub_hint(source, local_files_only):
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
    with atomic_folder(out, merge=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        save_tokenizer(tokenizer, tmp / "tokenizer")
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocess, indent=2) + "\n")
        text_tower(model).save_pretrained(tmp / "text_encoder", safe_serialization=True)
        match_umask(tmp)  # safetensors writes its files 0600
    return out
