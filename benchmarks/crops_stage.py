"""Throughput of the crops stage (``tcompose crops``) with 1 and 2 worker processes.

Each measurement is one whole ``tcompose.crops.run`` into a fresh folder (reading the annotations, decoding,
cutting, resizing and JPEG-encoding every crop, writing the Parquet shards and the manifest; with several
workers, starting the spawn pool too), so it is what a user waits for. Worker counts alternate inside each
repeat and the order flips every repeat, so drift on the machine hits all of them; the reported figure is the
median over ``--repeats``. Input: the real COCO sample under ``$TCOMPOSE_TEST_DATA/coco-mini-val2017`` when
that is set (or ``--coco-dir``), else synthetic scenes from :mod:`tcompose.data.synthetic` (256 px, objects of
64-97 px, so they pass the default ``--min-area``). Prints one JSON object::

    .venv/bin/python benchmarks/crops_stage.py                      # 1 and 2 workers, 3 repeats
    .venv/bin/python benchmarks/crops_stage.py --workers 1,2,4 --repeats 5 --masked --json crops.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _input(args, tmp: Path) -> tuple[Path, str, str]:
    if args.coco_dir:
        return Path(args.coco_dir), args.split, "coco"
    root = os.environ.get("TCOMPOSE_TEST_DATA")
    if root and (Path(root) / "coco-mini-val2017").is_dir():
        return Path(root) / "coco-mini-val2017", "val2017", "coco-mini-val2017"
    from tcompose.data.synthetic import make_scenes

    make_scenes(tmp / "scenes", n_images=args.synthetic_images, size=256, seed=0)
    return tmp / "scenes", "train2017", f"synthetic ({args.synthetic_images} scenes, 256 px)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--coco-dir", help="COCO-format folder (default: the test data's COCO sample, else synthetic)")
    parser.add_argument("--split", default="val2017", help="split of --coco-dir")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--masked", action="store_true")
    parser.add_argument("--synthetic-images", type=int, default=120)
    parser.add_argument("--json", help="also write the JSON here")
    args = parser.parse_args(argv)

    from tcompose.crops.stage import CropsConfig, run

    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    times: dict[int, list[float]] = {w: [] for w in workers}
    counts: dict[int, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory(prefix="crops-bench-") as tmp:
        coco_dir, split, source = _input(args, Path(tmp))
        for r in range(args.repeats):
            for w in workers if r % 2 == 0 else workers[::-1]:
                cfg = CropsConfig(coco_dir, Path(tmp) / f"out-{r}-{w}", split=split, limit=args.limit,
                                  size=args.size, masked=args.masked, workers=w)
                t0 = time.perf_counter()
                manifest = run(cfg, progress=False)
                times[w].append(time.perf_counter() - t0)
                counts[w] = (manifest["stats"]["images"], manifest["num_rows"])
    if len({c for c in counts.values()}) != 1:
        raise SystemExit(f"worker counts wrote different datasets: {counts}")
    images, crops = counts[workers[0]]
    results = []
    for w in workers:
        med = statistics.median(times[w])
        results.append({"workers": w, "wall_s": round(med, 3), "images_per_s": round(images / med, 2),
                        "crops_per_s": round(crops / med, 2), "wall_s_all": [round(t, 3) for t in times[w]]})
    out = {
        "input": source, "images": images, "crops": crops, "size": args.size, "masked": args.masked,
        "repeats": args.repeats, "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(), "results": results,
    }
    if len(workers) > 1:
        out["speedup"] = round(results[0]["wall_s"] / results[-1]["wall_s"], 3)  # first vs last worker count
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
