"""Time one full TokenCompose training step with the grounding losses off ("plain") and on ("tc").

One step is what the training loop does per batch: ``tokencompose_losses(..., backward=...)`` (UNet forward,
the denoising loss and, for "tc", the token and pixel losses on the captured cross-attention maps; then
backward), ``optimizer.step()`` (AdamW) and ``optimizer.zero_grad(set_to_none=True)``. Both configurations
use the same model, optimizer, batch and precision in this one process; they alternate round by round (the
order flips every round), so drift on the machine affects both. The figure of merit is

    overhead_ratio = median step time (tc) / median step time (plain)

Prints one JSON object to stdout (and to ``--json PATH``) and a short table to stderr::

    .venv/bin/python benchmarks/train_step.py --sizes tiny,medium --device cpu
    python benchmarks/train_step.py --sizes sd14 --device cuda --dtype bf16 --batch-size 8 --gradient-checkpointing both

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before every timed segment); on CPU the
process's peak RSS (``resource.getrusage``), made resettable per segment where Linux allows it
(``malloc_trim`` then ``/proc/self/clear_refs``), so the CPU figure includes the model, the optimizer state,
the Python runtime and whatever the allocator keeps.

The measuring code lives in :mod:`tcompose.bench.train` and :mod:`tcompose.bench.measure` (``tcompose bench``
uses it too); this script is its command line. ``--flops`` adds FLOPs per step (FlopCounterMode) to each result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tcompose.bench.measure import PeakMemory, cpu_model, device_name
from tcompose.bench.train import AMP_DTYPES, LAYERS, TC, bench_unet
from tcompose.testing.tiny_sd import UNET_SIZES

_cpu_model = cpu_model

CHECKPOINTING = {"off": (False,), "on": (True,), "both": (False, True)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,medium", help=f"comma-separated UNet sizes from {sorted(UNET_SIZES)}")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(AMP_DTYPES), default="fp32", help="autocast dtype (fp32: no autocast)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--latent-size", type=int, default=None, help="latent side (default: the config's sample_size)")
    p.add_argument("--gradient-checkpointing", choices=tuple(CHECKPOINTING), default="off")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration per round")
    p.add_argument("--rounds", type=int, default=8, help="rounds; plain and tc alternate, order flipped every round")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--flops", action="store_true", help="also count FLOPs per step (one extra step per configuration)")
    p.add_argument("--compile", action="store_true", help="torch.compile the ResNet and feed-forward blocks")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in UNET_SIZES]
    if unknown or not args.sizes:
        p.error(f"unknown size(s) {unknown}; choose from {sorted(UNET_SIZES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--steps, --rounds and --batch-size must be >= 1, --warmup >= 0")
    return args


def print_table(report: dict, file=sys.stderr) -> None:
    head = f"{'size':<7} {'ckpt':<4} {'dtype':<5} {'B':>3} {'lat':>4} {'plain s':>9} {'tc s':>9} {'ratio':>6} " \
           f"{'img/s tc':>9} {'mem tc MB':>10} {'mem pl MB':>10}"
    print(f"# {report['device']} ({report['device_name']}), torch {report['torch']}, {report['threads']} threads",
          file=file)
    print(head, file=file)
    for r in report["results"]:
        print(f"{r['size']:<7} {('on' if r['gradient_checkpointing'] else 'off'):<4} {r['dtype']:<5} "
              f"{r['batch_size']:>3} {r['latent_size']:>4} {r['step_s_plain']:>9.4f} {r['step_s_tc']:>9.4f} "
              f"{r['overhead_ratio']:>6.3f} {r['images_per_s']:>9.2f} {r['peak_mem_mb']:>10.1f} "
              f"{r['peak_mem_mb_plain']:>10.1f}", file=file)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False  # as in training (accelerate's default)
    mem = PeakMemory(device)
    t0 = time.perf_counter()
    results = []
    for size in args.sizes:
        results += bench_unet(size, args.batch_size, args.latent_size, args.dtype,
                              CHECKPOINTING[args.gradient_checkpointing], args.warmup, args.steps, args.rounds,
                              device, mem, flops=args.flops, compile=args.compile)
    first = results[0]
    report = {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "overhead_ratio": first["overhead_ratio"],
        "step_s_plain": first["step_s_plain"],
        "step_s_tc": first["step_s_tc"],
        "images_per_s": first["images_per_s"],
        "peak_mem_mb": first["peak_mem_mb"],
        "results": results,
        "lambda_token": TC["lambda_token"],
        "gamma_pixel": TC["gamma_pixel"],
        "layers": list(LAYERS),
        "warmup": args.warmup,
        "steps": args.steps,
        "rounds": args.rounds,
        "memory_note": mem.note,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if device.type == "cpu":
        report["cpu_model"] = cpu_model()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print_table(report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
