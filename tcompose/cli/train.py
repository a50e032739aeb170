"""Training stages: `train-unet` (TokenCompose) and `train-clip` (contrastive CLIP on crops)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..models import defaults
from ._app import ARGV, _friendly, _ints, _split, app, tf32_option


def _command() -> str:
    """The command line as the user typed it (for the model card)."""
    import shlex

    return "tcompose " + shlex.join(ARGV)


@app.command("train-unet")
@_friendly
def train_unet(
    data: Path = typer.Option(..., help="Masks dataset folder (from `tcompose masks`)."),
    output: Path = typer.Option(..., "--output", "-o", help="Run folder: pipeline, checkpoints/, logs/, training_summary.json."),
    model: str = typer.Option(defaults.BASE_MODEL, help="Base model: hub id or local diffusers folder (SD1.x / SD2.x, SDXL, SD3 / SD3.5, FLUX.1)."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the base model."),
    text_encoder: Optional[str] = typer.Option(None, help="Another CLIP text model (hub id or folder) to use as SD's text encoder."),
    vae: Optional[str] = typer.Option(None, help="Another VAE (hub id or folder) to encode with and save, e.g. madebyollin/sdxl-vae-fp16-fix."),
    lambda_token: float = typer.Option(1e-3, "--lambda", help="Weight of the token loss."),
    gamma_pixel: float = typer.Option(5e-5, "--gamma", help="Weight of the pixel loss."),
    layers: Optional[str] = typer.Option(None, help="Supervised attention: UNet blocks (down, mid, up) or groups (mid_8, up_16, ...), default mid,up; SD3 / FLUX blocks (joint_7, double_11, single_3, ranges joint_4-9), default the model's published blocks (printed at start)."),
    map_reduction: str = typer.Option("sum", help="A group's token loss over its maps: sum (the reference's) or mean."),
    lora_rank: Optional[int] = typer.Option(None, help="Train LoRA adapters of this rank instead of the whole denoiser."),
    lora_alpha: Optional[float] = typer.Option(None, help="LoRA scale alpha / rank (default: alpha = rank)."),
    lora_targets: Optional[str] = typer.Option(None, help="Modules that get LoRA adapters (default to_q,to_k,to_v,to_out.0; SD3 / FLUX also add_q_proj,add_k_proj,add_v_proj,to_add_out)."),
    fuse: bool = typer.Option(False, "--fuse", help="LoRA: also write OUT/fused/, a pipeline with the adapters merged."),
    resolution: Optional[int] = typer.Option(None, help="Training resolution (default: the model's own, 512 for SD1.x, 768 for SD2.1-768); shorter side resized to it, then the centre crop."),
    batch_size: int = typer.Option(1, help="Examples per process per micro-step."),
    grad_accum: int = typer.Option(4, help="Micro-steps per optimizer step."),
    max_steps: int = typer.Option(24_000, help="Optimizer steps."),
    lr: float = typer.Option(5e-6, help="Learning rate."),
    lr_scheduler: str = typer.Option("constant", help="constant, constant_with_warmup, linear or cosine."),
    lr_warmup_steps: int = typer.Option(0, help="Warmup steps of the lr schedule."),
    adam_weight_decay: float = typer.Option(1e-2, help="AdamW weight decay."),
    max_grad_norm: float = typer.Option(1.0, help="Gradient clipping norm (0: off)."),
    mixed_precision: str = typer.Option("no", help="no, fp16 or bf16."),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute UNet activations in backward to save memory."),
    seed: int = typer.Option(0, help="Seed of data order, noise and timesteps."),
    use_ema: bool = typer.Option(False, help="Keep an EMA of the UNet weights and save it as the pipeline's UNet."),
    ema_decay: float = typer.Option(0.9999, help="EMA decay."),
    checkpoint_every: int = typer.Option(1000, help="Save a resumable checkpoint every N steps (0: only at the end)."),
    checkpoints_limit: int = typer.Option(3, help="Keep only the newest K checkpoints (SD1.4: ~9.7 GB each, UNet + AdamW state)."),
    resume: Optional[str] = typer.Option(None, help="'latest' or a checkpoint folder: continue exactly where it stopped."),
    overwrite: bool = typer.Option(False, "--overwrite", help="OUT already holds a run: delete its checkpoints, pipeline and logs, and start again."),
    eval_fraction: float = typer.Option(0.05, help="Share of images held out for the grounding score (0: none)."),
    eval_max_examples: int = typer.Option(64, help="At most this many held-out examples are scored."),
    eval_timesteps: str = typer.Option("100,300,500,700,900", help="Timesteps at which the grounding score is measured."),
    random_flip: bool = typer.Option(False, help="Flip image and masks together (captions saying left/right become wrong)."),
    snr_gamma: Optional[float] = typer.Option(None, help="Min-SNR-gamma weighting of the denoising loss (5.0 is usual; off by default)."),
    noise_offset: float = typer.Option(0.0, help="diffusers' noise offset: each example's noise += offset x randn(C, 1, 1) (0.05-0.1 usual; 0: off)."),
    prediction_type: Optional[str] = typer.Option(None, help="epsilon or v_prediction: the target trained towards, overriding the model scheduler's (saved into the pipeline's scheduler)."),
    max_train_samples: Optional[int] = typer.Option(None, help="Train on the first N training rows after the held-out split (quick runs, debugging)."),
    optimizer: str = typer.Option("adamw", help="adamw, or adamw8bit (bitsandbytes' 8-bit AdamW: pip install 'tcompose[bnb]')."),
    report_to: str = typer.Option("tensorboard", help="Where losses and validation grids go: tensorboard (OUT/logs), wandb (pip install wandb), all or none."),
    push_to_hub: bool = typer.Option(False, "--push-to-hub", help="Upload the pipeline or LoRA adapters with their model card to the Hugging Face Hub when training ends (checked before training: online, a token)."),
    hub_model_id: Optional[str] = typer.Option(None, help="The Hub repo of --push-to-hub, e.g. you/tc-sd14 (default: the --output folder's name)."),
    validation_prompt: Optional[list[str]] = typer.Option(None, help="A prompt drawn with its nouns' attention at each validation (repeatable)."),
    validation_every: int = typer.Option(0, help="Steps between validation grids (0: only after the last step)."),
    validation_steps: int = typer.Option(25, help="Denoising steps of a validation image."),
    cache_latents: bool = typer.Option(False, "--cache-latents", help="Encode each image once with the frozen VAE into OUT/latent_cache/ and train from it (no VAE encode per step); reused on --resume and reruns, rebuilt when data, VAE, resolution or precision change."),
    cache_text: Optional[bool] = typer.Option(None, "--cache-text/--no-cache-text", help="Encode each caption once with the frozen text encoders into OUT/text_cache/, then free the encoders for the rest of the run (default: on for SD3 / FLUX, whose T5 is 9.5 GB; off for the UNets); reused on --resume and reruns, rebuilt when the captions, tokenizers, --max-sequence-length or encoder weights change."),
    channels_last: bool = typer.Option(False, "--channels-last", help="UNet weights and latents in torch.channels_last (faster convolutions on recent GPUs under bf16/fp16)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the UNet's ResNet blocks and feed-forwards (attention stays eager); compiling costs minutes at the start."),
    num_workers: int = typer.Option(4, help="Data loader worker processes."),
    log_every: int = typer.Option(10, help="Log losses every N steps."),
    weighting_scheme: str = typer.Option("logit_normal", help="SD3 / FLUX: timestep density and loss weighting: logit_normal, mode, cosmap, sigma_sqrt or none (diffusers' SD3 / FLUX scripts)."),
    logit_mean: float = typer.Option(0.0, help="SD3 / FLUX: mean of the logit-normal timestep density."),
    logit_std: float = typer.Option(1.0, help="SD3 / FLUX: std of the logit-normal timestep density."),
    mode_scale: float = typer.Option(1.29, help="SD3 / FLUX: scale of the 'mode' timestep density."),
    guidance_scale: float = typer.Option(3.5, help="FLUX.1-dev: the guidance value fed to the transformer in training (it embeds guidance)."),
    attention_norm: str = typer.Option("text", help="SD3 / FLUX: text (softmax over the text keys, as UNet cross-attention) or joint (the slice of the joint softmax)."),
    max_sequence_length: Optional[int] = typer.Option(None, help="SD3 / FLUX: T5 prompt tokens (default: the pipeline's, SD3 256, FLUX 512)."),
    quantize_base: Optional[str] = typer.Option(None, help="SD3 / FLUX LoRA: the frozen base's block linears in nf4 or int8 (bitsandbytes)."),
    tf32: bool = tf32_option(),
) -> None:
    """TokenCompose finetuning of the denoiser of any family (the UNet of SD1.x / SD2.x / SDXL, the transformer of
    SD3 / SD3.5 / FLUX.1): L_LDM + lambda * L_token + gamma * L_pixel on its text attention."""
    from ..train.config import TrainUnetConfig
    from ..train.loop import run

    cfg = TrainUnetConfig(
        data=data, output=output, model=model, revision=revision, text_encoder=text_encoder, vae=vae,
        lambda_token=lambda_token, gamma_pixel=gamma_pixel, layers=_split(layers) if layers is not None else None,
        map_reduction=map_reduction, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_targets=_split(lora_targets) if lora_targets is not None else None, fuse=fuse, resolution=resolution,
        batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps, lr=lr, lr_scheduler=lr_scheduler,
        lr_warmup_steps=lr_warmup_steps, adam_weight_decay=adam_weight_decay, max_grad_norm=max_grad_norm,
        mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, seed=seed, use_ema=use_ema,
        ema_decay=ema_decay, checkpoint_every=checkpoint_every, checkpoints_limit=checkpoints_limit, resume=resume,
        overwrite=overwrite, eval_fraction=eval_fraction, eval_max_examples=eval_max_examples,
        eval_timesteps=_ints(eval_timesteps, "--eval-timesteps"), random_flip=random_flip, snr_gamma=snr_gamma,
        noise_offset=noise_offset, prediction_type=prediction_type, max_train_samples=max_train_samples,
        optimizer=optimizer, report_to=report_to, push_to_hub=push_to_hub, hub_model_id=hub_model_id,
        validation_prompts=tuple(validation_prompt or ()), validation_every=validation_every,
        validation_steps=validation_steps, command=_command(),
        cache_latents=cache_latents, cache_text=cache_text, channels_last=channels_last, compile=compile,
        num_workers=num_workers, log_every=log_every, allow_tf32=tf32, weighting_scheme=weighting_scheme,
        logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale, guidance_scale=guidance_scale,
        attention_norm=attention_norm, max_sequence_length=max_sequence_length, quantize_base=quantize_base,
    )
    run(cfg)


@app.command("train-clip")
@_friendly
def train_clip(
    data: Path = typer.Option(..., help="Crops dataset folder (from `tcompose crops`)."),
    output: Path = typer.Option(..., "--output", "-o", help="Run folder: CLIPModel, text_encoder/, tokenizer/, eval.json, checkpoints/."),
    model: str = typer.Option(defaults.CLIP, help="CLIP to finetune: hub id or local CLIPModel folder."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the model."),
    batch_size: int = typer.Option(64, help="Crops per process per micro-step; negatives come from all processes."),
    grad_accum: int = typer.Option(1, help="Micro-steps per optimizer step (does not enlarge the contrastive batch)."),
    epochs: float = typer.Option(1.0, help="Passes over the training crops (ignored with --max-steps)."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps; overrides --epochs."),
    lr: float = typer.Option(1e-5, help="Peak learning rate."),
    lr_scheduler: str = typer.Option("cosine", help="cosine (warmup, then cosine decay to 0) or constant (after warmup)."),
    warmup_steps: int = typer.Option(100, help="Linear warmup steps."),
    weight_decay: float = typer.Option(0.1, help="AdamW weight decay on weight matrices (not norms, biases, embeddings, logit_scale)."),
    max_grad_norm: float = typer.Option(1.0, help="Gradient clipping norm (0: off)."),
    learn_temperature: bool = typer.Option(True, "--learn-temperature/--fixed-temperature", help="Learn logit_scale (clamped at 100) or keep the model's."),
    dedupe_labels: bool = typer.Option(True, "--dedupe-labels/--no-dedupe-labels", help="Crops of one category are positives of each other (supervised contrastive), not negatives."),
    lock_vision: bool = typer.Option(False, help="Freeze the vision tower and its projection."),
    lock_text: bool = typer.Option(False, help="Freeze the text tower and its projection."),
    unlocked_text_layers: int = typer.Option(0, help="With --lock-text: the last N text layers (+ final norm, projection) still learn."),
    mixed_precision: str = typer.Option("no", help="no, fp16 or bf16."),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute transformer layers in backward to save memory."),
    seed: int = typer.Option(0, help="Seed of the data order and the held-out split."),
    checkpoint_every: int = typer.Option(500, help="Save a resumable checkpoint every N steps (0: only at the end)."),
    checkpoints_limit: int = typer.Option(3, help="Keep only the newest K checkpoints (ViT-L/14: ~5 GB each, model + AdamW state)."),
    resume: Optional[str] = typer.Option(None, help="'latest' or a checkpoint folder: continue exactly where it stopped."),
    overwrite: bool = typer.Option(False, "--overwrite", help="OUT already holds a run: delete its checkpoints, model and logs, and start again."),
    eval_fraction: float = typer.Option(0.05, help="Share of images whose crops are held out for evaluation (0: none)."),
    eval_max_examples: int = typer.Option(5000, help="At most this many held-out crops."),
    num_workers: int = typer.Option(4, help="Data loader worker processes."),
    log_every: int = typer.Option(10, help="Log the loss every N steps."),
    report_to: str = typer.Option("tensorboard", help="Where the loss, lr and held-out scores go: tensorboard (OUT/logs), wandb (pip install wandb), all or none."),
    push_to_hub: bool = typer.Option(False, "--push-to-hub", help="Upload the CLIPModel, text_encoder/ and tokenizer/ with their model card to the Hugging Face Hub when training ends (checked before training: online, a token)."),
    hub_model_id: Optional[str] = typer.Option(None, help="The Hub repo of --push-to-hub, e.g. you/clip-crops (default: the --output folder's name)."),
    tf32: bool = tf32_option(),
) -> None:
    """Contrastive (InfoNCE) finetuning of CLIP on object crops; its text tower then serves as SD's text encoder."""
    from ..clip.config import TrainClipConfig
    from ..clip.loop import run

    cfg = TrainClipConfig(
        data=data, output=output, model=model, revision=revision, batch_size=batch_size, grad_accum=grad_accum,
        epochs=epochs, max_steps=max_steps, lr=lr, lr_scheduler=lr_scheduler, warmup_steps=warmup_steps,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, learn_temperature=learn_temperature,
        dedupe_labels=dedupe_labels, lock_vision=lock_vision, lock_text=lock_text,
        unlocked_text_layers=unlocked_text_layers, mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing, seed=seed, checkpoint_every=checkpoint_every,
        checkpoints_limit=checkpoints_limit, resume=resume, overwrite=overwrite, eval_fraction=eval_fraction,
        eval_max_examples=eval_max_examples, num_workers=num_workers, log_every=log_every, report_to=report_to,
        push_to_hub=push_to_hub, hub_model_id=hub_model_id, command=_command(), allow_tf32=tf32,
    )
    run(cfg)
