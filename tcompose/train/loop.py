"""TokenCompose finetuning of a Stable Diffusion UNet: L_LDM + lambda * L_token + gamma * L_pixel.

Runbook (the reference recipe is the default: lr 5e-6 constant, AdamW wd 1e-2, clip 1, batch 1 x 4,
24,000 steps, lambda 1e-3, gamma 5e-5, layers mid+up):

    # one GPU, SD1.4, masks from COCO
    tcompose masks COCO_DIR --source coco-gt --split train2017 --output data/coco-gt
    tcompose train-unet --data data/coco-gt --model CompVis/stable-diffusion-v1-4 --output runs/tc \\
        --mixed-precision bf16 --batch-size 4 --grad-accum 1

    # 8 GPUs on one node (global batch = batch-size x 8 x grad-accum)
    accelerate launch --multi_gpu --num_processes 8 -m tcompose train-unet --data data/coco-gt \\
        --model CompVis/stable-diffusion-v1-4 --output runs/tc --mixed-precision bf16 --batch-size 4 --grad-accum 1

    # 2 nodes x 8 GPUs: the same on each node, with --num_machines 2 --machine_rank {0,1}
    #   --main_process_ip HOST --main_process_port 29500 --num_processes 16

    # continue after a kill
    tcompose train-unet ... --resume latest

    # GPU fast path: bf16, VAE latents encoded once (OUT/latent_cache/), channels_last, compiled ResNet/FF blocks
    tcompose train-unet ... --mixed-precision bf16 --cache-latents --channels-last --compile

OUT ends as a diffusers pipeline folder (``StableDiffusionPipeline.from_pretrained(OUT)``) with
``training_summary.json``, ``checkpoints/`` and tensorboard ``logs/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..models.defaults import BASE_MODEL

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclass
class TrainUnetConfig:
    """Settings of ``tcompose train-unet``; defaults are the TokenCompose reference recipe."""

    data: Path  # masks dataset folder (tcompose masks)
    output: Path
    model: str = BASE_MODEL  # hub id or local diffusers folder
    revision: str | None = None
    text_encoder: str | None = None  # another CLIP text model (hub id or folder) to use and save
    lambda_token: float = 1e-3
    gamma_pixel: float = 5e-5
    layers: tuple[str, ...] = ("mid", "up")  # blocks or groups (mid_8, up_16, ...) whose maps are supervised
    resolution: int = 512
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
    checkpoints_limit: int | None = None
    resume: str | None = None  # latest | checkpoint folder
    eval_fraction: float = 0.05  # share of images held out for the grounding score
    eval_max_examples: int = 64
    eval_timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)
    random_flip: bool = False  # flips image and masks together; captions saying left/right become wrong
    cache_latents: bool = False  # encode each image once into OUT/latent_cache/ (tcompose.train.latent_cache)
    channels_last: bool = False  # UNet weights and the latents in torch.channels_last
    compile: bool = False  # torch.compile the UNet's ResNet blocks and feed-forwards (tcompose.models.compile)
    num_workers: int = 4
    log_every: int = 10
    allow_tf32: bool = True
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "resolution"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.resolution % 8:
            raise ValueError(f"--resolution must be a multiple of 8, got {self.resolution}")
        if self.lambda_token < 0 or self.gamma_pixel < 0:
            raise ValueError("--lambda and --gamma must be >= 0")
        from ..grounding.attention import parse_layers

        parse_layers(self.layers)  # a typo fails here, before any model or data is loaded


def config_dict(cfg: TrainUnetConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # resident set, KiB on Linux


def _quiet_loading() -> None:
    """No per-file progress bars from diffusers / transformers while loading weights (ours is enough)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train-unet"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.description}"), disable=not enabled, transient=False,
    )


def run(cfg: TrainUnetConfig) -> dict:
    """Train, checkpoint, score grounding before and after, and write the pipeline to ``cfg.output``."""
    cfg.validate()
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from torch.utils.data import DataLoader

    from ..grounding.objective import encode_batch, tokencompose_losses
    from ..grounding.score import grounding_score
    from ..io.batches import MicroBatches
    from ..io.checkpoints import load_checkpoint, resolve_resume, save_checkpoint
    from ..io.datasets import check_columns, load_manifest, write_json_atomic
    from ..models.stable_diffusion import load_components
    from .examples import TrainingExamples, collate, prepare_rows, split_heldout

    load_manifest(cfg.data)  # bad data fails before any model is loaded
    check_columns(cfg.data, "masks")
    _quiet_loading()
    out = Path(cfg.output)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # several CPU processes (tests, CPU clusters) then talk over gloo
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    device, main = accelerator.device, accelerator.is_main_process
    log = accelerator.print
    if cfg.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)

    comps = load_components(cfg.model, revision=cfg.revision, text_encoder=cfg.text_encoder)
    unet, vae, text_encoder, tokenizer, noise_scheduler = comps.unet, comps.vae, comps.text_encoder, comps.tokenizer, comps.noise_scheduler
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
        frozen.to(device)
        if weight_dtype != torch.float32:
            frozen.to(dtype=weight_dtype)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    unet.train()

    prep = prepare_rows(cfg.data, tokenizer)
    train_rows, heldout = split_heldout(prep, cfg.eval_fraction, cfg.seed, cfg.eval_max_examples)
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (unet.config.in_channels, cfg.resolution // down, cfg.resolution // down)
    n_t = noise_scheduler.config.num_train_timesteps
    cache = None
    if cfg.cache_latents:
        from .latent_cache import prepare_latent_cache

        cache = prepare_latent_cache(out / "latent_cache", prep, vae, cfg.resolution, cfg.random_flip,
                                     accelerator.process_index, accelerator.num_processes,
                                     accelerator.wait_for_everyone, main and cfg.progress, log, cfg.num_workers)
    examples = TrainingExamples(prep, cfg.resolution, latent_shape, n_t, cfg.seed, cfg.random_flip, latents=cache)
    eval_examples = TrainingExamples(prep, cfg.resolution, latent_shape, n_t, cfg.seed, random_flip=False)
    log(f"data: {len(train_rows)} training rows, {len(heldout)} held out; {prep.stats}")

    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
    )
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps)
    ema = None
    if cfg.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, model_cls=type(unet), model_config=unet.config)
        ema.to(device)
    unet, optimizer = accelerator.prepare(unet, optimizer)  # the sampler shards data itself; see MicroBatches

    ckpt_root = out / "checkpoints"
    # what decides which examples each step sees (MicroBatches): a resume must keep it to continue the same run
    data_order = {"global_micro_batch": cfg.batch_size * accelerator.num_processes, "grad_accum": cfg.grad_accum,
                  "seed": cfg.seed}
    step, before = 0, None
    resume_path = resolve_resume(cfg.resume, ckpt_root)
    if resume_path is not None:
        state = load_checkpoint(resume_path, accelerator.unwrap_model(unet), optimizer, lr_scheduler, ema, accelerator.scaler)
        _check_data_order(state["extra"].get("data_order"), data_order, resume_path)
        step, before = state["step"], state["extra"].get("grounding_before")
        log(f"resumed from {resume_path} at step {step}")
    elif cfg.resume == "latest":
        log(f"no checkpoint under {ckpt_root}: starting from step 0")

    def evaluate() -> dict | None:
        if not heldout:
            return None
        batches = (collate([eval_examples[(r, 0)] for r in heldout[i : i + cfg.batch_size]]) for i in range(0, len(heldout), cfg.batch_size))
        with accelerator.autocast():
            return grounding_score(accelerator.unwrap_model(unet), vae, text_encoder, noise_scheduler, batches,
                                   cfg.layers, cfg.eval_timesteps, seed=cfg.seed, weight_dtype=weight_dtype)

    if before is None and main:
        before = evaluate()
        if before:
            log(f"grounding score before: {before['score']:.4f} (chance {before['chance']:.4f})")
    accelerator.wait_for_everyone()

    if main:
        accelerator.init_trackers("train_unet", config={k: v for k, v in config_dict(cfg).items() if isinstance(v, (int, float, str, bool))})
    sampler = MicroBatches(train_rows, cfg.batch_size, accelerator.num_processes, accelerator.process_index, cfg.seed,
                           start=step * cfg.grad_accum, stop=cfg.max_steps * cfg.grad_accum)
    loader = DataLoader(examples, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)

    if cfg.compile:  # after the "before" score: evaluation runs eager (no extra no-grad graphs to compile)
        from ..models.compile import compile_regions

        n = compile_regions(accelerator.unwrap_model(unet))
        log(f"compile: {n} UNet regions (ResNet blocks, feed-forwards) compile on the first steps")
    keys = ("ldm", "token", "pixel", "total")
    sums = {k: torch.zeros((), device=device) for k in keys}
    n_micro, last = 0, {}
    start_step, t0 = step, time.perf_counter()
    with _progress(main and cfg.progress) as bar:
        task = bar.add_task("", total=cfg.max_steps, completed=step)
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with accelerator.accumulate(unet):
                latents, emb = encode_batch(vae, text_encoder, batch, weight_dtype)
                if cfg.channels_last:
                    latents = latents.contiguous(memory_format=torch.channels_last)
                    batch["noise"] = batch["noise"].contiguous(memory_format=torch.channels_last)
                losses = tokencompose_losses(unet, latents, emb, batch, noise_scheduler, cfg.layers,
                                             cfg.lambda_token, cfg.gamma_pixel, backward=accelerator.backward)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k in keys:
                sums[k] += losses[k].detach().float()
            n_micro += 1
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:
                lr_scheduler.step()
            if ema is not None:
                ema.step(unet.parameters())
            step += 1
            bar.update(task, advance=1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                means = accelerator.reduce(torch.stack([sums[k] for k in keys]) / n_micro, reduction="mean")
                last = {k: float(v) for k, v in zip(keys, means.tolist())}
                accelerator.log({f"loss/{k}": v for k, v in last.items()} | {"lr": lr_scheduler.get_last_lr()[0]}, step=step)
                bar.update(task, description=" ".join(f"{k} {v:.4g}" for k, v in last.items()))
                sums = {k: torch.zeros((), device=device) for k in keys}
                n_micro = 0
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                if main:
                    save_checkpoint(ckpt_root, step, accelerator.unwrap_model(unet), optimizer, lr_scheduler, ema,
                                    accelerator.scaler, cfg.checkpoints_limit, extra={"grounding_before": before, "data_order": data_order})
                accelerator.wait_for_everyone()
            if step >= cfg.max_steps:
                break
    train_s = time.perf_counter() - t0
    if cfg.compile:
        from ..models.compile import uncompile_regions

        uncompile_regions(accelerator.unwrap_model(unet))
    accelerator.wait_for_everyone()
    in_sync = _ranks_in_sync(accelerator, unet)

    summary = None
    if main:
        trained = accelerator.unwrap_model(unet)
        save_checkpoint(ckpt_root, step, trained, optimizer, lr_scheduler, ema, accelerator.scaler,
                        cfg.checkpoints_limit, extra={"grounding_before": before, "data_order": data_order})
        if ema is not None:
            ema.copy_to(trained.parameters())  # the pipeline and the "after" score use the EMA weights
        if cfg.channels_last:
            trained.to(memory_format=torch.contiguous_format)  # safetensors saves contiguous tensors only
        after = evaluate()
        if after:
            log(f"grounding score after: {after['score']:.4f} (before {before['score']:.4f}, chance {after['chance']:.4f})")
        _save_pipeline(cfg, trained, tokenizer, out)
        steps_run = step - start_step
        summary = {
            "steps": step,
            "steps_this_run": steps_run,
            "final_losses": last,
            "train_seconds": train_s,
            "images_per_s": steps_run * cfg.grad_accum * cfg.batch_size * accelerator.num_processes / train_s if train_s > 0 else None,
            "peak_memory_mb": _peak_memory_mb(device),
            "device": str(device),
            "num_processes": accelerator.num_processes,
            "ranks_in_sync": in_sync,
            "grounding_before": before,
            "grounding_after": after,
            "data": prep.stats | {"train_rows": len(train_rows), "heldout_rows": len(heldout)},
            "latent_cache": {"path": str(cache.root), "images": len(cache), "dtype": cache.dtype} if cache else None,
            "phrases_dropped": prep.dropped[:100],
            "config": config_dict(cfg),
        }
        write_json_atomic(out / "training_summary.json", summary)
        log(f"wrote {out} (pipeline, training_summary.json, checkpoints/, logs/)")
    accelerator.wait_for_everyone()  # no process leaves while the main one still writes
    accelerator.end_training()
    return summary or {}


def _check_data_order(saved: dict | None, now: dict, path: Path) -> None:
    """Refuse a resume whose batch layout or seed would make the steps after it see other examples."""
    if saved is None or saved == now:  # checkpoints older than this check carry no data order
        return
    raise ValueError(
        f"{path} was written with --batch-size x processes = {saved['global_micro_batch']}, --grad-accum "
        f"{saved['grad_accum']}, --seed {saved['seed']}; this run has {now['global_micro_batch']}, "
        f"{now['grad_accum']}, {now['seed']}, so it would not continue the same run. Resume with the same "
        "settings (processes may change if --batch-size x processes stays equal), or train into a new --output"
    )


def _ranks_in_sync(accelerator, unet) -> bool:
    """Whether every process ends with bit-identical UNet weights (checksums gathered); warns when not."""
    if accelerator.num_processes == 1:
        return True
    with torch.no_grad():
        checksum = torch.stack([p.detach().double().sum() for p in unet.parameters()]).sum().reshape(1)
    sums = accelerator.gather(checksum.to(accelerator.device)).tolist()
    if len(set(sums)) > 1:
        accelerator.print(f"warning: UNet weights differ between processes (checksums {sums})")
        return False
    return True


def _save_pipeline(cfg: TrainUnetConfig, unet, tokenizer, out: Path) -> None:
    """The base pipeline with the trained UNet (and the swapped text encoder), reloaded in float32 and saved."""
    from diffusers import StableDiffusionPipeline

    from ..models.stable_diffusion import load_text_encoder

    parts = {"unet": unet}
    if cfg.text_encoder:
        parts["text_encoder"], parts["tokenizer"] = load_text_encoder(cfg.text_encoder, base_tokenizer=tokenizer)
    pipe = StableDiffusionPipeline.from_pretrained(cfg.model, revision=cfg.revision, **parts)  # float32, the default
    pipe.save_pretrained(out, safe_serialization=True)
