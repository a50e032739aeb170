"""The settings of ``tcompose train-unet``, their checks, and the part of them a resume must keep."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io.errors import UserError
from ..grounding.attention import parse_layers
from ..grounding.flow_matching import WEIGHTING_SCHEMES
from ..grounding.joint_attention import NORMS, parse_joint_layers
from ..grounding.losses import MAP_REDUCTIONS
from ..io.runs import dataset_fingerprint, finite_or_raise, model_id
from ..models.defaults import BASE_MODEL
from ..models.precision import TF32_DEFAULT

PREDICTION_TYPES = ("epsilon", "v_prediction")
OPTIMIZERS = ("adamw", "adamw8bit")
QUANTIZE_BASE = ("nf4", "int8")
REPORT_TO = ("tensorboard", "wandb", "all", "none")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
#: Schedules whose learning rate does not depend on --max-steps: a resume may extend such a run.
FLAT_SCHEDULERS = ("constant", "constant_with_warmup")
#: What train-unet writes into OUT besides checkpoints/, logs/ and training_summary.json (--overwrite removes them).
OUTPUTS = ("model_index.json", "unet", "transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2",
           "tokenizer_2", "text_encoder_3", "tokenizer_3", "scheduler", "safety_checker", "feature_extractor", "image_encoder", "pytorch_lora_weights.safetensors",
           "tcompose_lora.json", "fused", "validation", "README.md")


@dataclass
class TrainUnetConfig:
    """Settings of ``tcompose train-unet``; defaults are the TokenCompose reference recipe."""

    data: Path  # masks dataset folder (tcompose masks)
    output: Path
    model: str = BASE_MODEL  # hub id or local diffusers folder
    revision: str | None = None
    text_encoder: str | None = None  # another CLIP text model (hub id or folder) to use and save
    vae: str | None = None  # another VAE to encode with (and save), e.g. SDXL's fp16-safe madebyollin/sdxl-vae-fp16-fix
    lambda_token: float = 1e-3
    gamma_pixel: float = 5e-5
    # blocks or groups whose maps are supervised (mid_8, up_16, ...; joint_7, double_11, ...); None: the family's
    # default (mid + up for the UNets, the published blocks of a known transformer, else its middle third)
    layers: tuple[str, ...] | None = None
    map_reduction: str = "sum"  # a group's token loss: sum over its maps (the reference's) or their mean
    lora_rank: int | None = None  # train LoRA adapters of this rank instead of the whole UNet
    lora_alpha: float | None = None  # LoRA scale alpha / rank; None: alpha = rank
    lora_targets: tuple[str, ...] | None = None  # None: the family's (attention projections; SD3 / FLUX: both streams')
    fuse: bool = False  # LoRA: also write OUT/fused/, a full pipeline with the adapters merged
    resolution: int | None = None  # None: the model's own (UNet sample size x the VAE's factor; 512 for SD1.x)
    batch_size: int = 1  # per process
    grad_accum: int = 4
    max_steps: int = 24_000  # optimizer steps
    lr: float = 5e-6
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    seed: int = 0
    use_ema: bool = False
    ema_decay: float = 0.9999
    checkpoint_every: int = 1000
    checkpoints_limit: int | None = 3  # an SD1.4 checkpoint (UNet + AdamW state, fp32) is ~9.7 GB
    resume: str | None = None  # latest | checkpoint folder
    overwrite: bool = False  # delete the run already in `output` (checkpoints, pipeline, logs) and start again
    eval_fraction: float = 0.05  # share of images held out for the grounding score
    eval_max_examples: int = 64
    eval_timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)
    random_flip: bool = False  # flips image and masks together; captions saying left/right become wrong
    noise_offset: float = 0.0  # diffusers' --noise_offset: noise += offset * randn(C, 1, 1) per example (0: off)
    prediction_type: str | None = None  # epsilon | v_prediction: overrides the scheduler's (None: the model's)
    max_train_samples: int | None = None  # train on the first N training rows after the held-out split
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    report_to: str = "tensorboard"  # tensorboard | wandb | all | none
    push_to_hub: bool = False  # upload the pipeline or LoRA with its model card when training ends
    hub_model_id: str | None = None  # the Hub repo of --push-to-hub (default: the output folder's name)
    snr_gamma: float | None = None  # Min-SNR-gamma weighting of L_LDM (diffusers' --snr_gamma; 5.0 is usual)
    validation_prompts: tuple[str, ...] = ()  # images + per-noun attention every validation_every steps
    validation_every: int = 0  # steps between validation grids (0: only after the last step)
    validation_steps: int = 25  # denoising steps of a validation image
    command: str | None = None  # the command line that started the run (the CLI fills it; the model card shows it)
    cache_latents: bool = False  # encode each image once into OUT/latent_cache/ (tcompose.train.latent_cache)
    cache_text: bool | None = None  # captions encoded once into OUT/text_cache/, encoders freed (None: the family's)
    channels_last: bool = False  # UNet weights and the latents in torch.channels_last
    compile: bool = False  # torch.compile the UNet's ResNet blocks and feed-forwards (tcompose.models.compile)
    num_workers: int = 4
    log_every: int = 10
    allow_tf32: bool = TF32_DEFAULT  # --tf32/--no-tf32: TF32 matmuls and convolutions on CUDA (models.precision)
    progress: bool = True
    # SD3 / FLUX (flow matching; refused for the UNets when set)
    weighting_scheme: str = "logit_normal"  # timestep density and loss weighting (diffusers' --weighting_scheme)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float = 3.5  # the guidance value fed to a transformer that embeds it (FLUX.1-dev)
    attention_norm: str = "text"  # text: softmax over the text keys; joint: the slice of the joint softmax
    max_sequence_length: int | None = None  # T5 tokens (None: the pipeline's, SD3 256, FLUX 512)
    quantize_base: str | None = None  # nf4 | int8: the frozen base of a LoRA run quantized by bitsandbytes
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Every check that needs no model and no data: a bad option fails at once."""
        finite_or_raise({"--lambda": self.lambda_token, "--gamma": self.gamma_pixel, "--lr": self.lr,
                         "--lora-alpha": self.lora_alpha, "--snr-gamma": self.snr_gamma,
                         "--noise-offset": self.noise_offset, "--adam-weight-decay": self.adam_weight_decay, "--max-grad-norm": self.max_grad_norm,
                         "--ema-decay": self.ema_decay, "--eval-fraction": self.eval_fraction,
                         "adam_beta1": self.adam_beta1, "adam_beta2": self.adam_beta2, "adam_epsilon": self.adam_epsilon})
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise UserError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise UserError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if self.lambda_token < 0 or self.gamma_pixel < 0:
            raise UserError("--lambda and --gamma must be >= 0")
        if self.lr <= 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")
        if self.max_grad_norm < 0 or self.adam_weight_decay < 0 or self.lr_warmup_steps < 0:
            raise UserError("--max-grad-norm, --adam-weight-decay and --lr-warmup-steps must be >= 0")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise UserError(f"--ema-decay must be in [0, 1], got {self.ema_decay}")
        if self.checkpoint_every < 0 or (self.checkpoints_limit is not None and self.checkpoints_limit < 1):
            raise UserError("--checkpoint-every must be >= 0 and --checkpoints-limit >= 1")
        if self.resume is not None and self.overwrite:
            raise UserError("--resume and --overwrite exclude each other: --resume continues the run in --output, "
                            "--overwrite deletes it and starts again")
        if self.map_reduction not in MAP_REDUCTIONS:
            raise UserError(f"--map-reduction must be one of {', '.join(MAP_REDUCTIONS)}, got {self.map_reduction!r}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise UserError(f"--lora-rank must be >= 1, got {self.lora_rank}")
        if self.lora_rank is None and (self.fuse or self.lora_alpha is not None):
            raise UserError("--lora-alpha and --fuse go with --lora-rank")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise UserError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if self.lora_targets is not None and not self.lora_targets:
            raise UserError("--lora-targets names no module")
        finite_or_raise({"--logit-mean": self.logit_mean, "--logit-std": self.logit_std,
                         "--mode-scale": self.mode_scale, "--guidance-scale": self.guidance_scale})
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise UserError(f"--weighting-scheme must be one of {', '.join(WEIGHTING_SCHEMES)}, got {self.weighting_scheme!r}")
        if self.logit_std <= 0 or self.guidance_scale < 0:
            raise UserError("--logit-std must be > 0 and --guidance-scale >= 0")
        if self.attention_norm not in NORMS:
            raise UserError(f"--attention-norm must be one of {', '.join(NORMS)}, got {self.attention_norm!r}")
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise UserError(f"--max-sequence-length must be >= 1, got {self.max_sequence_length}")
        if self.quantize_base not in (None, *QUANTIZE_BASE):
            raise UserError(f"--quantize-base must be one of {', '.join(QUANTIZE_BASE)}, got {self.quantize_base!r}")
        if self.quantize_base and not self.lora_rank:
            raise UserError("--quantize-base goes with --lora-rank: a quantized base stays frozen, only LoRA adapters train")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise UserError(f"--snr-gamma must be > 0 (or left out), got {self.snr_gamma}")
        if self.validation_every < 0 or self.validation_steps < 1:
            raise UserError("--validation-every must be >= 0 and --validation-steps >= 1")
        if self.validation_every and not self.validation_prompts:
            raise UserError("--validation-every needs at least one --validation-prompt")
        if any(not p.strip() for p in self.validation_prompts):
            raise UserError("--validation-prompt: an empty prompt")
        if self.noise_offset < 0:
            raise UserError(f"--noise-offset must be >= 0, got {self.noise_offset}")
        if self.prediction_type not in (None, *PREDICTION_TYPES):
            raise UserError(f"--prediction-type must be one of {', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise UserError(f"--max-train-samples must be >= 1, got {self.max_train_samples}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.report_to not in REPORT_TO:
            raise UserError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        if self.layers is not None:  # a typo fails here, before any model or data is loaded
            check_layer_names(self.layers)


def check_layer_names(layers: tuple[str, ...]) -> None:
    """UserError unless every ``--layers`` name is a UNet block or group (mid, up_16) or a transformer block (joint_7,
    double_11-12, single); whether the model has it is checked against its config later."""
    for name in layers:
        try:
            parse_layers((name,))
        except UserError:
            try:
                parse_joint_layers(name)
            except UserError:
                raise UserError(f"--layers {name!r}: unknown layer selection; use down, mid, up or a group like up_16 "
                                "(UNets), or a block such as joint_7, double_11, single_3, a range such as joint_4-9, "
                                "or joint / double / single (SD3, FLUX)") from None


#: The options a model family may refuse (:attr:`tcompose.models.families.ModelFamily.unsupported_training`), each
#: with the config field it sets.
FAMILY_OPTIONS = {"--snr-gamma": "snr_gamma", "--prediction-type": "prediction_type", "--noise-offset": "noise_offset",
                  "--channels-last": "channels_last", "--compile": "compile", "--text-encoder": "text_encoder",
                  "--cache-latents": "cache_latents", "--weighting-scheme": "weighting_scheme",
                  "--logit-mean": "logit_mean", "--logit-std": "logit_std", "--mode-scale": "mode_scale",
                  "--guidance-scale": "guidance_scale", "--attention-norm": "attention_norm",
                  "--max-sequence-length": "max_sequence_length", "--quantize-base": "quantize_base"}


def options_set(cfg: TrainUnetConfig) -> list[str]:
    """The options of :data:`FAMILY_OPTIONS` that ``cfg`` sets to other than their default."""
    defaults = TrainUnetConfig(data=Path(), output=Path())
    return [flag for flag, name in FAMILY_OPTIONS.items() if getattr(cfg, name) != getattr(defaults, name)]


def objective_settings(cfg: TrainUnetConfig) -> dict:
    """The settings a model family's training objective takes (:meth:`ModelFamily.configure_objective`)."""
    return {"weighting_scheme": cfg.weighting_scheme, "logit_mean": cfg.logit_mean, "logit_std": cfg.logit_std,
            "mode_scale": cfg.mode_scale, "guidance_scale": cfg.guidance_scale, "attention_norm": cfg.attention_norm}


def config_dict(cfg: TrainUnetConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))


def resume_settings(cfg: TrainUnetConfig, resolution: int, world_size: int) -> dict:
    """Every setting that changes what is trained, keyed by its option: a checkpoint records them and a resume
    must match (``cfg.layers`` and ``cfg.lora_targets`` resolved to the family's defaults first; the number of
    processes may change if --batch-size x processes stays the same; --num-workers,
    logging, progress, --cache-latents, --cache-text, --channels-last and --compile do not change the result)."""
    return {
        "--data": dataset_fingerprint(cfg.data),
        "--model": model_id(cfg.model), "--revision": cfg.revision, "--text-encoder": model_id(cfg.text_encoder),
        "--vae": model_id(cfg.vae), "--lambda": cfg.lambda_token, "--gamma": cfg.gamma_pixel,
        "--layers": list(cfg.layers) if cfg.layers is not None else None, "--map-reduction": cfg.map_reduction, "--lora-rank": cfg.lora_rank,
        "--lora-alpha": cfg.lora_alpha, "--lora-targets": list(cfg.lora_targets or ()) if cfg.lora_rank else None,
        "--resolution": resolution, "--random-flip": cfg.random_flip, "--snr-gamma": cfg.snr_gamma,
        "--batch-size x processes": cfg.batch_size * world_size, "--grad-accum": cfg.grad_accum, "--seed": cfg.seed,
        "--max-steps": cfg.max_steps, "--lr": cfg.lr, "--lr-scheduler": cfg.lr_scheduler,
        "--lr-warmup-steps": cfg.lr_warmup_steps, "--adam-weight-decay": cfg.adam_weight_decay,
        "adam_betas_eps": [cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon], "--max-grad-norm": cfg.max_grad_norm,
        "--mixed-precision": cfg.mixed_precision, "--use-ema": cfg.use_ema, "--ema-decay": cfg.ema_decay,
        "--eval-fraction": cfg.eval_fraction, "--eval-max-examples": cfg.eval_max_examples,
        "--eval-timesteps": list(cfg.eval_timesteps),
    } | _when_set(cfg)


#: Settings added after checkpoints began recording settings, with their defaults: recorded only when set
#: (:func:`_when_set`), so a checkpoint that does not record one trained with its default.
ADDED_SETTINGS = {"--noise-offset": ("noise_offset", 0.0), "--prediction-type": ("prediction_type", None),
                  "--max-train-samples": ("max_train_samples", None), "--optimizer": ("optimizer", "adamw"),
                  "--weighting-scheme": ("weighting_scheme", "logit_normal"), "--logit-mean": ("logit_mean", 0.0),
                  "--logit-std": ("logit_std", 1.0), "--mode-scale": ("mode_scale", 1.29),
                  "--guidance-scale": ("guidance_scale", 3.5), "--attention-norm": ("attention_norm", "text"),
                  "--max-sequence-length": ("max_sequence_length", None), "--quantize-base": ("quantize_base", None)}
#: What a setting of :data:`ADDED_SETTINGS` that a checkpoint (or this run) does not record stands for.
ADDED_DEFAULTS = {flag: default for flag, (_, default) in ADDED_SETTINGS.items()}


def _when_set(cfg: TrainUnetConfig) -> dict:
    """The settings added later, recorded only when they differ from their default: a checkpoint written before
    they existed (which trained with the default) still resumes, and one that set them refuses another value."""
    values = {flag: getattr(cfg, field) for flag, (field, _) in ADDED_SETTINGS.items()}
    return {flag: value for flag, value in values.items() if value != ADDED_DEFAULTS[flag]}


def may_differ_on_resume(cfg: TrainUnetConfig) -> tuple[str, ...]:
    """Settings a resume may change: --max-steps, when the learning rate does not depend on it."""
    return ("--max-steps",) if cfg.lr_scheduler in FLAT_SCHEDULERS else ()
