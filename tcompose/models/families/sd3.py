"""SD3 / SD3.5: an MMDiT (``SD3Transformer2DModel``) conditioned on two CLIP text encoders and T5, trained by flow
matching; 1024 px.

A folder holds ``transformer/``, ``vae/``, ``text_encoder/`` and ``text_encoder_2/`` (``CLIPTextModelWithProjection``:
CLIP-L, OpenCLIP bigG), ``text_encoder_3/`` (``T5EncoderModel``), ``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/``
(T5's fast tokenizer: phrase positions come from its character offsets) and ``scheduler/``
(``FlowMatchEulerDiscreteScheduler``): what ``StableDiffusion3Pipeline.save_pretrained`` writes.

Text, exactly as ``StableDiffusion3Pipeline.encode_prompt`` builds it: both CLIP encoders' penultimate hidden states
side by side (``[B, 77, 768 + 1280]``), zero-padded to T5's width, followed by T5's last hidden states
(``max_sequence_length`` tokens, 256 by default): ``encoder_hidden_states [B, 77 + L, 4096]``; the two pooled
projections side by side are ``pooled_projections``. A phrase supervises its CLIP positions and its T5 positions
shifted by 77 (:func:`tcompose.data.token_offsets.sd3_phrase_positions`, ``which="both"``). Latents:
``(z - shift_factor) * scaling_factor`` of the VAE's sample, as diffusers' SD3 training scripts take them. Training
and capture: :class:`tcompose.grounding.flow_matching.FlowMatchingObjective` with joint-attention blocks
``joint_{i}``. The text encoders stay the model's own (``--text-encoder`` is refused).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ...data.token_offsets import sd3_phrase_positions, t5_input_ids
from ...grounding.flow_matching import FlowMatchingObjective
from ...io.errors import UserError
from ..components import TextEncoderMismatchError
from ..loading import ModelFolderError, quiet_logger, tf_dtype_kwargs
from .base import Components, ModelFamily
from .sd import vae_latents
from .sdxl import two_clip_ids

#: The default LoRA targets of the transformers: both streams' attention projections (diffusers' SD3 / FLUX scripts').
TRANSFORMER_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class StableDiffusion3(ModelFamily):
    name = "sd3"
    label = "SD3 / SD3.5"
    pipeline_class_name = "StableDiffusion3Pipeline"
    card_tags = ("sd3", "sd3-diffusers")
    denoiser_subfolder = "transformer"
    denoiser_label = "transformer"
    takes_schedulers = False  # flow matching: FlowMatchEulerDiscreteScheduler, the model's own
    attention_kind = "joint attention (image to text)"
    objective = FlowMatchingObjective()
    default_guidance = 4.5  # SD3.5-medium's model card (40 steps)
    default_max_sequence_length = 256  # StableDiffusion3Pipeline's
    lora_targets = TRANSFORMER_LORA_TARGETS
    cache_text_by_default = True  # T5-XXL alone is 9.5 GB in bf16: encode the captions once and free it
    unsupported_training = ("--snr-gamma", "--prediction-type", "--noise-offset", "--channels-last", "--compile",
                            "--text-encoder", "--guidance-scale")  # SD3 embeds no guidance
    training_kind = "flow-matching transformer"
    denoiser_class_name = "SD3Transformer2DModel"
    text_subfolders = ("text_encoder_2", "text_encoder_3", "tokenizer_2", "tokenizer_3")

    def matches(self, denoiser_config: dict) -> bool:
        return denoiser_config.get("_class_name") == self.denoiser_class_name

    # -- loading --------------------------------------------------------------------------------------------
    def load(self, source: str, hub: dict, local: bool, dtype: torch.dtype, swap_vae: bool = False,
             swap_text_encoder: bool = False) -> Components:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from transformers import CLIPTokenizer

        if swap_text_encoder:
            raise UserError(f"--text-encoder swaps SD1.x / SD2.x's one text encoder; a {self.label} model's text "
                            "encoders stay its own")
        if local:
            from pathlib import Path

            missing = [s for s in (self.denoiser_subfolder, *self.text_subfolders) if not (Path(source) / s).is_dir()]
            if missing:
                raise ModelFolderError(f"{source} has a {self.label} transformer but no "
                                       f"{', '.join(s + '/' for s in missing)}: pass a folder written by "
                                       f"`{self.pipeline_class_name}.save_pretrained`")
        weights = {"use_safetensors": True, **hub}
        if dtype != torch.float32:
            weights["torch_dtype"] = dtype
        transformer = self.load_denoiser(source, self.denoiser_subfolder, dtype, **hub)
        vae = None if swap_vae else AutoencoderKL.from_pretrained(source, subfolder="vae", **weights)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **hub)
        comps = Components(family=self, unet=transformer, vae=vae, text_encoder=None,
                           tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub),
                           noise_scheduler=scheduler,
                           training_objective=self.configure_objective(dict(transformer.config), {}))
        self.load_text(comps, source, hub, dtype)
        return comps

    def load_text(self, comps: Components, source: str, hub: dict, dtype: torch.dtype) -> None:
        """The two CLIP encoders with projection, T5 and their tokenizers."""
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        kw = {"use_safetensors": True, **hub, **tf_dtype_kwargs(dtype)}
        with quiet_logger("transformers.modeling_utils"):
            comps.text_encoder = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder", **kw)
            comps.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **kw)
            comps.text_encoder_3 = T5EncoderModel.from_pretrained(source, subfolder="text_encoder_3", **kw)
        comps.tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **hub)
        comps.tokenizer_3 = T5TokenizerFast.from_pretrained(source, subfolder="tokenizer_3", **hub)

    #: (steps, guidance) of each known model's card (SD3 / SD3.5 on the Hub; FLUX in flux.py)
    CARD_SAMPLING = {"SD3-medium": (28, 7.0), "SD3.5-medium": (40, 4.5), "SD3.5-large": (28, 3.5)}

    def sampling_defaults(self, denoiser_config: dict) -> tuple[int, float]:
        """The model card's steps and guidance of the known model of this depth (SD3.5-medium's otherwise)."""
        from ...grounding.joint_attention import known_joint_model

        return self.CARD_SAMPLING.get(known_joint_model(denoiser_config), (40, 4.5))

    def denoiser_calls(self, pipe, steps: int) -> int:
        """One transformer evaluation per step (FlowMatchEulerDiscreteScheduler; FLUX's timesteps also depend on
        the image size through its shift, never their number)."""
        return steps

    def load_denoiser(self, folder: str, subfolder: str | None, dtype: torch.dtype, **hub):
        import diffusers

        kw = {"torch_dtype": dtype} if dtype != torch.float32 else {}
        cls = getattr(diffusers, self.denoiser_class_name)
        return cls.from_pretrained(folder, subfolder=subfolder, use_safetensors=True, **hub, **kw)

    def swap_text_encoder(self, comps: Components, text_encoder: Any, dtype: torch.dtype,
                          local_files_only: bool | None) -> None:
        raise UserError(f"--text-encoder: a {self.label} model's text encoders stay its own")

    def check_components(self, comps: Components) -> None:
        config = comps.unet.config
        clip = comps.text_encoder.config.projection_dim + comps.text_encoder_2.config.projection_dim
        if clip != config.pooled_projection_dim or comps.text_encoder_3.config.d_model != config.joint_attention_dim:
            raise TextEncoderMismatchError(
                f"the text encoders (pooled width {clip}, T5 width {comps.text_encoder_3.config.d_model}) cannot "
                f"condition this transformer (pooled_projection_dim {config.pooled_projection_dim}, "
                f"joint_attention_dim {config.joint_attention_dim}); load the model's own")

    # -- training -------------------------------------------------------------------------------------------
    def configure_objective(self, denoiser_config: dict, settings: dict):
        keys = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "attention_norm")
        return FlowMatchingObjective(**{k: settings[k] for k in keys if k in settings})

    def latent_multiple(self, denoiser_config: dict) -> int:
        return int(denoiser_config.get("patch_size") or 1)

    def sequence_length(self, comps: Components) -> int:
        return comps.max_sequence_length or self.default_max_sequence_length

    # -- text -----------------------------------------------------------------------------------------------
    def tokenize(self, comps: Components, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return two_clip_ids(comps, captions) | {
            "input_ids_3": t5_input_ids(comps.tokenizer_3, captions, self.sequence_length(comps))}

    def phrase_positions(self, comps: Components, caption: str, phrases: Sequence[str]) -> list[list[int] | None]:
        return sd3_phrase_positions(comps.tokenizer, comps.tokenizer_3, caption, phrases, self.sequence_length(comps))

    def caption_states(self, comps: Components, batch: dict) -> dict[str, torch.Tensor]:
        """``encoder_hidden_states`` (CLIP penultimate states x2, zero-padded to T5's width, then T5's) and
        ``pooled_projections`` (the two pooled projections), as ``StableDiffusion3Pipeline.encode_prompt``."""
        first = comps.text_encoder(batch["input_ids"], output_hidden_states=True)
        second = comps.text_encoder_2(batch["input_ids_2"], output_hidden_states=True)
        t5 = comps.text_encoder_3(batch["input_ids_3"])[0]
        clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                "pooled_projections": torch.cat([first.text_embeds, second.text_embeds], dim=-1)}

    def encode_batch(self, comps: Components, batch: dict, sample: bool = True) -> tuple[torch.Tensor, dict]:
        return vae_latents(comps.vae, batch, sample, shift=True), self.encode_text(comps, batch)

    def example_conditioning(self, denoiser_config: dict, batch: int, latent_side: int, text_length: int,
                             generator: torch.Generator) -> dict:
        return {"encoder_hidden_states": torch.randn(batch, text_length, denoiser_config["joint_attention_dim"],
                                                     generator=generator),
                "pooled_projections": torch.randn(batch, denoiser_config["pooled_projection_dim"], generator=generator)}

    # -- inference ------------------------------------------------------------------------------------------
    def default_image_size(self, pipe) -> int:
        return pipe.default_sample_size * pipe.vae_scale_factor

    def pipeline(self, comps: Components, scheduler, safety_checker=None, feature_extractor=None,
                 options: dict | None = None):
        if safety_checker is not None:
            raise UserError(f"--safety-checker on: {self.label} pipelines have no safety checker; use --safety-checker off")
        return self.pipeline_class()(
            transformer=comps.unet, scheduler=scheduler, vae=comps.vae, text_encoder=comps.text_encoder,
            tokenizer=comps.tokenizer, text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2,
            text_encoder_3=comps.text_encoder_3, tokenizer_3=comps.tokenizer_3)

    def encode_prompts(self, pipe, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        emb, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=pipe._execution_device,
                                               num_images_per_prompt=1, do_classifier_free_guidance=False)
        return [{"prompt_embeds": e, "pooled_prompt_embeds": p} for e, p in zip(emb.unbind(0), pooled.unbind(0))]

    def negative_embeddings(self, pipe, empty: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The empty prompt's embeddings (the pipeline's own negative prompt by default)."""
        return {"negative_prompt_embeds": empty["prompt_embeds"],
                "negative_pooled_prompt_embeds": empty["pooled_prompt_embeds"]}
