"""Time one train-clip training step of a random CLIP (tiny, ViT-B/16, ViT-L/14) and report images/s and peak memory.

One step is what ``tcompose/clip/loop.py`` does per batch on one process: the CLIPModel forward on
``[B, 3, S, S]`` crops and ``[B, 77]`` captions (under autocast with ``--dtype bf16|fp16``, fp32 master
weights), the label-deduplicated InfoNCE loss (``distributed_info_nce`` with world size 1), backward, gradient
clipping at 1.0, AdamW (CLIP's betas, weight-decay groups), ``zero_grad``, the logit_scale clamp.

Prints one JSON object to stdout (and ``--json PATH``) and a table to stderr::

    .venv/bin/python benchmarks/clip_step.py --size tiny,vit-b --device cpu --batch-size 8
    python benchmarks/clip_step.py --device cuda --size vit-l --dtype bf16 --find-max-batch
    python benchmarks/clip_step.py --device cuda --size vit-l --dtype bf16 --find-max-batch --gradient-checkpointing

``--find-max-batch`` (CUDA only) doubles the batch from ``--batch-size`` until a step runs out of memory, then
bisects to the largest batch (a multiple of ``--batch-multiple``) whose step fits, and times that one.
Peak memory: CUDA ``max_memory_allocated`` of the timed steps; on CPU the process's peak RSS
(see ``benchmarks/train_step.py``'s PeakMemory).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from train_step import PeakMemory, _cpu_model  # same folder: benchmarks/

from tcompose.clip.loss import distributed_info_nce
from tcompose.clip.towers import LOGIT_SCALE_MAX, enable_checkpointing, param_groups
from tcompose.testing.tiny_vision import CLIP_SIZES, build_clip

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SEED = 0
N_CATEGORIES = 80  # COCO's: duplicate labels in a batch, as in real crops


def make_batch(batch: int, image_size: int, vocab: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(SEED)
    ids = torch.full((batch, 77), vocab - 1, dtype=torch.long)  # padded with <|endoftext|>
    for i in range(batch):
        n = int(torch.randint(3, 12, (), generator=g))
        ids[i, 0] = vocab - 2
        ids[i, 1 : n + 1] = torch.randint(0, vocab - 2, (n,), generator=g)
    return {"pixel_values": torch.randn(batch, 3, image_size, image_size, generator=g).to(device),
            "input_ids": ids.to(device), "labels": torch.randint(0, N_CATEGORIES, (batch,), generator=g).to(device)}


class Bench:
    """A model and its optimizer on ``device``; ``step(batch)`` is one training step."""

    def __init__(self, size: str, device: torch.device, dtype: str, checkpointing: bool):
        self.model = build_clip(size, seed=SEED).to(device).train()
        if checkpointing:
            enable_checkpointing(self.model)
        self.opt = torch.optim.AdamW(param_groups(self.model, 0.1), lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
        self.amp = DTYPES[dtype]
        self.scaler = torch.amp.GradScaler(device.type) if self.amp is torch.float16 else None
        self.device = device

    def step(self, batch: dict) -> float:
        m = self.model
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            out = m(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
        loss = distributed_info_nce(out.image_embeds, out.text_embeds, m.logit_scale.exp(), labels=batch["labels"])
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            self.scaler.step(self.opt)
            self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            m.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        return float(loss.detach())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fits(bench: Bench, batch: int, image_size: int, vocab: int) -> bool:
    try:
        data = make_batch(batch, image_size, vocab, bench.device)
        for _ in range(2):  # the second step has Adam's state allocated
            bench.step(data)
        _sync(bench.device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        bench.opt.zero_grad(set_to_none=True)
        data = None
        gc.collect()
        torch.cuda.empty_cache()


def find_max_batch(bench: Bench, start: int, multiple: int, image_size: int, vocab: int, log) -> tuple[int, list]:
    """Largest batch (a multiple of ``multiple``) whose training step fits on the GPU; the trials made."""
    trials, ok, bad = [], 0, None
    b = max(multiple, start - start % multiple)
    while bad is None:
        fits = _fits(bench, b, image_size, vocab)
        trials.append({"batch_size": b, "fits": fits})
        log(f"  batch {b}: {'fits' if fits else 'out of memory'}")
        if fits:
            ok, b = b, b * 2
        else:
            bad = b
    while bad - ok > multiple:
        mid = (ok + bad) // 2 // multiple * multiple
        if mid <= ok:
            break
        fits = _fits(bench, mid, image_size, vocab)
        trials.append({"batch_size": mid, "fits": fits})
        log(f"  batch {mid}: {'fits' if fits else 'out of memory'}")
        ok, bad = (mid, bad) if fits else (ok, mid)
    if ok == 0:
        raise SystemExit(f"even batch {multiple} does not fit; try --gradient-checkpointing")
    return ok, trials


def bench_size(size: str, args, device: torch.device, mem: PeakMemory) -> dict:
    bench = Bench(size, device, args.dtype, args.gradient_checkpointing)
    image_size = bench.model.config.vision_config.image_size
    vocab = bench.model.config.text_config.vocab_size
    batch, trials = args.batch_size, None
    if args.find_max_batch:
        batch, trials = find_max_batch(bench, args.batch_size, args.batch_multiple, image_size, vocab,
                                       lambda s: print(s, file=sys.stderr))
    data = make_batch(batch, image_size, vocab, device)
    for _ in range(args.warmup):
        bench.step(data)
    mem.reset()
    times, losses = [], []
    for _ in range(args.steps):
        _sync(device)
        t0 = time.perf_counter()
        losses.append(bench.step(data))
        _sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    result = {
        "size": size, "params_m": round(sum(p.numel() for p in bench.model.parameters()) / 1e6, 2),
        "image_size": image_size, "batch_size": batch, "dtype": args.dtype,
        "gradient_checkpointing": args.gradient_checkpointing, "step_s": round(step_s, 5),
        "step_s_min": round(min(times), 5), "images_per_s": round(batch / step_s, 2),
        "peak_mem_mb": round(mem.peak_mb(), 1), "timed_steps": len(times), "last_loss": round(losses[-1], 4),
    }
    if trials is not None:
        result["max_batch_trials"] = trials
    del bench, data
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", "--sizes", dest="sizes", default="tiny,vit-b", help=f"comma-separated, from {sorted(CLIP_SIZES)}")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="autocast dtype (fp32: no autocast)")
    p.add_argument("--batch-size", type=int, default=8, help="the batch (or the first one tried with --find-max-batch)")
    p.add_argument("--find-max-batch", action="store_true", help="CUDA: time the largest batch that fits")
    p.add_argument("--batch-multiple", type=int, default=8, help="--find-max-batch resolution")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not args.sizes or any(s not in CLIP_SIZES for s in args.sizes):
        p.error(f"--size: choose from {sorted(CLIP_SIZES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.find_max_batch and args.device != "cuda":
        p.error("--find-max-batch needs --device cuda (on CPU running out of memory kills the process)")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.batch_multiple < 1:
        p.error("--steps, --batch-size and --batch-multiple must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    mem = PeakMemory(device)
    t0 = time.perf_counter()
    results = [bench_size(size, args, device, mem) for size in args.sizes]
    report = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "images_per_s": results[0]["images_per_s"], "peak_mem_mb": results[0]["peak_mem_mb"],
        "results": results, "warmup": args.warmup, "steps": args.steps, "memory_note": mem.note,
        "wall_s": round(time.perf_counter() - t0, 1), "platform": platform.platform(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(f"# {report['device']} ({report['device_name']}), torch {report['torch']}, {report['threads']} threads", file=sys.stderr)
    print(f"{'size':<6} {'params M':>9} {'px':>4} {'B':>5} {'dtype':<5} {'ckpt':<4} {'s/step':>8} {'img/s':>8} {'peak MB':>9}", file=sys.stderr)
    for r in results:
        print(f"{r['size']:<6} {r['params_m']:>9.2f} {r['image_size']:>4} {r['batch_size']:>5} {r['dtype']:<5} "
              f"{('on' if r['gradient_checkpointing'] else 'off'):<4} {r['step_s']:>8.4f} {r['images_per_s']:>8.2f} "
              f"{r['peak_mem_mb']:>9.1f}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
