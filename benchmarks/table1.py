"""Throughput of Table 1's scorers: OWL-ViT (VISOR), the FID Inception network, CLIP ViT-L/14 (CLIP score).

Each scorer runs on batches of generated-size images (512 px RGB; 64 px with ``--quick``), after a warm-up
call, ``--rounds`` timed calls per batch size, medians (CUDA synchronised around each). Random weights at the
real architectures (OWL-ViT B/32 at 768 px, Inception v3 at 299 px, CLIP ViT-L/14 at 224 px), nothing is
downloaded; ``--quick`` uses the tiny test models. The figure that matters beside generation is the time to
score a protocol's images: ``hours_per_10k_images`` (VISOR's protocol scores 101,120 images per model, FID's
11,000, each with one CLIP score).

Prints one JSON object to stdout (and to ``--json PATH``)::

    .venv/bin/python benchmarks/table1.py --quick --device cpu
    python benchmarks/table1.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tcompose.evaluate.detect import OwlVitDetector
from tcompose.evaluate.fid.clip_score import ClipScorer
from tcompose.evaluate.fid.inception import FidInceptionV3, TinyFeatureNet
from tcompose.data.clip_bpe import find_clip_bpe
from tcompose.testing.tiny_detectors import write_tiny_owlvit
from tcompose.testing.tiny_vision import write_tiny_clip


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, rounds: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rows(name: str, call, images: np.ndarray, batch_sizes: list[int], device: str, rounds: int) -> list[dict]:
    out = []
    for b in batch_sizes:
        s = timed(lambda: call(images[:b]), device, rounds)
        out.append({"scorer": name, "batch": b, "images_per_s": round(b / s, 3),
                    "hours_per_10k_images": round(10_000 / (b / s) / 3600, 3)})
        print(f"{name:>10} batch {b:>3}: {b / s:8.2f} images/s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="Tiny models, 64 px images.")
    ap.add_argument("--batch-sizes", default=None, help="Comma-separated (default 1,16; --quick 1,4).")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None, help="Also write the JSON here.")
    args = ap.parse_args(argv)
    device = args.device
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,4" if args.quick else "1,16")).split(",")]
    side = 64 if args.quick else 512
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (max(batch_sizes), side, side, 3), dtype=np.uint8)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        bpe = find_clip_bpe()
        owl_dir = write_tiny_owlvit(Path(tmp) / "owlvit", bpe, size="tiny" if args.quick else "base")
        det = OwlVitDetector.load(str(owl_dir), device=device, dtype="auto")
        queries = [["cat", "dog"]] * len(images)
        results += rows("owlvit", lambda x: det.detect(list(x), queries[:len(x)], 0.1), images, batch_sizes, device,
                        args.rounds)
        net = (TinyFeatureNet(seed=0) if args.quick else FidInceptionV3()).to(device).eval()
        nchw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        results += rows("inception", lambda x: net.features(x), nchw, batch_sizes, device, args.rounds)
        clip_dir = write_tiny_clip(Path(tmp) / "clip", bpe, size="tiny" if args.quick else "vit-l")
        scorer = ClipScorer.load(str(clip_dir), device=device)
        captions = ["a photo of a cat and a dog"] * len(images)
        results += rows("clip", lambda x: scorer.score(list(x), captions[:len(x)]), images, batch_sizes, device,
                        args.rounds)
    report = {"device": device, "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else
              platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "quick": args.quick,
              "image_side": side, "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
