"""TokenCompose finetuning of a model's denoiser (the UNet of SD1.x / SD2.x / SDXL, the transformer of SD3 / SD3.5
and FLUX.1): L_LDM + lambda * L_token + gamma * L_pixel.

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

What keeps a long run from going silently wrong (:mod:`tcompose.io.runs`): a folder that holds a run is not
trained into without ``--resume latest`` or ``--overwrite``; a resume with other settings or other data is
refused, listing the differences; ``--layers`` is resolved against the UNet before anything trains (an unknown
group is an error listing the model's groups); a NaN or inf loss stops the run, naming the step and the term,
before any checkpoint or pipeline is written from it; SIGTERM, SIGUSR1 and Ctrl-C finish the step, checkpoint it
and say how to continue (:mod:`tcompose.io.preemption`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import torch

from ..io.errors import UserError
from ..io.files import match_umask
from ..io.hub import check_push, hub_repo_id, push_run
from ..io.preemption import StopSignals, ignore_stop_signals
from ..io.runs import FiniteGuard, Interrupted, output_guard, prepare_run_folder, resume_point
from ..io.trainer import (adamw_class, check_report_to, log_validation_images, peak_memory_mb, trainer_accelerator,
                          training_progress)
from .card import CARD, write_model_card
from .config import (
    ADDED_DEFAULTS,
    OUTPUTS,
    TrainUnetConfig,
    config_dict,
    may_differ_on_resume,
    objective_settings,
    options_set,
    resume_settings,
)
from .model_setup import TRAINING_DTYPES, load_for_training, ready_denoiser
from .output import save_lora_outputs, save_pipeline

__all__ = ["TrainUnetConfig", "run"]

LOSS_TERMS = ("ldm", "token", "pixel", "total")


def _quiet_loading() -> None:
    """No per-file progress bars from diffusers / transformers while loading weights (ours is enough)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def data_line(stats: dict, train_rows: int, heldout_rows: int) -> str:
    """The data the run trains on, as a sentence."""
    line = (f"data: {train_rows} training row{'s' if train_rows != 1 else ''}, {heldout_rows} held out for the "
            "grounding score; "
            f"{stats['words_supervised']} of {stats['phrases']} phrases supervised")
    why = [f"{stats[k]} {text}" for k, text in (("phrase_no_mask", "without a mask"),
                                                ("phrase_not_in_tokens", "not found among the caption's tokens"))
           if stats.get(k)]
    return line + (f" ({', '.join(why)})" if why else "")


def run(cfg: TrainUnetConfig) -> dict:
    """Train, checkpoint, score grounding before and after, and write the pipeline to ``cfg.output``."""
    cfg.validate()
    check_report_to(cfg.report_to)  # a missing wandb or bitsandbytes fails before any model or data is read
    adamw_class(cfg.optimizer)
    check_push(cfg.push_to_hub, cfg.hub_model_id)  # offline or without a token: refused before any work
    with output_guard(cfg.output):
        return _train(cfg)


def _train(cfg: TrainUnetConfig) -> dict:
    from accelerate import PartialState
    from diffusers.optimization import get_scheduler
    from torch.utils.data import DataLoader

    from ..grounding.objective import tokencompose_losses
    from ..grounding.score import grounding_score
    from ..io.batches import MicroBatches
    from ..io.checkpoints import save_checkpoint
    from ..io.datasets import check_columns, load_manifest, write_json_atomic
    from ..models.components import model_configs
    from ..models.families import family_of
    from .examples import TrainingExamples, check_batch_fits, collate, prepare_rows, split_heldout

    load_manifest(cfg.data)  # bad data fails before any model is loaded
    check_columns(cfg.data, "masks")
    _quiet_loading()
    out = Path(cfg.output)
    # Every refusal comes before the Accelerator and the weights: the run folder, the model's geometry and
    # --layers (from its configs), and a resume's settings.
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes then form a gloo group (tests)
    world, main = state.num_processes, state.is_main_process
    prepare_run_folder(out, cfg.resume, cfg.overwrite, OUTPUTS, "train-unet", clear=main)
    state.wait_for_everyone()
    unet_config, down = model_configs(cfg.model, cfg.revision)
    family = family_of(unet_config)
    refused = [flag for flag in options_set(cfg) if flag in family.unsupported_training]
    if refused:
        raise UserError(f"{', '.join(refused)}: not used in training a {family.label} model (a {family.training_kind}); "
                        f"leave {'it' if len(refused) == 1 else 'them'} out")
    resolution = cfg.resolution or family.native_resolution(unet_config, down)
    multiple = down * family.latent_multiple(unet_config)
    if resolution % multiple:
        patch = f" x the {family.denoiser_label}'s patch of {multiple // down} latents" if multiple != down else ""
        raise UserError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {down}{patch}")
    latent = resolution // down
    objective = family.configure_objective(unet_config, objective_settings(cfg))
    layers_given = cfg.layers is not None
    cfg = dataclasses.replace(  # the family's defaults, resolved: what the checkpoints and the summary record
        cfg, layers=tuple(cfg.layers) if layers_given else tuple(objective.default_layers(unet_config)),
        lora_targets=tuple(cfg.lora_targets) if cfg.lora_targets is not None else family.lora_targets,
        cache_text=family.cache_text_by_default if cfg.cache_text is None else cfg.cache_text)
    groups = objective.resolve_layers(cfg.layers, family.attention_groups(unet_config, (latent, latent)),
                                      f" at {latent}x{latent} latents ({resolution} px)")
    layers = tuple(groups)
    ckpt_root = out / "checkpoints"
    settings = resume_settings(cfg, resolution, world)
    start = resume_point(cfg.resume, ckpt_root, settings, may_differ_on_resume(cfg), ADDED_DEFAULTS)
    check_batch_fits(cfg.data, cfg.eval_fraction, cfg.seed, cfg.batch_size, world)  # before the logs/ and weights
    if cfg.max_train_samples is not None and cfg.max_train_samples < cfg.batch_size * world:
        raise UserError(f"--max-train-samples {cfg.max_train_samples} is below one batch of --batch-size "
                        f"{cfg.batch_size} x {world} process(es); raise it or lower --batch-size")
    finished = _finished_run(cfg, out, start.path)
    if finished is not None:  # a rerun of a finished run (a job script that always adds --resume latest)
        if main:
            longer = (f"pass a --max-steps above {finished['steps']} with --resume latest"
                      if "--max-steps" in may_differ_on_resume(cfg) else "train into a new --output")
            print(f"train-unet: {out} already finished at step {finished['steps']} (--max-steps {cfg.max_steps}): "
                  "nothing to do; its training_summary.json, model card and weights stay as they were. To train "
                  f"longer, {longer}", file=sys.stderr)
        state.wait_for_everyone()
        return finished

    accelerator = trainer_accelerator(out, cfg.grad_accum, cfg.mixed_precision, cfg.report_to)
    device, log = accelerator.device, accelerator.print
    from ..models.precision import set_tf32

    set_tf32(cfg.allow_tf32, device)  # --tf32/--no-tf32, on by default; on and off alike (CUDA only)
    torch.manual_seed(cfg.seed)
    source = "--resolution" if cfg.resolution else f"the model's own: {family.resolution_note(unet_config, down)}"
    log(f"resolution: {resolution} px ({source}); supervised {family.attention_kind}: {objective.describe(groups)}"
        + ("" if layers_given else " (the default for this model; --layers to choose)"))

    # the accelerator's precision: fp16 on a CPU runs in fp32 (trainer_accelerator notes it)
    weight_dtype = TRAINING_DTYPES[accelerator.mixed_precision]
    comps = load_for_training(cfg, objective, weight_dtype, device, log)
    unet, vae, tokenizer, noise_scheduler = comps.unet, comps.vae, comps.tokenizer, comps.noise_scheduler

    def validation_pipe():
        from .validation import validation_pipeline

        pipe = validation_pipeline(cfg.model, cfg.revision, comps)
        if cfg.prediction_type:
            pipe.scheduler.register_to_config(prediction_type=cfg.prediction_type)
        return pipe

    prep = prepare_rows(cfg.data, comps)
    validation: dict = {"pipe": None, "last": None, "embeddings": None}
    text_cache = None
    if cfg.cache_text:  # before the denoiser is quantized or moved: the encoders' memory is free by then
        from .text_cache import free_text_encoders, prepare_text_cache

        text_cache = prepare_text_cache(out / "text_cache", prep, comps, accelerator.process_index,
                                        accelerator.num_processes, accelerator.wait_for_everyone, main and cfg.progress, log)
        if main and cfg.validation_prompts:  # encoded now, so the grids need no text encoder
            from .validation import validation_embeddings

            validation["pipe"] = validation_pipe()
            with accelerator.autocast():  # as render_validation encodes them when the encoders stay
                validation["embeddings"] = validation_embeddings(validation["pipe"], cfg.validation_prompts,
                                                                 family.default_guidance)
        freed = free_text_encoders(comps, validation["pipe"])
        size = f"{freed / 1e9:.2f} GB" if freed >= 1e8 else f"{freed / 1e6:.1f} MB"
        log(f"text cache: {len(text_cache)} captions in {text_cache.root}; the text encoders are freed "
            f"({size} of weights)")
    trainable = ready_denoiser(cfg, comps, weight_dtype, device, log)
    n_train = sum(p.numel() for p in trainable)

    train_rows, heldout = split_heldout(prep, cfg.eval_fraction, cfg.seed, cfg.eval_max_examples)
    if cfg.max_train_samples is not None:  # the first N training rows after the held-out split
        train_rows = train_rows[: cfg.max_train_samples]
    latent_shape = (family.latent_channels(unet.config), latent, latent)
    n_t = noise_scheduler.config.num_train_timesteps
    draw_timestep = functools.partial(objective.draw_timestep, noise_scheduler)
    cache = None
    if cfg.cache_latents:
        from .latent_cache import prepare_latent_cache

        cache = prepare_latent_cache(out / "latent_cache", prep, vae, resolution, cfg.random_flip,
                                     accelerator.process_index, accelerator.num_processes,
                                     accelerator.wait_for_everyone, main and cfg.progress, log, cfg.num_workers)
    examples = TrainingExamples(prep, resolution, latent_shape, n_t, cfg.seed, cfg.random_flip, latents=cache,
                                noise_offset=cfg.noise_offset, draw_timestep=draw_timestep, text=text_cache)
    eval_examples = TrainingExamples(prep, resolution, latent_shape, n_t, cfg.seed, random_flip=False,
                                     draw_timestep=draw_timestep, text=text_cache)
    log(data_line(prep.stats, len(train_rows), len(heldout)))

    optimizer = adamw_class(cfg.optimizer)(
        trainable, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
    )
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps)
    ema = None
    if cfg.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trainable, decay=cfg.ema_decay) if cfg.lora_rank else EMAModel(
            trainable, decay=cfg.ema_decay, model_cls=type(unet), model_config=unet.config)
        ema.to(device)
    unet, optimizer = accelerator.prepare(unet, optimizer)  # the sampler shards data itself; see MicroBatches

    step, extra = start.load(log, accelerator.unwrap_model(unet), optimizer, lr_scheduler, ema, accelerator.scaler)
    before = extra.get("grounding_before")

    def evaluate() -> dict | None:
        if not heldout:
            return None
        batches = (collate([eval_examples[(r, 0)] for r in heldout[i : i + cfg.batch_size]]) for i in range(0, len(heldout), cfg.batch_size))
        with accelerator.autocast():
            return grounding_score(comps, batches, layers, cfg.eval_timesteps, seed=cfg.seed)

    if before is None and main:
        before = evaluate()
        if before:
            log(f"grounding score before: {before['score']:.4f} (chance {before['chance']:.4f})")
    accelerator.wait_for_everyone()

    def validate(at: int, score: dict | None = None) -> None:  # main process: the validation grid and the score
        if cfg.validation_prompts:
            from .validation import render_validation

            if validation["pipe"] is None:
                validation["pipe"] = validation_pipe()
            path = out / "validation" / f"step-{at:06d}.png"
            with accelerator.autocast():
                grid = render_validation(validation["pipe"], comps, cfg.validation_prompts, cfg.seed, cfg.validation_steps,
                                         family.default_guidance, resolution, layers, path,
                                         embeddings=validation["embeddings"])
            match_umask(path)
            log_validation_images(accelerator, grid, at)
            validation["last"] = path
        score = score or evaluate()
        if score is not None:
            accelerator.log({"grounding/score": score["score"]}, step=at)
    extra = lambda: {"grounding_before": before, "settings": settings, "supervised_groups": groups}  # noqa: E731

    def save(at: int) -> None:
        save_checkpoint(ckpt_root, at, accelerator.unwrap_model(unet), optimizer, lr_scheduler, ema,
                        accelerator.scaler, cfg.checkpoints_limit, extra=extra(), only_trainable=bool(cfg.lora_rank))

    if main:
        accelerator.init_trackers("train_unet", config={k: v for k, v in config_dict(cfg).items() if isinstance(v, (int, float, str, bool))})
    sampler = MicroBatches(train_rows, cfg.batch_size, accelerator.num_processes, accelerator.process_index, cfg.seed,
                           start=step * cfg.grad_accum, stop=cfg.max_steps * cfg.grad_accum)
    loader = DataLoader(examples, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        worker_init_fn=ignore_stop_signals)  # a worker outlives SIGTERM until the step is saved

    if cfg.compile:  # after the "before" score: evaluation runs eager (no extra no-grad graphs to compile)
        from ..models.compile import compile_regions

        n = compile_regions(accelerator.unwrap_model(unet))
        log(f"compile: {n} UNet regions (ResNet blocks, feed-forwards) compile on the first steps")
    guard = FiniteGuard(LOSS_TERMS[:3], device)

    def check_finite() -> None:  # a sync: at logging steps, before every checkpoint and at the end
        guard.check_training(accelerator.gather, ckpt_root, written="pipeline", lower="--lr", restart="--lambda / --gamma")

    sums = {k: torch.zeros((), device=device) for k in LOSS_TERMS}
    n_micro, last = 0, {}
    start_step, t0 = step, time.perf_counter()
    try:
        with StopSignals() as signals, training_progress("train-unet", main and cfg.progress) as bar:
            task = bar.add_task("", total=cfg.max_steps, completed=step)
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with accelerator.accumulate(unet):
                    latents, cond = comps.encode_batch(batch)
                    if cfg.channels_last:
                        latents = latents.contiguous(memory_format=torch.channels_last)
                        batch["noise"] = batch["noise"].contiguous(memory_format=torch.channels_last)
                    losses = tokencompose_losses(unet, latents, cond, batch, noise_scheduler, layers, cfg.lambda_token,
                                                 cfg.gamma_pixel, backward=accelerator.backward,
                                                 map_reduction=cfg.map_reduction, snr_gamma=cfg.snr_gamma,
                                                 objective=comps.objective)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                guard.update(step + 1, losses)
                for k in LOSS_TERMS:
                    sums[k] += losses[k].detach().float()
                n_micro += 1
                if not accelerator.sync_gradients:
                    continue
                if not accelerator.optimizer_step_was_skipped:
                    lr_scheduler.step()
                if ema is not None:
                    ema.step(trainable)
                step += 1
                bar.update(task, advance=1)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    check_finite()
                    means = accelerator.reduce(torch.stack([sums[k] for k in LOSS_TERMS]) / n_micro, reduction="mean")
                    last = {k: float(v) for k, v in zip(LOSS_TERMS, means.tolist())}
                    accelerator.log({f"loss/{k}": v for k, v in last.items()} | {"lr": lr_scheduler.get_last_lr()[0]}, step=step)
                    bar.update(task, description=" ".join(f"{k} {v:.4g}" for k, v in last.items()))
                    sums = {k: torch.zeros((), device=device) for k in LOSS_TERMS}
                    n_micro = 0
                stop = signals.agreed(accelerator) if step < cfg.max_steps else None  # SIGTERM/USR1/INT: all ranks
                if stop or cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                    check_finite()
                    if main:
                        save(step)
                    accelerator.wait_for_everyone()
                if stop:
                    raise signals.stopped(stop, step, ckpt_root / f"step-{step:06d}")
                if cfg.validation_every and step % cfg.validation_every == 0 and step < cfg.max_steps:
                    check_finite()
                    if main:
                        validate(step)
                    accelerator.wait_for_everyone()
                if step >= cfg.max_steps:
                    break
        check_finite()
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted.in_training(ckpt_root, step) from None
    train_s = time.perf_counter() - t0
    if cfg.compile:
        from ..models.compile import uncompile_regions

        uncompile_regions(accelerator.unwrap_model(unet))
    accelerator.wait_for_everyone()
    in_sync = _ranks_in_sync(accelerator, unet)

    summary = None
    if main:
        trained = accelerator.unwrap_model(unet)
        save(step)
        if ema is not None:
            ema.copy_to(trainable)  # the pipeline and the "after" score use the EMA weights
        if cfg.channels_last:
            trained.to(memory_format=torch.contiguous_format)  # safetensors saves contiguous tensors only
        after = evaluate()
        if after:
            log(f"grounding score after: {after['score']:.4f} (before {before['score']:.4f}, chance {after['chance']:.4f})")
        validate(step, after)
        if cfg.lora_rank:
            save_lora_outputs(cfg, trained, tokenizer, out, family)
        else:
            save_pipeline(cfg, trained, tokenizer, out, family)
        steps_run = step - start_step
        summary = {
            "steps": step,
            "steps_this_run": steps_run,
            "final_losses": last,
            "train_seconds": train_s,
            "images_per_s": steps_run * cfg.grad_accum * cfg.batch_size * accelerator.num_processes / train_s if train_s > 0 else None,
            "peak_memory_mb": peak_memory_mb(device),
            "device": str(device),
            "mixed_precision": accelerator.mixed_precision,  # what it trained in (fp16 on a CPU: no)
            "num_processes": accelerator.num_processes,
            "ranks_in_sync": in_sync,
            "family": family.name,
            "trainable_parameters": n_train,
            "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha or cfg.lora_rank, "targets": list(cfg.lora_targets),
                     "fused": cfg.fuse} if cfg.lora_rank else None,
            "resolution": resolution,
            "supervised_groups": groups,
            "map_reduction": cfg.map_reduction,
            "objective": dataclasses.asdict(objective) if dataclasses.is_dataclass(objective) else None,
            "quantize_base": cfg.quantize_base,
            "grounding_before": before,
            "grounding_after": after,
            "data": prep.stats | {"train_rows": len(train_rows), "heldout_rows": len(heldout)},
            "latent_cache": {"path": str(cache.root), "images": len(cache), "dtype": cache.dtype} if cache else None,
            "text_cache": {"path": str(text_cache.root), "captions": len(text_cache),
                           "bytes_per_caption": text_cache.index["bytes_per_caption"]} if text_cache else None,
            "phrases_dropped": prep.dropped[:100],
            "validation": str(validation["last"].relative_to(out)) if validation["last"] else None,
            "config": config_dict(cfg),
        }
        write_json_atomic(out / "training_summary.json", summary)
        write_model_card(out, cfg, summary)
        what = ("LoRA adapters" + (", fused/" if cfg.fuse else "")) if cfg.lora_rank else "pipeline"
        logs = ", logs/" if cfg.report_to in ("tensorboard", "all") else ""  # (wandb keeps its own folder)
        log(f"wrote {out} ({what}, training_summary.json, checkpoints/{logs})")
    accelerator.wait_for_everyone()  # no process leaves while the main one still writes
    accelerator.end_training()
    if cfg.push_to_hub and main:  # after everything is written and the trackers closed: a failure loses nothing
        push_run(out, hub_repo_id(out, cfg.hub_model_id), log)
    return summary or {}


def _finished_run(cfg: TrainUnetConfig, out: Path, ckpt: Path | None) -> dict | None:
    """The training summary of a run that already finished at the step of ``ckpt`` (the checkpoint --resume names),
    when --max-steps asks for no more steps: a rerun is then a no-op. None when there is training left, or when
    the end (training_summary.json, the model card) was never written. A --max-steps below that step is refused."""
    if ckpt is None:
        return None
    step = int(json.loads((ckpt / "state.json").read_text())["step"])
    if cfg.max_steps < step:
        raise UserError(
            f"--max-steps {cfg.max_steps} is below step {step} of {ckpt}, which --resume {cfg.resume} continues from: "
            f"pass --max-steps {step} or more, or train into a new --output"
        )
    if cfg.max_steps > step or not (out / CARD).is_file():
        return None
    try:
        summary = json.loads((out / "training_summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("steps") == step else None


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
