"""Images/s of the masks stage (``--source grounded-sam``), and where its time goes.

It runs the real stage, :func:`tcompose.masks.run` (loader workers, GroundingDINO, SAM / SAM-HQ, PNG
encoding, Parquet shards), on generated COCO-format images (random coloured rectangles, captions naming
3 to 5 objects) with random-initialised models saved to a temporary folder:

- default: the tiny test models of :mod:`tcompose.testing.tiny_vision` (CPU-sized; the figure measures the plumbing);
- ``--real-size``: GroundingDINO-T (Swin-T + BERT-base, 900 queries) and SAM-HQ ViT-H (``--segmenter-kind
  sam``: SAM ViT-H) at their real input sizes (800 px shortest edge, 1024 px), built from configs, nothing
  downloaded.

Random weights keep an arbitrary number of boxes (the real-size pair keeps ~70 per image at the default
thresholds 0.25, against ~5-15 for the trained models on COCO); SAM's decoder time grows with it, so the JSON
reports ``boxes_per_image`` and ``--box-threshold`` / ``--text-threshold`` move it.

Timing: one untimed warm-up run (``--warmup-images``, CUDA init, kernels), then the timed run. Each main-
process part is timed by wrapping it (CUDA synchronised before and after): ``detector`` (GroundingDINO
forward + box mapping), ``sam_encoder`` (SAM image encoder), ``sam_decoder`` (prompt encoder, mask
decoder, upsampling to the image, per box), ``union`` (OR per phrase, to numpy), ``write`` (Parquet shards),
``clip`` (``--captions clip-best``); ``waiting`` is the rest of the loop: the main process waiting for the
loader's workers (decoding, preprocessing) or for the PNG threads at a shard's end, plus Python glue.
``share`` divides each by the loop's time. PNG encoding of the masks and row building run in threads beside
the models; their summed thread time is ``rows_thread_seconds`` (not part of the shares).
Prints one JSON object (also to ``--json PATH``)::

    .venv/bin/python benchmarks/masks_stage.py --images 24 --batch-size 4 --workers 2
    python benchmarks/masks_stage.py --device cuda --real-size --dtype fp16 --batch-size 16 --workers 8 --images 512
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

OBJECTS = ["ball", "cup", "kite", "dog", "cat", "bottle", "chair", "umbrella", "car", "bird", "bowl", "clock"]
COLOURS = {"red": (200, 30, 30), "green": (30, 160, 60), "blue": (40, 60, 200), "yellow": (220, 200, 40)}


def make_images(root: Path, n: int, width: int, height: int, seed: int = 0) -> Path:
    """A COCO-format folder (split ``bench``): ``n`` JPEGs of coloured rectangles, 2 captions each."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "bench").mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(1, n + 1):
        im = Image.new("RGB", (width, height), (rng.randint(80, 180),) * 3)
        draw = ImageDraw.Draw(im)
        names = rng.sample(OBJECTS, rng.randint(3, 5))
        for _ in names:
            w, h = rng.randint(width // 8, width // 3), rng.randint(height // 8, height // 3)
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            draw.rectangle([x, y, x + w, y + h], fill=rng.choice(list(COLOURS.values())))
        name = f"{i:012d}.jpg"
        im.save(root / "bench" / name, quality=90)
        images.append({"id": i, "file_name": name, "width": width, "height": height})
        colours = list(COLOURS)
        text = ", ".join(f"a {rng.choice(colours)} {o}" for o in names[:-1]) + f" and a {names[-1]} on a table"
        anns += [{"id": 2 * i, "image_id": i, "caption": text},
                 {"id": 2 * i + 1, "image_id": i, "caption": f"a photo of a {names[0]} next to a {names[1]}"}]
    (root / "annotations" / "captions_bench.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


def write_models(root: Path, real: bool, hq: bool, dtype: torch.dtype) -> tuple[Path, Path]:
    from tcompose.testing import tiny_vision as tv

    if not real:
        return tv.write_tiny_grounding_dino(root / "gd", words=OBJECTS), tv.write_tiny_sam(root / "sam", hq=hq)
    from transformers import GroundingDinoProcessor, SamHQProcessor, SamProcessor
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil
    from transformers.models.sam import SamImageProcessorPil

    tok = tv.bert_tokenizer(OBJECTS)
    tv.build_grounding_dino("real", seed=0).to(dtype).save_pretrained(root / "gd")
    GroundingDinoProcessor(GroundingDinoImageProcessorPil(), tok).save_pretrained(root / "gd")
    tv.build_sam("real", hq=hq, seed=0).to(dtype).save_pretrained(root / "sam")
    (SamHQProcessor if hq else SamProcessor)(SamImageProcessorPil()).save_pretrained(root / "sam")
    return root / "gd", root / "sam"


def instrument(device: torch.device) -> dict[str, float]:
    """Wrap the stage's main-process parts with timers; returns the dict they add seconds to."""
    from tcompose.io import datasets
    from tcompose.masks import caption_choice, grounded_sam, grounding_dino, segment
    from tcompose.masks import rows as masks_rows

    spent: dict[str, float] = defaultdict(float)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(owner, name: str, part: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            sync()
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                spent[part] += time.perf_counter() - t

        setattr(owner, name, wrapper)

    timed(grounding_dino.Detector, "detect", "detector")
    timed(segment.Segmenter, "embed", "sam_encoder")
    timed(segment.Segmenter, "segment", "_segment")  # encoder + decoder; decoder = the difference
    timed(grounded_sam, "union_by_label", "union")
    timed(masks_rows, "item_rows", "rows_threads")  # runs in the PNG threads, overlapping the rest
    timed(datasets.ShardedWriter, "write_shard", "write")
    timed(caption_choice.ClipScorer, "best", "clip")
    return spent


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--real-size", action="store_true", help="GroundingDINO-T + SAM-HQ ViT-H (random weights)")
    p.add_argument("--segmenter-kind", choices=("sam_hq", "sam"), default="sam_hq")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--warmup-images", type=int, default=None, help="default: one batch")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--captions", choices=("first", "all"), default="first")
    p.add_argument("--box-threshold", type=float, default=0.25)
    p.add_argument("--text-threshold", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tcompose.masks.config import MasksConfig, model_dtype
    from tcompose.masks.stage import run

    device = torch.device(args.device)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="masks-bench-") as tmp:
        root = Path(tmp)
        n_warm = args.warmup_images or args.batch_size
        data = make_images(root / "coco", n_warm + args.images, args.width, args.height)
        probe = MasksConfig(data, root / "x", dtype=args.dtype, device=str(device))
        gd, sam = write_models(root / "models", args.real_size, args.segmenter_kind == "sam_hq", model_dtype(probe)[0])
        (root / "warm.txt").write_text("\n".join(str(i) for i in range(1, n_warm + 1)))
        (root / "timed.txt").write_text("\n".join(str(i) for i in range(n_warm + 1, n_warm + args.images + 1)))

        def cfg(ids: str, out: str) -> MasksConfig:
            return MasksConfig(data, root / out, split="bench", source="grounded-sam", detector=str(gd),
                               segmenter=str(sam), captions=args.captions, image_ids=root / ids,
                               batch_size=args.batch_size, dtype=args.dtype, workers=args.workers,
                               box_threshold=args.box_threshold, text_threshold=args.text_threshold,
                               device=str(device), shard_size=max(args.images, 1))

        run(cfg("warm.txt", "warm"), progress=False)
        spent = instrument(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        manifest = run(cfg("timed.txt", "timed"), progress=False)
    tp, s = manifest["throughput"], manifest["stats"]
    parts = dict(spent)
    threads = parts.pop("rows_threads", 0.0)
    parts["sam_decoder"] = parts.pop("_segment", 0.0) - parts.get("sam_encoder", 0.0)
    parts["waiting"] = max(tp["seconds"] - sum(parts.values()), 0.0)
    result = {
        "images_per_s": tp["images_per_s"], "seconds": tp["seconds"], "images": tp["images"],
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "real_size": args.real_size, "segmenter": args.segmenter_kind, "dtype": args.dtype,
        "effective_dtype": manifest["config"].get("dtype"), "batch_size": args.batch_size, "workers": args.workers,
        "image_size": [args.width, args.height], "captions": args.captions,
        "thresholds": [args.box_threshold, args.text_threshold],
        "boxes_per_image": round(s["boxes"] / max(s["images"], 1), 2),
        "phrases_per_image": round(s["phrases"] / max(s["images"], 1), 2),
        "seconds_by_part": {k: round(v, 3) for k, v in sorted(parts.items())},
        "share": {k: round(v / tp["seconds"], 3) for k, v in sorted(parts.items())} if tp["seconds"] else {},
        "rows_thread_seconds": round(threads, 3),
        "peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
        "wall_s": round(time.monotonic() - t0, 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
