"""Detection's share of a MultiGen run, OWLv2's throughput at its native size, and the cost of preprocessing.

1. ``run``: one whole :func:`tcompose.evaluate.multigen.stage.run` on random models written to disk (generation through
   ``tcompose.evaluate.generate``, then detection), timed by the run itself: ``generation_s`` (the image loop, model
   loading excluded), ``detection_s`` (PNG decoding, preprocessing, OWLv2 and writing the detections; detector
   loading excluded). Figure of merit: ``detection_over_generation = detection_s / generation_s``, target <= 0.10.
2. ``detector``: :meth:`tcompose.evaluate.detect.Owlv2Detector.detect` alone on batches of generated-size images with 5
   queries each, images/s per batch size (median of ``--rounds`` after a warmup; CUDA synchronised).
3. ``preprocess``: ms per image of this project's torch preprocessing against transformers'
   ``Owlv2ImageProcessorPil`` (scipy, one CPU core), same images, same output size.

Prints one JSON object to stdout (and to ``--json PATH``), a summary to stderr::

    .venv/bin/python benchmarks/multigen.py --device cpu                  # tiny models: 32 px images, 64 px OWLv2
    python benchmarks/multigen.py --device cuda --real-size               # SD1.4 shapes, 512 px; OWLv2-L/14, 1008 px

``--real-size``: UNet, VAE and text encoder with SD1.4's shapes (random weights) and OWLv2-L/14's architecture
(``owlv2-large-patch14-ensemble``: ViT-L/14 at 1008 px, 5,184 boxes), random weights; nothing is downloaded.
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

import numpy as np
import torch

from tcompose.data.categories import COCO_80
from tcompose.evaluate.detect import Owlv2Detector
from tcompose.evaluate.multigen.prompts import sample_prompts
from tcompose.evaluate.multigen.stage import MultigenConfig, run
from tcompose.evaluate.settings import GenerationSettings
from tcompose.data.clip_bpe import find_clip_bpe, write_clip_tokenizer
from tcompose.testing.tiny_sd import write_tiny_pipeline
from tcompose.testing.tiny_detectors import build_owlv2, write_tiny_owlv2


def write_models(root: Path, real: bool) -> tuple[Path, Path]:
    """A Stable Diffusion folder and an OWLv2 folder, random weights: tiny, or the real architectures."""
    corpus = [p.text for p in sample_prompts(COCO_80, 50, seed=0)]
    bpe = find_clip_bpe()
    if not real:
        sd = write_tiny_pipeline(root / "sd", tokenizer_source=bpe, corpus=corpus)
        return sd, write_tiny_owlv2(root / "owl", bpe)
    from tcompose.testing.tiny_sd import SD_TEXT, SD_VAE, build_tiny_text_encoder, build_tiny_vae

    sd = write_tiny_pipeline(root / "sd", tokenizer_source=bpe, corpus=corpus, size="sd14")
    vocab = json.loads((sd / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    for sub in ("vae", "text_encoder"):
        shutil.rmtree(sd / sub)
    build_tiny_vae(1, **SD_VAE).save_pretrained(sd / "vae", safe_serialization=True)
    eos = vocab["<|endoftext|>"]
    build_tiny_text_encoder(len(vocab), 2, bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos,
                            **SD_TEXT).save_pretrained(sd / "text_encoder", safe_serialization=True)
    owl = root / "owl"
    write_clip_tokenizer(owl, bpe_path=bpe, corpus=None if bpe else corpus)
    cfg = json.loads((owl / "tokenizer_config.json").read_text())
    (owl / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 16}))
    owl_vocab = json.loads((owl / "vocab.json").read_text(encoding="utf-8"))
    build_owlv2("large", 0, vocab_size=len(owl_vocab), bos_token_id=owl_vocab["<|startoftext|>"],
                eos_token_id=owl_vocab["<|endoftext|>"]).save_pretrained(owl, safe_serialization=True)
    return sd, owl


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_detector(det: Owlv2Detector, side: int, batch_sizes: list[int], rounds: int, device: str) -> list[dict]:
    rng = np.random.default_rng(0)
    prompts = sample_prompts(COCO_80, max(batch_sizes), seed=1)
    out = []
    for b in batch_sizes:
        images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(b)]
        names = [p.categories for p in prompts[:b]]
        det.detect(images, names)  # warmup
        times = []
        for _ in range(rounds):
            sync(device)
            t0 = time.perf_counter()
            det.detect(images, names)
            sync(device)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        out.append({"batch_size": b, "s_per_batch": round(med, 5), "images_per_s": round(b / med, 3)})
    return out


def bench_preprocess(det: Owlv2Detector, side: int, n: int, device: str) -> dict:
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]
    proc = Owlv2ImageProcessorPil(size={"height": det.image_size, "width": det.image_size})
    det.preprocess(images[:1])
    sync(device)
    t0 = time.perf_counter()
    ours = det.preprocess(images)
    sync(device)
    t_ours = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    ref = proc(images=images, return_tensors="pt")["pixel_values"]
    t_ref = (time.perf_counter() - t0) / n
    diff = (ours.float().cpu() - ref).abs().max().item()
    return {"images": n, "input_side": side, "output_side": det.image_size, "ms_per_image_ours": round(1e3 * t_ours, 3),
            "ms_per_image_transformers_pil": round(1e3 * t_ref, 3), "max_abs_diff": diff}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--real-size", action="store_true", help="SD1.4 and OWLv2-L/14 architectures (random weights)")
    p.add_argument("--prompts", type=int, default=None, help="prompts of the run (default 4 tiny, 8 real)")
    p.add_argument("--images", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 10 tiny, 50 real)")
    p.add_argument("--size", type=int, default=None, help="image side (default 32 tiny, 512 real)")
    p.add_argument("--dtype", default=None, help="generation dtype (default fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--detector-dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16")
    p.add_argument("--batch-size", type=int, default=None, help="generation batch (default 4 tiny, 8 real)")
    p.add_argument("--detector-batch-size", type=int, default=8, help="detector batch in the run")
    p.add_argument("--detector-batch-sizes", default="1,8", help="batch sizes of the detector-only measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    real = args.real_size
    args.prompts = args.prompts or (8 if real else 4)
    args.steps = args.steps or (50 if real else 10)
    args.size = args.size or (512 if real else 32)
    args.batch_size = args.batch_size or (8 if real else 4)
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    args.detector_batch_sizes = [int(b) for b in args.detector_batch_sizes.split(",") if b.strip()]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tmp = Path(tempfile.mkdtemp(prefix="tcompose-bench-multigen-"))
    t0 = time.perf_counter()
    try:
        sd, owl = write_models(tmp, args.real_size)
        settings = GenerationSettings(steps=args.steps, height=args.size, width=args.size, dtype=args.dtype,
                                      batch_size=args.batch_size, device=args.device)
        cfg = MultigenConfig(models=[f"bench={sd}"], output=tmp / "run", sample_seed=0, prompts=args.prompts,
                             images=args.images, settings=settings, detector=str(owl),
                             detector_dtype=args.detector_dtype, detector_batch_size=args.detector_batch_size, grid=0)
        summary = run(cfg, progress=False)
        det = Owlv2Detector.load(str(owl), device=args.device, dtype=args.detector_dtype)
        detector = bench_detector(det, args.size, args.detector_batch_sizes, args.rounds, args.device)
        preprocess = bench_preprocess(det, args.size, 8 if not args.real_size else 4, args.device)
        params = sum(p.numel() for p in det.model.parameters())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    timing = summary["timing"]
    report = {
        "device": args.device,
        "device_name": (torch.cuda.get_device_name() if args.device == "cuda"
                        else platform.processor() or platform.machine()),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "real_size": args.real_size,
        "image_side": args.size, "detector_side": det.image_size, "detector_params_m": round(params / 1e6, 1),
        "prompts": args.prompts, "images_per_prompt": args.images, "steps": args.steps, "dtype": args.dtype,
        "detector_dtype": str(det.dtype).replace("torch.", ""),
        "detection_over_generation": timing["detection_over_generation"],
        "run": {**timing, "generation_images_per_s": summary["generation"]["bench"].get("images_per_s")},
        "detector": detector, "preprocess": preprocess, "wall_s": round(time.perf_counter() - t0, 1),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    r = report["run"]
    print(f"# {report['device']} ({report['device_name']}), {'real-size' if args.real_size else 'tiny'}: "
          f"{args.prompts} prompts x {args.images} images, {args.size} px, {args.steps} steps", file=sys.stderr)
    print(f"run: generation {r['generation_s']:.2f} s ({r['generation_images_per_s']} img/s), detection "
          f"{r['detection_s']:.2f} s ({r['detection_images_per_s']} img/s) -> detection / generation = "
          f"{report['detection_over_generation']}", file=sys.stderr)
    for d in detector:
        print(f"detector alone, batch {d['batch_size']}: {d['images_per_s']} img/s at {det.image_size} px",
              file=sys.stderr)
    print(f"preprocess: {preprocess['ms_per_image_ours']} ms/img (ours) vs "
          f"{preprocess['ms_per_image_transformers_pil']} ms/img (transformers PIL backend), "
          f"max |diff| {preprocess['max_abs_diff']:.2e}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
