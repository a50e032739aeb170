"""What train-unet leaves in OUT: an inference-ready diffusers pipeline, or LoRA adapters (and, with --fuse, a
pipeline with them merged). Every weight file gets the umask's mode (safetensors writes 0600)."""

from __future__ import annotations

from pathlib import Path

from ..io.files import match_umask
from ..io.runs import model_id
from .config import OUTPUTS, TrainUnetConfig


def _base_parts(cfg: TrainUnetConfig, tokenizer) -> dict:
    """The components the run replaced in the base model: its --vae, its --text-encoder."""
    from ..models.components import load_text_encoder, load_vae

    parts = {}
    if cfg.vae:
        parts["vae"] = load_vae(cfg.vae)
    if cfg.text_encoder:
        parts["text_encoder"], parts["tokenizer"] = load_text_encoder(cfg.text_encoder, base_tokenizer=tokenizer)
    return parts


def save_pipeline(cfg: TrainUnetConfig, unet, tokenizer, out: Path, family) -> None:
    """The base pipeline (``family``'s) with the trained denoiser (and the --vae / --text-encoder the run used), in
    float32."""
    parts = {family.denoiser_subfolder: unet, **_base_parts(cfg, tokenizer)}
    pipe = family.pipeline_class().from_pretrained(cfg.model, revision=cfg.revision, **parts)  # float32, the default
    if cfg.prediction_type:  # the UNet now predicts what --prediction-type said: its scheduler must know
        pipe.scheduler.register_to_config(prediction_type=cfg.prediction_type)
    pipe.save_pretrained(out, safe_serialization=True)
    match_umask(*(out / name for name in OUTPUTS))


def save_lora_outputs(cfg: TrainUnetConfig, unet, tokenizer, out: Path, family) -> None:
    """OUT/pytorch_lora_weights.safetensors + tcompose_lora.json; with --fuse also OUT/fused/, the base pipeline
    with the adapters loaded from that very file and merged (so the file is checked to load)."""
    from ..models.lora import apply_lora, save_lora

    meta = {"base_model": model_id(cfg.model), "revision": cfg.revision, "vae": model_id(cfg.vae),
            "text_encoder": model_id(cfg.text_encoder),  # generation takes it (tcompose.models.lora.check_lora)
            "family": family.name, "rank": cfg.lora_rank, "alpha": cfg.lora_alpha or cfg.lora_rank,
            "targets": list(cfg.lora_targets)}
    if cfg.prediction_type:  # what the adapted UNet predicts: apply_lora sets the pipeline's scheduler to it
        meta["prediction_type"] = cfg.prediction_type
    save_lora(out, unet, meta, family.pipeline_class())
    if cfg.fuse:
        pipe = family.pipeline_class().from_pretrained(cfg.model, revision=cfg.revision, **_base_parts(cfg, tokenizer))
        apply_lora(pipe, out)
        pipe.save_pretrained(out / "fused", safe_serialization=True)
        match_umask(out / "fused")
