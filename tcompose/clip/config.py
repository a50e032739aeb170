"""The settings of ``tcompose train-clip``, their checks, and the part of them a resume must keep."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..io.errors import UserError
from ..io.runs import dataset_fingerprint, finite_or_raise, model_id
from ..io.trainer import check_report_to
from ..models.defaults import CLIP
from ..models.precision import TF32_DEFAULT

#: What train-clip writes into OUT besides checkpoints/, logs/ and training_summary.json (--overwrite removes them).
OUTPUTS = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
           "special_tokens_map.json", "preprocessor_config.json", "text_encoder", "tokenizer", "eval.json", "eval.png",
           "README.md")

LR_SCHEDULERS = ("cosine", "constant")


@dataclass
class TrainClipConfig:
    """Settings of ``tcompose train-clip``; defaults are CLIP's finetuning recipe (see the module docstring)."""

    data: Path  # crops dataset folder (tcompose crops)
    output: Path
    model: str = CLIP  # hub id or local CLIPModel folder
    revision: str | None = None
    batch_size: int = 64  # per process; the contrastive batch is batch_size x processes
    grad_accum: int = 1
    epochs: float = 1.0  # used when max_steps is None
    max_steps: int | None = None  # optimizer steps; overrides epochs
    lr: float = 1e-5
    lr_scheduler: str = "cosine"  # cosine: linear warmup, then cosine decay to 0 at the last step
    warmup_steps: int = 100
    weight_decay: float = 0.1  # not on norms, biases, logit_scale, embeddings (tcompose.clip.towers.no_decay)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    max_grad_norm: float = 1.0  # 0: no clipping
    learn_temperature: bool = True  # logit_scale learnt (clamped at ln 100) or fixed at the model's value
    dedupe_labels: bool = True  # crops of one category are positives of each other, not negatives
    lock_vision: bool = False
    lock_text: bool = False
    unlocked_text_layers: int = 0  # with lock_text: the last N text layers (+ final norm, projection) still learn
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    checkpoints_limit: int | None = 3  # a ViT-L/14 checkpoint (CLIPModel + AdamW state, fp32) is ~5 GB
    resume: str | None = None  # latest | checkpoint folder
    overwrite: bool = False  # delete the run already in `output` (checkpoints, model, logs) and start again
    eval_fraction: float = 0.05  # share of images whose crops are held out (0: no evaluation)
    eval_max_examples: int = 5000  # held-out crops at most
    num_workers: int = 4
    log_every: int = 10
    report_to: str = "tensorboard"  # tensorboard | wandb | all | none (accelerate's trackers)
    push_to_hub: bool = False  # upload OUT (not checkpoints/) with its model card when training ends
    hub_model_id: str | None = None  # the Hub repo of --push-to-hub (default: the output folder's name)
    command: str | None = None  # the command line that started the run (the CLI fills it; the model card shows it)
    allow_tf32: bool = TF32_DEFAULT  # --tf32/--no-tf32: TF32 matmuls and convolutions on CUDA (models.precision)
    progress: bool = True

    def validate(self) -> None:
        """Every check that needs no model and no data."""
        finite_or_raise({"--epochs": self.epochs, "--lr": self.lr, "--weight-decay": self.weight_decay,
                         "--max-grad-norm": self.max_grad_norm, "--eval-fraction": self.eval_fraction,
                         "adam_beta1": self.adam_beta1, "adam_beta2": self.adam_beta2, "adam_epsilon": self.adam_epsilon})
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise UserError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise UserError(f"--epochs must be > 0, got {self.epochs}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise UserError("--lr must be > 0, --warmup-steps and --weight-decay >= 0")
        if self.unlocked_text_layers and not self.lock_text:
            raise UserError("--unlocked-text-layers only applies with --lock-text")
        if self.max_grad_norm < 0 or self.log_every < 1 or self.checkpoint_every < 0:
            raise UserError("--max-grad-norm and --checkpoint-every must be >= 0, --log-every >= 1")
        if self.checkpoints_limit is not None and self.checkpoints_limit < 1:
            raise UserError(f"--checkpoints-limit must be >= 1, got {self.checkpoints_limit}")
        if self.resume is not None and self.overwrite:
            raise UserError("--resume and --overwrite exclude each other: --resume continues the run in --output, "
                            "--overwrite deletes it and starts again")
        check_report_to(self.report_to)  # an unknown tracker, or wandb asked for and not installed

    def check_contrastive_batch(self, world_size: int) -> None:
        """InfoNCE needs negatives: at least 2 pairs in the contrastive batch (--batch-size x processes)."""
        if self.batch_size * world_size < 2:
            raise UserError(f"--batch-size {self.batch_size} x {world_size} process(es) = a contrastive batch of "
                            f"{self.batch_size * world_size}: InfoNCE has no negatives then and its loss is 0; "
                            "use --batch-size 2 or more (CLIP's recipe: 64 per process)")


def config_dict(cfg: TrainClipConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))


def resume_settings(cfg: TrainClipConfig, world_size: int, total_steps: int) -> dict:
    """Every setting that changes what is trained, keyed by its option (a resume must match them): the data,
    the model, the contrastive batch (--batch-size x processes) and data order, the schedule's length and
    shape, the optimizer, what is locked, the loss. --num-workers, logging (--log-every, --report-to), progress and
    --push-to-hub / --hub-model-id may change."""
    return {
        "--data": dataset_fingerprint(cfg.data), "--model": model_id(cfg.model), "--revision": cfg.revision,
        "--batch-size x processes": cfg.batch_size * world_size, "--grad-accum": cfg.grad_accum, "--seed": cfg.seed,
        "steps (--max-steps or --epochs)": total_steps, "--lr": cfg.lr, "--lr-scheduler": cfg.lr_scheduler,
        "--warmup-steps": cfg.warmup_steps, "--weight-decay": cfg.weight_decay,
        "adam_betas_eps": [cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon], "--max-grad-norm": cfg.max_grad_norm,
        "--learn-temperature": cfg.learn_temperature, "--dedupe-labels": cfg.dedupe_labels,
        "--lock-vision": cfg.lock_vision, "--lock-text": cfg.lock_text, "--unlocked-text-layers": cfg.unlocked_text_layers,
        "--mixed-precision": cfg.mixed_precision, "--eval-fraction": cfg.eval_fraction,
        "--eval-max-examples": cfg.eval_max_examples,
    }
