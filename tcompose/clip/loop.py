"""Contrastive (InfoNCE) finetuning of CLIP on object crops, to give Stable Diffusion a text encoder that has
seen off-centre, occluded and small objects.

Runbook (defaults: lr 1e-5, 100 warmup steps then cosine decay, AdamW betas (0.9, 0.98) eps 1e-6, weight
decay 0.1 on weight matrices only, batch 64 per process, learnable temperature clamped at 100, 1 epoch):

    # crops from COCO's instance boxes, then one GPU
    tcompose crops COCO_DIR --split train2017 --output data/crops
    tcompose train-clip --data data/crops --model openai/clip-vit-large-patch14 --output runs/clip \\
        --mixed-precision bf16 --gradient-checkpointing

    # 8 GPUs: the loss gathers all 8 x 64 embeddings, so every crop has 511 negatives
    accelerate launch --multi_gpu --num_processes 8 -m tcompose train-clip --data data/crops --output runs/clip \\
        --mixed-precision bf16

    # 2 nodes x 8 GPUs: the same on each node, with --num_machines 2 --machine_rank {0,1}
    #   --main_process_ip HOST --main_process_port 29500 --num_processes 16

    # only the text side learns: --lock-vision; only the last 4 text layers: --lock-vision --lock-text
    #   --unlocked-text-layers 4; continue after a kill: the same command with --resume latest

    # use the finetuned text tower in Stable Diffusion
    tcompose train-unet --data data/coco-gt --text-encoder runs/clip --output runs/tc-clip

OUT holds the finetuned ``CLIPModel`` (``CLIPModel.from_pretrained(OUT)``, with tokenizer and
``preprocessor_config.json``), ``text_encoder/`` + ``tokenizer/`` (SD's layout; ``--text-encoder OUT`` of
train-unet / generate / multigen picks them), ``eval.json`` (held-out zero-shot and retrieval, before and
after; per category too), ``eval.png`` (zero-shot top-1 before and after per category group),
``training_summary.json``, ``README.md`` (the model card: tcompose.clip.card), ``checkpoints/`` and the
trackers' ``logs/`` (``--report-to``: tensorboard by default; the loss, lr, logit scale, the held-out scores and
the eval chart go to each). ``--push-to-hub`` uploads OUT, except ``checkpoints/``, when training ends.

Gradient accumulation averages gradients over micro-batches; the contrastive batch (the negatives) is the
micro-batch of all processes, ``--batch-size x processes``, not enlarged by accumulation.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import torch

from ..io.hub import check_push, hub_repo_id, push_run
from ..io.preemption import StopSignals, ignore_stop_signals
from ..io.runs import FiniteGuard, Interrupted, output_guard, prepare_run_folder, resume_point
from ..io.trainer import log_validation_images, peak_memory_mb, trainer_accelerator, training_progress
from .card import write_model_card
from .config import OUTPUTS, TrainClipConfig, config_dict, resume_settings

__all__ = ["TrainClipConfig", "lr_factor", "run", "total_steps"]


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Multiplier of the base lr before optimizer step ``step`` (0-based): linear warmup over ``warmup`` steps
    (``(step + 1) / warmup``), then constant or a cosine decay reaching 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(cfg: TrainClipConfig, n_train: int, world_size: int) -> int:
    """Optimizer steps of the run: ``max_steps``, else ``epochs`` over the training crops."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = n_train // (cfg.batch_size * world_size)  # micro-batches; the last incomplete one is dropped
    return max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))


def run(cfg: TrainClipConfig) -> dict:
    """Evaluate, finetune with InfoNCE, checkpoint, evaluate again, and export to ``cfg.output``."""
    cfg.validate()  # --report-to too: a missing wandb fails before any model or data is read
    check_push(cfg.push_to_hub, cfg.hub_model_id)  # offline or without a token: refused before any work
    with output_guard(cfg.output):
        return _train(cfg)


def _log_eval(accelerator, metrics: dict | None, step: int) -> None:
    """The held-out scores (zero-shot top-k, text-to-image R@k) to the trackers at ``step``."""
    from .eval import METRICS

    if metrics:
        accelerator.log({f"eval/{m}": metrics[m] for m in METRICS}, step=step)


def _log_chart(accelerator, path: Path, step: int) -> None:
    """eval.png to the trackers (under ``eval``), as train-unet's validation grids go."""
    if accelerator.trackers:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            log_validation_images(accelerator, np.asarray(im.convert("RGB")), step, name="eval")


def _train(cfg: TrainClipConfig) -> dict:
    from accelerate import PartialState
    from torch.utils.data import DataLoader
    from transformers.utils import logging as transformers_logging

    from ..io.batches import MicroBatches
    from ..io.checkpoints import save_checkpoint
    from ..io.datasets import write_json_atomic
    from ..io.files import match_umask
    from ..models.clip import export_clip, load_clip, load_preprocess_config
    from .data import CropExamples, Preprocess, collate, read_crops, split_by_image, tokenize
    from .eval import compare, evaluate, format_table, write_eval_chart
    from .loss import distributed_info_nce
    from .towers import LOGIT_SCALE_MAX, enable_checkpointing, lock_towers, param_groups

    rows = read_crops(cfg.data)  # bad data fails before any model is loaded
    transformers_logging.disable_progress_bar()
    out = Path(cfg.output)
    # Every refusal comes before the Accelerator and the weights: the contrastive batch, the run folder and a
    # resume's settings (the schedule's length follows from the data alone).
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes then form a gloo group (tests)
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    cfg.check_contrastive_batch(world)
    prepare_run_folder(out, cfg.resume, cfg.overwrite, OUTPUTS, "train-clip", clear=main)
    state.wait_for_everyone()
    train_rows, heldout = split_by_image(rows.image_ids, cfg.eval_fraction, cfg.seed, cfg.eval_max_examples)
    max_steps = total_steps(cfg, len(train_rows), world)
    ckpt_root = out / "checkpoints"
    settings = resume_settings(cfg, world, max_steps)
    start = resume_point(cfg.resume, ckpt_root, settings)

    accelerator = trainer_accelerator(out, cfg.grad_accum, cfg.mixed_precision, cfg.report_to)
    device, log = accelerator.device, accelerator.print
    from ..models.precision import set_tf32

    set_tf32(cfg.allow_tf32, device)  # --tf32/--no-tf32, on by default; on and off alike (CUDA only)
    torch.manual_seed(cfg.seed)

    clip, tokenizer = load_clip(cfg.model, revision=cfg.revision)
    pre_cfg = load_preprocess_config(cfg.model, clip.config.vision_config.image_size, cfg.revision)
    counts = lock_towers(clip, cfg.lock_vision, cfg.lock_text, cfg.unlocked_text_layers, cfg.learn_temperature)
    if cfg.gradient_checkpointing:
        enable_checkpointing(clip)
    clip.to(device).train()

    examples = CropExamples(rows, Preprocess.from_config(pre_cfg), tokenizer)
    class_ids = list(rows.class_texts)
    class_input_ids = tokenize(tokenizer, [rows.class_texts[c] for c in class_ids])
    log(f"data: {len(train_rows)} training crops, {len(heldout)} held out, {len(class_ids)} categories; "
        f"{max_steps} steps; parameters: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen")

    optimizer = torch.optim.AdamW(param_groups(clip, cfg.weight_decay), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon)
    schedule = functools.partial(lr_factor, warmup=cfg.warmup_steps, total=max_steps, schedule=cfg.lr_scheduler)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer = accelerator.prepare(clip, optimizer)  # the sampler shards the data itself (MicroBatches)

    step, extra = start.load(log, clip, optimizer, lr_scheduler, None, accelerator.scaler)
    before = extra.get("eval_before")

    def held_out_eval() -> dict | None:
        if not heldout:
            return None
        with accelerator.autocast():
            return evaluate(clip, examples, heldout, class_ids, class_input_ids, cfg.batch_size, device, collate,
                            [rows.categories[c] for c in class_ids])

    if before is None and main:
        before = held_out_eval()
    accelerator.wait_for_everyone()

    if main:
        accelerator.init_trackers("train_clip", config={k: v for k, v in config_dict(cfg).items() if isinstance(v, (int, float, str, bool))})
        if step == 0:  # a resume continues the curves where they stopped
            _log_eval(accelerator, before, 0)
    sampler = MicroBatches(train_rows, cfg.batch_size, world, rank, cfg.seed, start=step * cfg.grad_accum,
                           stop=max_steps * cfg.grad_accum)
    loader = DataLoader(examples, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_stop_signals)  # a worker outlives SIGTERM until the step is saved
    guard = FiniteGuard(("loss",), device)

    def check_finite() -> None:  # a sync: at logging steps, before every checkpoint and at the end
        guard.check_training(accelerator.gather, ckpt_root, written="model", lower="--lr")

    def save(at: int) -> None:
        save_checkpoint(ckpt_root, at, clip, optimizer, lr_scheduler, None, accelerator.scaler, cfg.checkpoints_limit,
                        extra={"eval_before": before, "settings": settings})

    loss_sum, n_micro, last = torch.zeros((), device=device), 0, {}
    start_step, t0 = step, time.perf_counter()
    try:
        with StopSignals() as signals, training_progress("train-clip", main and cfg.progress) as bar:
            task = bar.add_task("", total=max_steps, completed=step)
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with accelerator.accumulate(model):
                    outputs = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
                    labels = batch["labels"] if cfg.dedupe_labels else None
                    loss = distributed_info_nce(outputs.image_embeds, outputs.text_embeds, clip.logit_scale.exp(),
                                                rank=rank, world_size=world, labels=labels)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                guard.update(step + 1, {"loss": loss})
                loss_sum += loss.detach().float()
                n_micro += 1
                if not accelerator.sync_gradients:
                    continue
                with torch.no_grad():
                    clip.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
                if not accelerator.optimizer_step_was_skipped:
                    lr_scheduler.step()
                step += 1
                bar.update(task, advance=1)
                if step % cfg.log_every == 0 or step == max_steps:
                    check_finite()
                    mean = float(accelerator.reduce(loss_sum / n_micro, reduction="mean"))
                    last = {"loss": mean, "logit_scale": float(clip.logit_scale.detach().exp()), "lr": lr_scheduler.get_last_lr()[0]}
                    accelerator.log({f"train/{k}": v for k, v in last.items()}, step=step)
                    bar.update(task, description=f"loss {mean:.4g} scale {last['logit_scale']:.1f}")
                    loss_sum, n_micro = torch.zeros((), device=device), 0
                stop = signals.agreed(accelerator) if step < max_steps else None  # SIGTERM/USR1/INT: all ranks
                if stop or cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < max_steps:
                    check_finite()
                    if main:
                        save(step)
                    accelerator.wait_for_everyone()
                if stop:
                    raise signals.stopped(stop, step, ckpt_root / f"step-{step:06d}")
                if step >= max_steps:
                    break
        check_finite()
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted.in_training(ckpt_root, step) from None
    train_s = time.perf_counter() - t0
    accelerator.wait_for_everyone()

    summary = None
    if main:
        save(step)
        report = compare(before, held_out_eval())
        report |= {"steps": step, "heldout_images": len({rows.image_ids[r] for r in heldout}), "model": cfg.model}
        write_json_atomic(out / "eval.json", report)
        _log_eval(accelerator, report["after"], step)
        if write_eval_chart(report, out / "eval.png"):
            match_umask(out / "eval.png")
            _log_chart(accelerator, out / "eval.png", step)
        log(format_table(report))
        export_clip(clip, tokenizer, pre_cfg, out)
        steps_run = step - start_step
        summary = {
            "steps": step, "steps_this_run": steps_run, "final": last, "train_seconds": train_s,
            "images_per_s": steps_run * cfg.grad_accum * cfg.batch_size * world / train_s if train_s > 0 else None,
            "peak_memory_mb": peak_memory_mb(device), "device": str(device), "num_processes": world,
            "mixed_precision": accelerator.mixed_precision,  # what it trained in (fp16 on a CPU: no)
            "parameters": counts, "eval": report,
            "data": {"train_crops": len(train_rows), "heldout_crops": len(heldout), "categories": len(class_ids)},
            "config": config_dict(cfg),
        }
        write_json_atomic(out / "training_summary.json", summary)
        write_model_card(out, cfg, summary)
        logs = ", logs/" if cfg.report_to in ("tensorboard", "all") else ""  # (wandb keeps its own folder)
        log(f"wrote {out} (CLIPModel, text_encoder/, tokenizer/, eval.json, eval.png, training_summary.json, "
            f"README.md, checkpoints/{logs})")
    accelerator.wait_for_everyone()  # no process leaves while the main one still writes
    accelerator.end_training()
    if cfg.push_to_hub and main:  # after everything is written and the trackers closed: a failure loses nothing
        push_run(out, hub_repo_id(out, cfg.hub_model_id), log, stage="train-clip")
    return summary or {}
