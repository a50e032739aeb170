"""Time `tcompose generate`'s image loop against diffusers' own pipeline called the plain way.

Both sides use the same ``StableDiffusionPipeline`` object (random weights, built in memory), the same
prompts, steps, guidance, size and dtype, in one process; they alternate round by round (the order flips
every round). Per batch:

- ``ours``: :func:`tcompose.evaluate.generate.write_images`: per-image seeded latents, cached prompt embeddings,
  ``pipe(..., output_type="pt")``, uint8 on the device, PNGs (with metadata, written atomically) encoded in a
  background thread, exactly as ``tcompose generate`` runs;
- ``plain``: ``pipe(prompts, generator=torch.Generator(device).manual_seed(seed), num_inference_steps=...,
  guidance_scale=...).images`` then ``image.save(path)`` for each image;
- ``plain_call``: the same call without saving (for reference).

The figure of merit is ``ratio = median seconds per batch (ours) / median seconds per batch (plain)``, per
batch size; the target is <= 1.05. Prints one JSON object to stdout (and to ``--json PATH``), a table to
stderr::

    .venv/bin/python benchmarks/generate.py --device cpu --size tiny --dtype fp32 --batch-sizes 1,4
    python benchmarks/generate.py --device cuda --size sd14 --dtype fp16 --batch-sizes 1,8,16

Sizes: ``tiny`` / ``medium`` (tcompose.testing.tiny_sd UNets, tiny VAE, 64 px) and ``sd14`` (SD1.4's UNet, VAE
and CLIP ViT-L/14 text encoder shapes, random weights, 512 px).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tcompose.evaluate.generate import GenerateConfig, write_images
from tcompose.evaluate.settings import GenerationSettings
from tcompose.models.sampling import image_seed
from tcompose.evaluate.sampling import DTYPES
from tcompose.data.clip_bpe import write_clip_tokenizer
from tcompose.testing.tiny_sd import count_parameters

PROMPTS = [
    "a cat and a wine glass", "a red ball on a wooden table", "two dogs next to a blue car",
    "a bicycle leaning on a tree", "an apple, a banana and a knife", "a clock above a sofa",
    "a horse and a sheep in a field", "a laptop beside a cup of coffee",
]


def build_pipeline(size: str, dtype: torch.dtype, device: torch.device, bpe: Path | None, tmp: Path):
    from transformers import CLIPTokenizer

    from tcompose.bench.infer import build_sd_pipeline

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp / "tokenizer", bpe_path=bpe, corpus=PROMPTS))
    pipe = build_sd_pipeline(size, device, dtype, tokenizer)
    return pipe, count_parameters(pipe.unet)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_batch(pipe, b: int, args, device: torch.device, out: Path) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
    cfg = GenerateConfig(model="bench", output=out, prompts=prompts,
                         settings=GenerationSettings(batch_size=b, steps=args.steps, guidance=args.guidance,
                                                     device=str(device)))
    counter = iter(range(10**9))

    def ours() -> None:
        n = next(counter)
        jobs = [(n * b + i, 0, p, image_seed(0, n * b + i, 0)) for i, p in enumerate(prompts)]
        write_images(pipe, cfg, jobs, out / "ours")  # a fresh prompt cache each batch: no reuse across calls

    def plain(save: bool = True) -> None:
        n = next(counter)
        images = pipe(prompts, generator=torch.Generator(device).manual_seed(n), num_inference_steps=args.steps,
                      guidance_scale=args.guidance).images
        if save:
            for i, im in enumerate(images):
                im.save(out / "plain" / f"{n:06d}_{i:02d}.png")

    variants = {"ours": ours, "plain": plain, "plain_call": lambda: plain(save=False)}
    for d in ("ours", "plain"):
        (out / d).mkdir(parents=True, exist_ok=True)
    for _ in range(args.warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    round_ratios = []
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        this = {}
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            variants[name]()
            sync(device)
            this[name] = time.perf_counter() - t0
            times[name].append(this[name])
        round_ratios.append(round(this["ours"] / this["plain"], 4))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch_size": b, "s_per_batch_ours": round(med["ours"], 5), "s_per_batch_plain": round(med["plain"], 5),
        "s_per_batch_plain_call": round(med["plain_call"], 5),
        "images_per_s_ours": round(b / med["ours"], 4), "images_per_s_plain": round(b / med["plain"], 4),
        "images_per_s_plain_call": round(b / med["plain_call"], 4),
        "ratio": round(med["ours"] / med["plain"], 4), "ratio_vs_plain_call": round(med["ours"] / med["plain_call"], 4),
        "ratio_min": round(min(times["ours"]) / min(times["plain"]), 4), "round_ratios": round_ratios,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=("tiny", "medium", "sd14"), default="tiny")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--batch-sizes", default="1,4", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (variants alternate, order flips)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--bpe", type=Path, default=None, help="CLIP's bpe_simple_vocab_16e6.txt.gz (default: a small BPE)")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.rounds < 1 or args.steps < 1:
        p.error("--batch-sizes, --rounds and --steps must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="tcompose-bench-gen-"))
    t0 = time.perf_counter()
    try:
        pipe, params = build_pipeline(args.size, DTYPES[args.dtype], device, args.bpe, tmp)
        results = [bench_batch(pipe, b, args, device, tmp / f"b{b}") for b in args.batch_sizes]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    report = {
        "device": device.type,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "size": args.size,
        "unet_params_m": round(params / 1e6, 2), "resolution": side, "dtype": args.dtype, "steps": args.steps,
        "guidance": args.guidance, "scheduler": "PNDMScheduler", "warmup": args.warmup, "rounds": args.rounds,
        "ratio": max(r["ratio"] for r in results), "results": results, "wall_s": round(time.perf_counter() - t0, 1),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(f"# {report['device']} ({report['device_name']}), {args.size} {side}px {args.dtype}, {args.steps} steps",
          file=sys.stderr)
    print(f"{'B':>3} {'ours img/s':>11} {'plain img/s':>12} {'call img/s':>11} {'ratio':>6} {'vs call':>8}",
          file=sys.stderr)
    for r in results:
        print(f"{r['batch_size']:>3} {r['images_per_s_ours']:>11.3f} {r['images_per_s_plain']:>12.3f} "
              f"{r['images_per_s_plain_call']:>11.3f} {r['ratio']:>6.3f} {r['ratio_vs_plain_call']:>8.3f}",
              file=sys.stderr)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
