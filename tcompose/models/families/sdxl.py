"""SDXL: a UNet conditioned on two CLIP text encoders (their penultimate hidden states side by side), the second's
pooled projection and six micro-conditioning ids; DDPM training, 1024 px.

A folder holds, beside SD's subfolders, ``text_encoder_2/`` (``CLIPTextModelWithProjection``, OpenCLIP bigG) and
``tokenizer_2/`` (what ``StableDiffusionXLPipeline.save_pretrained`` writes). Both tokenizers share CLIP's BPE and
differ only in padding, so one set of phrase positions serves both encoders: the captions' ids are checked to
agree up to the end-of-text token. ``time_ids`` per example: original (h, w), the crop's top-left corner, target
(h, w), as diffusers' SDXL pipeline and training script build them. The text encoders stay the model's own
(``--text-encoder`` is refused).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...data.text import tokenize_captions
from ...io.errors import UserError
from ..loading import ModelFolderError, quiet_logger, tf_dtype_kwargs
from .base import Components
from .sd import StableDiffusion


def two_clip_ids(comps: Components, captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``input_ids_2`` of the two CLIP tokenizers (SDXL, SD3), refused unless they split every
    caption alike up to its end-of-text token: the phrase positions of the first must hold for the second."""
    ids = tokenize_captions(comps.tokenizer, captions)
    ids_2 = tokenize_captions(comps.tokenizer_2, captions)
    eos = comps.tokenizer.eos_token_id
    for i in range(ids.shape[0]):
        end = int((ids[i] == eos).nonzero()[0]) + 1 if (ids[i] == eos).any() else ids.shape[1]
        if not torch.equal(ids[i, :end], ids_2[i, :end]):
            raise UserError(f"the two tokenizers split the caption {captions[i]!r} differently, so one set of "
                             "token positions cannot supervise both text encoders; use a model whose tokenizers "
                             "share one BPE")
    return {"input_ids": ids, "input_ids_2": ids_2}


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    label = "SDXL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    card_tags = ("stable-diffusion-xl",)
    has_safety_checker = False
    supports_attend_excite = False  # its denoiser also needs the pooled text and the time ids

    def matches(self, denoiser_config: dict) -> bool:
        return denoiser_config.get("addition_embed_type") == "text_time"

    def load(self, source: str, hub: dict, local: bool, dtype: torch.dtype, swap_vae: bool = False,
             swap_text_encoder: bool = False) -> Components:
        if swap_text_encoder:
            raise UserError("--text-encoder swaps SD1.x / SD2.x's one text encoder; an SDXL model has two (they "
                             "stay the model's own)")
        if local:
            from pathlib import Path

            missing = [s for s in ("text_encoder_2", "tokenizer_2") if not (Path(source) / s).is_dir()]
            if missing:
                raise ModelFolderError(f"{source} has an SDXL UNet but no {', '.join(s + '/' for s in missing)}: pass "
                                       "a folder written by `StableDiffusionXLPipeline.save_pretrained`")
        return super().load(source, hub, local, dtype, swap_vae)

    def load_extra_text(self, comps: Components, source: str, hub: dict, local: bool, dtype: torch.dtype) -> None:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        with quiet_logger("transformers.modeling_utils"):
            comps.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder_2", use_safetensors=True, **hub, **tf_dtype_kwargs(dtype))
        comps.tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **hub)

    # -- text -----------------------------------------------------------------------------------------------
    def tokenize(self, comps: Components, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return two_clip_ids(comps, captions)

    def caption_states(self, comps: Components, batch: dict) -> dict[str, torch.Tensor]:
        """Both encoders' penultimate hidden states concatenated on the feature axis, and the second encoder's
        pooled projection (``text_embeds``)."""
        first = comps.text_encoder(batch["input_ids"], output_hidden_states=True)
        second = comps.text_encoder_2(batch["input_ids_2"], output_hidden_states=True)
        return {"encoder_hidden_states": torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1),
                "text_embeds": second.text_embeds}

    def conditioning(self, comps: Components, states: dict[str, torch.Tensor], batch: dict) -> dict:
        """``encoder_hidden_states`` and ``added_cond_kwargs``: the pooled projection and ``time_ids [B, 6]``."""
        pooled = states["text_embeds"]
        return {"encoder_hidden_states": states["encoder_hidden_states"], "added_cond_kwargs": {
            "text_embeds": pooled, "time_ids": batch["time_ids"].to(pooled.device, pooled.dtype)}}

    def example_conditioning(self, denoiser_config: dict, batch: int, latent_side: int, text_length: int,
                             generator: torch.Generator) -> dict:
        cond = super().example_conditioning(denoiser_config, batch, latent_side, text_length, generator)
        pooled = denoiser_config["projection_class_embeddings_input_dim"] - 6 * denoiser_config["addition_time_embed_dim"]
        px = 8.0 * latent_side
        time_ids = torch.tensor([[px, px, 0.0, 0.0, px, px]]).repeat(batch, 1)
        return {**cond, "added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, generator=generator),
                                              "time_ids": time_ids}}

    # -- inference ------------------------------------------------------------------------------------------
    def pipeline(self, comps: Components, scheduler, safety_checker=None, feature_extractor=None,
                 options: dict | None = None):
        if safety_checker is not None:
            raise UserError("--safety-checker on: SDXL pipelines have no safety checker; use --safety-checker off")
        return self.pipeline_class()(
            vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
            tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=comps.unet, scheduler=scheduler,
            add_watermarker=False, **(options or {}))

    def pipeline_options(self, model_index: dict) -> dict:
        return {"force_zeros_for_empty_prompt": bool(model_index.get("force_zeros_for_empty_prompt", True))}

    def encode_prompts(self, pipe, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        emb, _, pooled, _ = pipe.encode_prompt(prompts, device=pipe._execution_device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
        return [{"prompt_embeds": e, "pooled_prompt_embeds": p} for e, p in zip(emb.unbind(0), pooled.unbind(0))]

    def negative_embeddings(self, pipe, empty: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The empty prompt's, or zeros where the model says ``force_zeros_for_empty_prompt`` (SDXL base does), as
        the pipeline's own call would make them."""
        emb, pooled = empty["prompt_embeds"], empty["pooled_prompt_embeds"]
        if pipe.config.get("force_zeros_for_empty_prompt", True):
            emb, pooled = torch.zeros_like(emb), torch.zeros_like(pooled)
        return {"negative_prompt_embeds": emb, "negative_pooled_prompt_embeds": pooled}
