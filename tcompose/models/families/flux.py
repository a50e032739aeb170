"""FLUX.1 (dev, schnell): a transformer of double-stream and single-stream blocks (``FluxTransformer2DModel``)
conditioned on T5 and CLIP's pooled output, trained by flow matching on 2 x 2 packed latents; 1024 px.

A folder holds ``transformer/``, ``vae/``, ``text_encoder/`` (``CLIPTextModel``: its pooled output),
``text_encoder_2/`` (``T5EncoderModel``), ``tokenizer/``, ``tokenizer_2/`` (T5's fast tokenizer) and ``scheduler/``
(``FlowMatchEulerDiscreteScheduler`` with dynamic shifting): what ``FluxPipeline.save_pretrained`` writes.

Text, as ``FluxPipeline.encode_prompt`` builds it: ``encoder_hidden_states`` T5's last hidden states
(``max_sequence_length`` tokens, 512 by default), ``pooled_projections`` CLIP's pooled output, ``txt_ids`` zeros
``[L, 3]``. A phrase supervises its T5 positions (:func:`tcompose.data.token_offsets.t5_phrase_positions`). Latents:
``(z - shift_factor) * scaling_factor``, noised unpacked, packed 2 x 2 into tokens with their ``img_ids`` for the
transformer, whose prediction is unpacked (diffusers' ``train_dreambooth_lora_flux.py``). FLUX.1-dev embeds the
guidance scale (``guidance_embeds``): training feeds ``--guidance-scale`` (3.5, diffusers' default), and sampling
runs no unconditional pass. Capture: double-stream blocks ``double_{i}`` and single-stream ``single_{i}``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from ...data.text import tokenize_captions
from ...data.token_offsets import t5_input_ids, t5_phrase_positions
from ...grounding.flow_matching import FlowMatchingObjective, pack_latents
from ..components import TextEncoderMismatchError, clip_text_from_pretrained
from ..loading import quiet_logger, tf_dtype_kwargs
from .base import Components
from .sd3 import StableDiffusion3

FLUX_DEFAULT_SIDE = 128  # FluxPipeline's default_sample_size: latents of 128 x 128, 1024 px


class Flux(StableDiffusion3):
    name = "flux"
    label = "FLUX.1"
    pipeline_class_name = "FluxPipeline"
    card_tags = ("flux", "flux-diffusers")
    objective = FlowMatchingObjective(packed=True)
    classifier_free_guidance = False  # FLUX.1-dev's guidance is an input of the transformer
    default_guidance = 3.5  # FLUX.1-dev's model card (50 steps)
    default_max_sequence_length = 512  # FluxPipeline's
    denoiser_class_name = "FluxTransformer2DModel"
    unsupported_training = tuple(o for o in StableDiffusion3.unsupported_training if o != "--guidance-scale")
    text_subfolders = ("text_encoder_2", "tokenizer_2")

    def load_text(self, comps: Components, source: str, hub: dict, dtype: torch.dtype) -> None:
        """CLIP (its pooled output), T5 and their tokenizers."""
        from transformers import T5EncoderModel, T5TokenizerFast

        comps.text_encoder = clip_text_from_pretrained(source, subfolder="text_encoder", **hub, **tf_dtype_kwargs(dtype))
        with quiet_logger("transformers.modeling_utils"):
            comps.text_encoder_2 = T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2", use_safetensors=True,
                                                                  **hub, **tf_dtype_kwargs(dtype))
        comps.tokenizer_2 = T5TokenizerFast.from_pretrained(source, subfolder="tokenizer_2", **hub)

    def check_components(self, comps: Components) -> None:
        config = comps.unet.config
        clip, t5 = comps.text_encoder.config.hidden_size, comps.text_encoder_2.config.d_model
        if clip != config.pooled_projection_dim or t5 != config.joint_attention_dim:
            raise TextEncoderMismatchError(
                f"the text encoders (CLIP width {clip}, T5 width {t5}) cannot condition this transformer "
                f"(pooled_projection_dim {config.pooled_projection_dim}, joint_attention_dim "
                f"{config.joint_attention_dim}); load the model's own")

    # -- training -------------------------------------------------------------------------------------------
    def configure_objective(self, denoiser_config: dict, settings: dict):
        """Packed latents; the guidance value (``guidance_scale``, 3.5 by default) only for a transformer that
        embeds guidance (FLUX.1-dev; schnell does not)."""
        base = super().configure_objective(denoiser_config, settings)
        guidance = settings.get("guidance_scale", 3.5) if denoiser_config.get("guidance_embeds") else None
        return replace(base, packed=True, guidance=guidance)

    def native_resolution(self, denoiser_config: dict, vae_factor: int) -> int:
        return FLUX_DEFAULT_SIDE * vae_factor

    def resolution_note(self, denoiser_config: dict, vae_factor: int) -> str:
        return f"FluxPipeline's default latent side {FLUX_DEFAULT_SIDE} x {vae_factor}"

    def latent_channels(self, denoiser_config: dict) -> int:
        return int(denoiser_config["in_channels"]) // 4

    def sampling_defaults(self, denoiser_config: dict) -> tuple[int, float]:
        """FLUX.1-dev's card (50 steps, guidance 3.5: embedded) for a transformer with a guidance embedding,
        FLUX.1-schnell's (4 steps, no guidance) for one without."""
        return (50, 3.5) if denoiser_config.get("guidance_embeds") else (4, 0.0)

    def latent_multiple(self, denoiser_config: dict) -> int:
        return 2 * int(denoiser_config.get("patch_size") or 1)

    # -- text -----------------------------------------------------------------------------------------------
    def tokenize(self, comps: Components, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": tokenize_captions(comps.tokenizer, captions),
                "input_ids_2": t5_input_ids(comps.tokenizer_2, captions, self.sequence_length(comps))}

    def phrase_positions(self, comps: Components, caption: str, phrases: Sequence[str]) -> list[list[int] | None]:
        return t5_phrase_positions(comps.tokenizer_2, caption, phrases, self.sequence_length(comps))

    def caption_states(self, comps: Components, batch: dict) -> dict[str, torch.Tensor]:
        """``encoder_hidden_states`` (T5) and ``pooled_projections`` (CLIP's pooled output), as
        ``FluxPipeline.encode_prompt``."""
        pooled = comps.text_encoder(batch["input_ids"], output_hidden_states=False).pooler_output
        emb = comps.text_encoder_2(batch["input_ids_2"], output_hidden_states=False)[0]
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}

    def conditioning(self, comps: Components, states: dict[str, torch.Tensor], batch: dict) -> dict:
        """The states and ``txt_ids``: zeros ``[L, 3]`` in the text's dtype (FluxPipeline's, in the text encoder's)."""
        emb = states["encoder_hidden_states"]
        return {**states, "txt_ids": torch.zeros(emb.shape[1], 3, device=emb.device, dtype=states["pooled_projections"].dtype)}

    def example_conditioning(self, denoiser_config: dict, batch: int, latent_side: int, text_length: int,
                             generator: torch.Generator) -> dict:
        cond = super().example_conditioning(denoiser_config, batch, latent_side, text_length, generator)
        return cond | {"txt_ids": torch.zeros(text_length, 3)}

    # -- inference ------------------------------------------------------------------------------------------
    def pipeline_latents(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        return pack_latents(latents)

    def pipeline(self, comps: Components, scheduler, safety_checker=None, feature_extractor=None,
                 options: dict | None = None):
        if safety_checker is not None:
            return super().pipeline(comps, scheduler, safety_checker)  # refused there
        return self.pipeline_class()(
            transformer=comps.unet, scheduler=scheduler, vae=comps.vae, text_encoder=comps.text_encoder,
            tokenizer=comps.tokenizer, text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2)

    def encode_prompts(self, pipe, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        emb, pooled, _ = pipe.encode_prompt(prompts, prompts, device=pipe._execution_device, num_images_per_prompt=1)
        return [{"prompt_embeds": e, "pooled_prompt_embeds": p} for e, p in zip(emb.unbind(0), pooled.unbind(0))]
