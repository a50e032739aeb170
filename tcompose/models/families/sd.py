"""Stable Diffusion 1.x / 2.x: a UNet conditioned on one CLIP text encoder's last hidden states, DDPM training.

A folder holds ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` (what
``StableDiffusionPipeline.save_pretrained`` writes). ``noise_scheduler`` is the training scheduler,
``DDPMScheduler`` read from ``scheduler/`` (as diffusers' ``train_text_to_image.py`` does). ``--text-encoder``
swaps in another CLIP text model (:func:`tcompose.models.components.load_text_encoder`); its width must match
the UNet's ``cross_attention_dim``. A phrase's positions are those of its tokens in the caption's 77 CLIP ids
(:func:`tcompose.data.text.phrases_token_positions`), the columns of the UNet's cross-attention maps.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ...data.text import phrases_token_positions, tokenize_captions
from ..components import check_text_encoder, clip_text_from_pretrained, load_text_encoder
from .base import Components, ModelFamily


def vae_latents(vae, batch: dict, sample: bool, shift: bool = False) -> torch.Tensor:
    """Scaled latents of a batch: ``mean + std * latent_eps`` in float32 (``sample``), or the posterior's mean in
    the VAE's dtype; with ``shift`` (SD3, FLUX) the VAE's ``shift_factor`` is subtracted before scaling, as
    diffusers' SD3 / FLUX training scripts do: ``(z - shift_factor) * scaling_factor``.

    The VAE's ``mean`` and ``std`` come from ``batch["latent_moments"]`` ``[B, 2, C, h, w]`` when the batch
    carries them (``--cache-latents``, :mod:`tcompose.train.latent_cache`), else from encoding ``pixel_values``
    in the VAE's own dtype."""
    with torch.no_grad():
        if "latent_moments" in batch:
            mean, std = batch["latent_moments"].unbind(1)
        else:
            dist = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist
            mean, std = dist.mean, dist.std
        offset = (vae.config.get("shift_factor") or 0.0) if shift else None
        z = mean if not sample else mean + std * batch["latent_eps"].to(mean.dtype)
        if offset is not None:
            z = z - offset
        return z * vae.config.scaling_factor if not sample else (z * vae.config.scaling_factor).float()


class StableDiffusion(ModelFamily):
    name = "sd"
    label = "SD1.x / SD2.x"
    pipeline_class_name = "StableDiffusionPipeline"
    card_tags = ("stable-diffusion",)
    has_safety_checker = True
    supports_attend_excite = True

    def matches(self, denoiser_config: dict) -> bool:
        return denoiser_config.get("_class_name", "UNet2DConditionModel") == "UNet2DConditionModel" \
            and denoiser_config.get("addition_embed_type") != "text_time"

    # -- loading --------------------------------------------------------------------------------------------
    def load(self, source: str, hub: dict, local: bool, dtype: torch.dtype, swap_vae: bool = False,
             swap_text_encoder: bool = False) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler
        from transformers import CLIPTokenizer

        from ..loading import tf_dtype_kwargs

        weights = {"use_safetensors": True, **hub}
        if dtype != torch.float32:  # float32 is the default; diffusers >= 0.42 warns on `torch_dtype`
            weights["torch_dtype"] = dtype
        unet = self.load_denoiser(source, "unet", dtype, **hub)
        vae = None if swap_vae else AutoencoderKL.from_pretrained(source, subfolder="vae", **weights)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **hub)
        text_encoder = None if swap_text_encoder else clip_text_from_pretrained(
            source, subfolder="text_encoder", **hub, **tf_dtype_kwargs(dtype))
        comps = Components(family=self, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                           noise_scheduler=scheduler)
        self.load_extra_text(comps, source, hub, local, dtype)
        return comps

    def swap_text_encoder(self, comps: Components, text_encoder: Any, dtype: torch.dtype,
                          local_files_only: bool | None) -> None:
        """Put another CLIP text model (and its tokenizer, or the model's own) in place of the text encoder."""
        comps.text_encoder, comps.tokenizer = load_text_encoder(
            text_encoder, revision=None, dtype=dtype, base_tokenizer=comps.tokenizer, local_files_only=local_files_only)

    def load_extra_text(self, comps: Components, source: str, hub: dict, local: bool, dtype: torch.dtype) -> None:
        """More text encoders beside the first (none here)."""

    def load_denoiser(self, folder: str, subfolder: str | None, dtype: torch.dtype, **hub):
        from diffusers import UNet2DConditionModel

        kw = {"torch_dtype": dtype} if dtype != torch.float32 else {}
        return UNet2DConditionModel.from_pretrained(folder, subfolder=subfolder, use_safetensors=True, **hub, **kw)

    def check_components(self, comps: Components) -> None:
        check_text_encoder(comps.text_encoder, comps.unet, comps.tokenizer, comps.text_encoder_2)

    # -- text -----------------------------------------------------------------------------------------------
    def tokenize(self, comps: Components, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": tokenize_captions(comps.tokenizer, captions)}

    def phrase_positions(self, comps: Components, caption: str, phrases: Sequence[str]) -> list[list[int] | None]:
        return phrases_token_positions(comps.tokenizer, caption, phrases)

    def caption_states(self, comps: Components, batch: dict) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": comps.text_encoder(batch["input_ids"])[0]}

    def encode_batch(self, comps: Components, batch: dict, sample: bool = True) -> tuple[torch.Tensor, dict]:
        return vae_latents(comps.vae, batch, sample), self.encode_text(comps, batch)

    def example_conditioning(self, denoiser_config: dict, batch: int, latent_side: int, text_length: int,
                             generator: torch.Generator) -> dict:
        width = denoiser_config["cross_attention_dim"]
        width = width[0] if isinstance(width, (list, tuple)) else width  # per-block widths agree (check_text_encoder)
        return {"encoder_hidden_states": torch.randn(batch, text_length, width, generator=generator)}

    # -- inference ------------------------------------------------------------------------------------------
    def pipeline(self, comps: Components, scheduler, safety_checker=None, feature_extractor=None,
                 options: dict | None = None):
        return self.pipeline_class()(
            vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
            scheduler=scheduler, safety_checker=safety_checker, feature_extractor=feature_extractor,
            requires_safety_checker=safety_checker is not None)

    def encode_prompts(self, pipe, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        emb, _ = pipe.encode_prompt(prompts, pipe._execution_device, 1, False)
        return [{"prompt_embeds": e} for e in emb.unbind(0)]

    def negative_embeddings(self, pipe, empty: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"negative_prompt_embeds": empty["prompt_embeds"]}
