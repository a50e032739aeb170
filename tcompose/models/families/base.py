"""The model-family interface: what the stages may ask of a model, whatever its family, and the loaded parts.

A family (SD1.x / SD2.x, SDXL, SD3 / SD3.5, FLUX.1) is one subclass of :class:`ModelFamily` in its own module of
this package, registered in ``__init__.py``. Stages never test which family they hold: they load
:class:`Components` (whose methods forward to the family) and call them.

    comps = load_components("CompVis/stable-diffusion-v1-4")        # tcompose.models.families
    ids = comps.tokenize(captions)                                   # {"input_ids": [N, 77], ...}
    positions = comps.phrase_positions(caption, ["cat", "wine glass"])
    latents, cond = comps.encode_batch(batch)                        # cond: the denoiser's keyword arguments
    losses = tokencompose_losses(comps.unet, latents, cond, batch, comps.noise_scheduler, layers, ...,
                                 objective=comps.objective)          # training inputs, weighting, capture
    pipe = comps.pipeline(scheduler)                                 # diffusers' pipeline of the family
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ...grounding.objective import UNET

#: The batch-key prefix of cached caption states (``text_state.encoder_hidden_states``, ...): --cache-text's.
TEXT_STATE = "text_state."


class ModelFamily:
    """One family of text-to-image models: how to load, condition, train, capture and sample it.

    Subclasses set the class attributes and implement the methods; the base class implements nothing of a
    particular model. ``objective`` is the denoiser's training and capture (:class:`tcompose.grounding.objective
    .UNetObjective` for the UNets): a family whose denoiser trains or attends otherwise brings its own.
    """

    name: str = ""  # recorded in training summaries and LoRA metadata ("sd", "sdxl")
    label: str = ""  # for people ("SD1.x / SD2.x")
    pipeline_class_name: str = ""  # diffusers' inference pipeline of the family
    card_tags: tuple[str, ...] = ()  # Hub model-card tags
    denoiser_subfolder: str = "unet"  # also the pipeline's attribute and keyword of the denoiser, and its LoRA prefix
    denoiser_label: str = "UNet"
    attention_kind: str = "cross-attention"  # what the grounding losses supervise, for the log
    objective = UNET
    has_safety_checker: bool = False
    supports_attend_excite: bool = False  # Attend-and-Excite's sampler conditions the denoiser with text alone
    takes_schedulers: bool = True  # generation's --scheduler pndm|ddim|euler|dpm++ (DDPM-trained models only)
    classifier_free_guidance: bool = True  # sampling runs an unconditional pass (FLUX.1-dev embeds guidance instead)
    default_guidance: float = 7.5  # guidance scale of validation images
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # default --lora-targets
    cache_text_by_default: bool = False  # train-unet's --cache-text when not given (on where the encoders are large)
    #: train-unet options this family's training does not take (refused, before any weight is read, when set)
    unsupported_training: tuple[str, ...] = ("--weighting-scheme", "--logit-mean", "--logit-std", "--mode-scale",
                                             "--guidance-scale", "--attention-norm", "--max-sequence-length",
                                             "--quantize-base")
    training_kind: str = "DDPM-trained UNet"

    # -- recognising and loading ------------------------------------------------------------------------------
    def matches(self, denoiser_config: dict) -> bool:
        """Whether a model whose denoiser has this config (``unet/config.json``) is of this family."""
        raise NotImplementedError

    def load(self, source: str, hub: dict, local: bool, dtype: torch.dtype, swap_vae: bool = False,
             swap_text_encoder: bool = False) -> "Components":
        """The family's components from ``source`` (a folder or hub id, already checked), ``hub`` the revision /
        ``local_files_only`` keywords. ``swap_vae`` / ``swap_text_encoder``: the caller puts another VAE / (first)
        text encoder in place (:func:`load_components`), so these are not loaded; a family that cannot take the
        swap refuses it here, before any weight is read."""
        raise NotImplementedError

    def load_denoiser(self, folder: str, subfolder: str | None, dtype: torch.dtype):
        """A denoiser of this family from a folder (``--unet``), in ``dtype``."""
        raise NotImplementedError

    def swap_text_encoder(self, comps: "Components", text_encoder: Any, dtype: torch.dtype,
                          local_files_only: bool | None) -> None:
        """Put another text encoder (``--text-encoder``: a folder or hub id) in place of the first one."""
        raise NotImplementedError

    def check_components(self, comps: "Components") -> None:
        """Raise TextEncoderMismatchError unless the text encoder(s) can condition the denoiser."""
        raise NotImplementedError

    # -- text -----------------------------------------------------------------------------------------------
    def tokenize(self, comps: "Components", captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids of ``captions`` for every text encoder, as batch keys (``input_ids``, ...)."""
        raise NotImplementedError

    def phrase_positions(self, comps: "Components", caption: str, phrases: Sequence[str]) -> list[list[int] | None]:
        """Each phrase's positions in the text sequence the denoiser attends to (None: not in it)."""
        raise NotImplementedError

    def caption_states(self, comps: "Components", batch: dict) -> dict[str, torch.Tensor]:
        """What the text encoders make of each caption of a batch (from its token ids ``input_ids``, ...): tensors
        ``[B, ...]`` that depend on the caption alone, which ``--cache-text`` stores (:mod:`tcompose.train.text_cache`)."""
        raise NotImplementedError

    def conditioning(self, comps: "Components", states: dict[str, torch.Tensor], batch: dict) -> dict:
        """The denoiser's keyword arguments from a batch's caption states (and what else of the batch it takes,
        such as SDXL's ``time_ids``); the states themselves by default."""
        return dict(states)

    def encode_text(self, comps: "Components", batch: dict) -> dict:
        """The denoiser's text conditioning (its keyword arguments) of a collated batch, without gradients: from the
        batch's cached caption states (keys ``text_state.NAME``) where it carries them, else from the encoders,
        outside any autocast (as the cache computes them: the grounding score, run under autocast, reads the same
        numbers either way)."""
        states = {k.removeprefix(TEXT_STATE): v for k, v in batch.items() if k.startswith(TEXT_STATE)}
        return self.conditioning(comps, states or self.encode_captions(comps, batch), batch)

    def encode_captions(self, comps: "Components", batch: dict) -> dict[str, torch.Tensor]:
        """:meth:`caption_states` without gradients and outside any autocast: what ``--cache-text`` stores and
        :meth:`encode_text` computes alike."""
        device = next(comps.text_encoders[0].parameters()).device
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            return self.caption_states(comps, batch)

    def encode_batch(self, comps: "Components", batch: dict, sample: bool = True) -> tuple[torch.Tensor, dict]:
        """``(clean latents, conditioning)`` of a collated batch: ``sample`` draws the VAE posterior with the batch's
        ``latent_eps`` (training; float32 latents), else takes its mean in the VAE's dtype (the grounding score)."""
        raise NotImplementedError

    def example_conditioning(self, denoiser_config: dict, batch: int, latent_side: int, text_length: int,
                             generator: torch.Generator) -> dict:
        """Random conditioning of the right shapes for a denoiser of this config (the bench's training steps)."""
        raise NotImplementedError

    def attention_groups(self, denoiser_config: dict, latent_hw: tuple[int, int]) -> dict[str, int]:
        """The denoiser's capturable attention groups (name -> number of maps) at ``latent_hw`` latents, from its
        config alone; ``--layers`` names these groups."""
        config = dict(denoiser_config)
        cond = self.example_conditioning(config, 1, latent_hw[0], 77, torch.Generator().manual_seed(0))
        return self.objective.attention_groups(config, latent_hw, cond)

    def configure_objective(self, denoiser_config: dict, settings: dict):
        """The training objective with a run's settings (``--weighting-scheme`` ...; the UNets take none)."""
        return self.objective

    def native_resolution(self, denoiser_config: dict, vae_factor: int) -> int:
        """The model's own training resolution in pixels (its denoiser's sample size x the VAE's factor)."""
        return int(denoiser_config["sample_size"]) * vae_factor

    def resolution_note(self, denoiser_config: dict, vae_factor: int) -> str:
        """Where :meth:`native_resolution` comes from, for the log."""
        return f"sample size {denoiser_config['sample_size']} x {vae_factor}"

    def latent_channels(self, denoiser_config: dict) -> int:
        """Channels of the VAE latents the denoiser takes (before any packing)."""
        return int(denoiser_config["in_channels"])

    def latent_multiple(self, denoiser_config: dict) -> int:
        """What a latent side must be a multiple of (a transformer's patch size, FLUX's 2 x 2 packing)."""
        return 1

    # -- inference ------------------------------------------------------------------------------------------
    def sampling_defaults(self, denoiser_config: dict) -> tuple[int, float]:
        """(steps, guidance) the model's card samples with, where the user gives none (``--steps``, ``--guidance``)."""
        return 50, 7.5

    def denoiser_calls(self, pipe, steps: int) -> int:
        """How many denoiser evaluations a ``steps``-step sampling loop of ``pipe`` makes (a multistep scheduler
        may make more than ``steps``)."""
        pipe.scheduler.set_timesteps(steps)
        return len(pipe.scheduler.timesteps)

    def denoiser_of(self, pipe):
        """A pipeline's denoiser (``pipe.unet``, ``pipe.transformer``)."""
        return getattr(pipe, self.denoiser_subfolder)

    def default_image_size(self, pipe) -> int:
        """The side in pixels a pipeline of this family draws by default."""
        return self.denoiser_of(pipe).config.sample_size * pipe.vae_scale_factor

    def pipeline_latents(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Initial noise ``[B, C, h, w]`` as the pipeline's ``latents`` argument takes it (FLUX packs it)."""
        return latents

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def owns_pipeline(self, pipe) -> bool:
        return isinstance(pipe, self.pipeline_class())

    def pipeline(self, comps: "Components", scheduler, safety_checker=None, feature_extractor=None,
                 options: dict | None = None):
        """The family's diffusers pipeline around ``comps`` (no copies), with ``scheduler``; ``options`` are
        the model's pipeline settings (:meth:`pipeline_options`)."""
        raise NotImplementedError

    def pipeline_options(self, model_index: dict) -> dict:
        """Settings of the pipeline kept in a model's ``model_index.json`` that the pipeline must be built with."""
        return {}

    def encode_prompts(self, pipe, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        """Per prompt, its embeddings as the pipeline's keyword arguments (``prompt_embeds``, ...), unbatched."""
        raise NotImplementedError

    def negative_embeddings(self, pipe, empty: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional embeddings for guidance (``negative_prompt_embeds``, ...) from the empty prompt's."""
        raise NotImplementedError


@dataclass
class Components:
    """The loaded parts of a model and its family; the methods forward to the family.

    ``unet`` is the denoiser (a UNet or a diffusion transformer; ``denoiser`` names it for either),
    ``noise_scheduler`` the training scheduler (from ``scheduler/``: ``DDPMScheduler`` for the UNets,
    ``FlowMatchEulerDiscreteScheduler`` for SD3 / FLUX), ``text_encoder_2`` / ``tokenizer_2`` a second text encoder
    where the family has one (SDXL; FLUX's T5), ``text_encoder_3`` / ``tokenizer_3`` a third (SD3's T5).
    ``max_sequence_length``: the T5 prompt length (SD3 / FLUX; None: the family's default). ``training_objective``:
    the objective a run configured (:meth:`ModelFamily.configure_objective`), else the family's."""

    family: ModelFamily
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    text_encoder_3: Any = None
    tokenizer_3: Any = None
    max_sequence_length: int | None = None
    training_objective: Any = None

    @property
    def denoiser(self):
        return self.unet

    @property
    def objective(self):
        return self.training_objective if self.training_objective is not None else self.family.objective

    @property
    def text_encoders(self) -> list:
        return [t for t in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if t is not None]

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.family.tokenize(self, captions)

    def phrase_positions(self, caption: str, phrases: Sequence[str]) -> list[list[int] | None]:
        return self.family.phrase_positions(self, caption, phrases)

    def encode_text(self, batch: dict) -> dict:
        return self.family.encode_text(self, batch)

    def encode_batch(self, batch: dict, sample: bool = True) -> tuple[torch.Tensor, dict]:
        return self.family.encode_batch(self, batch, sample)

    def attention_groups(self, latent_hw: tuple[int, int]) -> dict[str, int]:
        return self.family.attention_groups(self.unet.config, latent_hw)

    def pipeline(self, scheduler, **kwargs):
        return self.family.pipeline(self, scheduler, **kwargs)
