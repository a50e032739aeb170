"""Several processes through `accelerate launch` (gloo on CPU) give what one process gives.

Each test starts two real processes, as a user's `accelerate launch --num_processes 2 -m tcompose ...` does.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tcompose.testing.tiny_sd import write_tiny_pipeline
from tcompose.train.config import TrainUnetConfig
from tcompose.train.loop import run as train

from helpers import make_training_setup

pytestmark = pytest.mark.slow

RES = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(args: list[str], n: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes n -m tcompose ARGS`` (gloo on CPU), one thread per process."""
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "tcompose", *args]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    return make_training_setup(tmp_path_factory.mktemp("mp"), n_images=16, seed=1, captions="first")


def test_train_unet_two_processes_equal_one_process_with_doubled_batch(train_setup, tmp_path):
    common = dict(data=train_setup["masks"], model=str(train_setup["base"]), resolution=RES, grad_accum=2,
                  max_steps=3, lr=1e-3, lambda_token=1.0, gamma_pixel=0.1, num_workers=0, checkpoint_every=0,
                  eval_fraction=0.0, progress=False, log_every=1)
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainUnetConfig(output=one, batch_size=2, **common))
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    accelerate_launch([
        "train-unet", "--data", str(train_setup["masks"]), "--output", str(two), "--model", str(train_setup["base"]),
        "--resolution", str(RES), "--batch-size", "1", "--grad-accum", "2", "--max-steps", "3", "--lr", "1e-3",
        "--lambda", "1.0", "--gamma", "0.1", "--num-workers", "0", "--checkpoint-every", "0", "--eval-fraction", "0",
        "--log-every", "1",
    ])
    summary = json.loads((two / "training_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 3
    assert summary["ranks_in_sync"] is True  # both processes ended with bit-identical weights
    a = load_file(one / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(two / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_file(train_setup["base"] / "unet" / "diffusion_pytorch_model.safetensors")
    moved = max((a[k] - base[k]).abs().max().item() for k in a)
    assert moved > 1e-4  # training changed the weights, so the comparison below means something
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    # Adam divides by sqrt(v): a weight whose gradient is ~0 moves by up to lr per step on float noise alone.
    # The bound is the lr for the worst weight (seen: 0.15 lr), and 1% of it for all but 1 in 10,000 weights; a
    # real difference (other examples, other noise) moves most weights by a good part of the lr.
    assert diff.max().item() < 1e-3, f"2 processes x batch 1 differ from 1 process x batch 2 by {diff.max()}"
    assert torch.quantile(diff, 0.9999).item() < 1e-5, f"99.99th percentile of the difference {torch.quantile(diff, 0.9999)}"
    assert diff.mean().item() < 1e-7, f"mean difference {diff.mean()}"
    one_losses = json.loads((one / "training_summary.json").read_text())["final_losses"]
    for k, v in summary["final_losses"].items():
        assert v == pytest.approx(one_losses[k], rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def gen_setup(tmp_path_factory):
    from tcompose.data.categories import COCO_80
    from tcompose.evaluate.multigen.prompts import sample_prompts
    from tcompose.testing.tiny_detectors import write_tiny_owlv2

    root = tmp_path_factory.mktemp("mpgen")
    corpus = [p.text for p in sample_prompts(COCO_80, 20, seed=0)]
    return {"sd": write_tiny_pipeline(root / "sd", corpus=corpus, seed=0), "owl": write_tiny_owlv2(root / "owl"),
            "prompts": corpus}


def pngs(folder: Path) -> dict:
    import numpy as np
    from PIL import Image

    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("*.png"))}


def same_images(a: dict, b: dict) -> bool:
    """Same files, same pixels up to one grey level on a few values (the processes run other thread counts,
    so float sums round differently; the seeds and the work split are what is tested)."""
    assert a.keys() == b.keys() and a
    for name in a:
        diff = abs(a[name] - b[name])
        assert diff.max() <= 1 and (diff > 0).mean() < 0.005, name
    return True


def test_generate_two_processes_write_the_files_of_one(gen_setup, tmp_path):
    from tcompose.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(gen_setup["prompts"][:3]) + "\n")
    args = ["generate", "--model", str(gen_setup["sd"]), "--prompts", str(prompts), "--images-per-prompt", "2",
            "--batch-size", "1", "--steps", "2", "--height", "32", "--width", "32", "--dtype", "fp32"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    accelerate_launch([*args, "--output", str(tmp_path / "two")])
    one, two = pngs(tmp_path / "one" / "images"), pngs(tmp_path / "two" / "images")
    assert len(one) == 6 and same_images(one, two)
    import pyarrow.parquet as pq

    cols = ["prompt_id", "image_index", "seed", "prompt", "file"]
    assert pq.read_table(tmp_path / "two" / "generations.parquet", columns=cols).to_pylist() == \
        pq.read_table(tmp_path / "one" / "generations.parquet", columns=cols).to_pylist()


def test_multigen_two_processes_score_as_one(gen_setup, tmp_path):
    from tcompose.cli import main

    args = ["multigen", "--model", f"A={gen_setup['sd']}", "--sample-seed", "0", "--prompts", "3", "--images", "2",
            "--steps", "2", "--height", "32", "--width", "32", "--batch-size", "1", "--dtype", "fp32",
            "--detector", str(gen_setup["owl"]), "--detector-batch-size", "1", "--detector-dtype", "fp32",
            "--grid", "0"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    accelerate_launch([*args, "--output", str(tmp_path / "two")])
    a = json.loads((tmp_path / "one" / "summary.json").read_text())
    b = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert a["models"]["A"] == b["models"]["A"] and a["models"]["A"]["images"] == 6
    from tcompose.evaluate.detection_store import read_records

    da, db = read_records(tmp_path / "one" / "detections" / "A"), read_records(tmp_path / "two" / "detections" / "A")
    assert da.keys() == db.keys() and all(da[k]["labels"] == db[k]["labels"] for k in da)
    assert same_images(pngs(tmp_path / "one" / "models" / "A" / "images"), pngs(tmp_path / "two" / "models" / "A" / "images"))


def test_masks_two_processes_write_the_rows_of_one(train_setup, tmp_path):
    import pyarrow.parquet as pq

    from tcompose.cli import main

    scenes = Path(train_setup["masks"]).parent / "scenes"
    args = ["masks", str(scenes), "--source", "coco-gt", "--split", "train2017", "--shard-size", "3"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    accelerate_launch([*args, "--output", str(tmp_path / "two")])
    def rows(d):
        return [r for f in sorted(d.glob("train-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert rows(tmp_path / "one") == rows(tmp_path / "two") and len(rows(tmp_path / "one")) > 0
    m1 = json.loads((tmp_path / "one" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m1["stats"] == m2["stats"] and m2["run"]["world_size"] == 2
