"""InfoNCE: a float64 recomputation by hand, transformers' CLIP loss, the label-deduplicated variant, and the
loss gathered over 2 processes (gloo) against the single-process loss on the concatenated batch."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tcompose.clip.loss import distributed_info_nce, gather_with_grad, info_nce, info_nce_local


def hand_info_nce(img, txt, scale, labels=None):
    """Loops in float64: symmetric cross-entropy; with labels, targets uniform over same-label columns."""
    img = [v.double() / v.double().norm() for v in img]
    txt = [v.double() / v.double().norm() for v in txt]
    n = len(img)
    total = 0.0
    for a, b in ((img, txt), (txt, img)):
        for i in range(n):
            logits = [float(scale) * float(a[i] @ b[j]) for j in range(n)]
            top = max(logits)
            log_z = top + math.log(sum(math.exp(x - top) for x in logits))
            pos = [j for j in range(n) if (j == i if labels is None else labels[j] == labels[i])]
            total += -sum(logits[j] - log_z for j in pos) / len(pos) / n
    return total / 2


def embeddings(n=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_info_nce_equals_float64_loops(scale):
    img, txt = embeddings()
    got = info_nce(img, txt, torch.tensor(scale))
    assert got.dtype == torch.float32
    assert abs(float(got) - hand_info_nce(img, txt, scale)) < 1e-4 * max(1.0, scale / 10)
    got64 = info_nce(img.double(), txt.double(), scale)
    assert got64.dtype == torch.float64 and abs(float(got64) - hand_info_nce(img, txt, scale)) < 1e-10


def test_info_nce_equals_transformers_clip_loss():
    from tcompose.testing.tiny_vision import build_clip

    model = build_clip("tiny", seed=1, vocab_size=200).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(6, 3, 32, 32, generator=g)
    ids = torch.randint(0, 197, (6, 12), generator=g)
    ids[:, 0], ids[:, -1] = 198, 199  # <|startoftext|> ... <|endoftext|>
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
    ours = info_nce(out.image_embeds, out.text_embeds, model.logit_scale.exp())
    assert torch.allclose(ours, out.loss, atol=1e-6), (float(ours), float(out.loss))
    # and on unnormalised features (info_nce normalises itself)
    with torch.no_grad():
        raw_img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        raw_txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    assert torch.allclose(info_nce(raw_img, raw_txt, model.logit_scale.exp()), out.loss, atol=1e-6)


def test_dedupe_labels_against_loops_and_plain():
    img, txt = embeddings(n=10, seed=3)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 4, 2, 5])
    got = info_nce(img, txt, 12.0, labels=labels)
    assert abs(float(got) - hand_info_nce(img, txt, 12.0, labels.tolist())) < 1e-5
    assert abs(float(got) - float(info_nce(img, txt, 12.0))) > 1e-3  # distinct captions of one label: a different loss
    # distinct labels: exactly the plain loss
    assert torch.allclose(info_nce(img, txt, 12.0, labels=torch.arange(10)), info_nce(img, txt, 12.0), atol=1e-6)


def test_dedupe_equals_plain_when_a_label_has_one_caption():
    """With identical captions per label (the crops stage's "a photo of a {category}") the plain loss already
    treats duplicates as the uniform-target variant does: same value, same gradients."""
    img, txt = embeddings(n=9, seed=4)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 0])
    txt = txt[labels]  # one text embedding per label
    a, b = img.clone().requires_grad_(), img.clone().requires_grad_()
    plain, dedup = info_nce(a, txt, 9.0), info_nce(b, txt, 9.0, labels=labels)
    plain.backward()
    dedup.backward()
    assert torch.allclose(plain, dedup, atol=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_local_slices_average_to_the_whole_batch():
    img, txt = embeddings(n=12, seed=5)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0, 4, 5, 0])
    for lab in (None, labels):
        whole = info_nce(img, txt, 7.0, labels=lab)
        parts = [info_nce_local(img[i : i + 4], txt[i : i + 4], img, txt, 7.0, i, None if lab is None else lab[i : i + 4], lab)
                 for i in (0, 4, 8)]
        assert torch.allclose(torch.stack(parts).mean(), whole, atol=1e-6)


def test_bad_shapes_are_refused():
    img, txt = embeddings(n=4)
    with pytest.raises(ValueError, match="both be"):
        info_nce(img, txt[:3], 1.0)
    with pytest.raises(ValueError, match="offset"):
        info_nce_local(img, txt, img, txt, 1.0, 2)
    with pytest.raises(ValueError, match="rank"):
        gather_with_grad(img, 1, 1)
    assert gather_with_grad(img, 0, 1) is img


# ------------------------------------------------------------------------------------- two processes, gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, img, txt, labels, scale, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        b = img.shape[0] // world
        sl = slice(rank * b, (rank + 1) * b)
        for name, lab in (("plain", None), ("dedupe", labels)):
            x, y = img[sl].clone().requires_grad_(), txt[sl].clone().requires_grad_()
            s = torch.tensor(scale, requires_grad=True)
            loss = distributed_info_nce(x, y, s, rank=rank, world_size=world, labels=None if lab is None else lab[sl])
            loss.backward()
            results[(name, rank)] = (loss.detach(), x.grad, y.grad, s.grad)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_concatenated_batch():
    img, txt = embeddings(n=8, d=6, seed=7)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2])
    world, scale = 2, 11.0
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), img, txt, labels, scale, results), nprocs=world, join=True)
        results = dict(results)
    for name, lab in (("plain", None), ("dedupe", labels)):
        x, y = img.clone().requires_grad_(), txt.clone().requires_grad_()
        s = torch.tensor(scale, requires_grad=True)
        single = info_nce(x, y, s, labels=lab)
        single.backward()
        ranks = [results[(name, r)] for r in range(world)]
        # the mean of the local losses is the global loss (what DDP's averaging sees)
        assert torch.allclose(torch.stack([r[0] for r in ranks]).mean(), single.detach(), atol=1e-6), name
        # each rank's embedding gradient, after DDP divides by the world size, is the global loss's
        gx = torch.cat([r[1] for r in ranks]) / world
        gy = torch.cat([r[2] for r in ranks]) / world
        assert torch.allclose(gx, x.grad, atol=1e-6), name
        assert torch.allclose(gy, y.grad, atol=1e-6), name
        assert torch.allclose(torch.stack([r[3] for r in ranks]).mean(), s.grad, atol=1e-6), name


# ------------------------------------------------------------------------- train-clip under accelerate launch


@pytest.mark.slow
def test_train_clip_two_processes_equal_one_process_with_doubled_batch(tmp_path):
    """``accelerate launch --num_processes 2`` x batch 8 trains the weights that 1 process x batch 16 trains."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file
    from test_train_clip import SHAPES, write_crops

    from tcompose.clip.config import TrainClipConfig
    from tcompose.clip.loop import run
    from tcompose.testing.tiny_vision import write_tiny_clip

    crops = write_crops(tmp_path / "crops", n_images=40)
    base = write_tiny_clip(tmp_path / "clip", corpus=[f"a photo of a {n}" for n, _ in SHAPES.values()])
    common = ["--data", str(crops), "--model", str(base), "--max-steps", "3", "--lr", "5e-3", "--warmup-steps", "1",
              "--num-workers", "0", "--eval-fraction", "0", "--checkpoint-every", "0", "--log-every", "1"]
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "tcompose", "train-clip",
           "--output", str(tmp_path / "two"), "--batch-size", "8", *common]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(TrainClipConfig(data=crops, output=tmp_path / "one", model=str(base), batch_size=16, max_steps=3, lr=5e-3,
                            warmup_steps=1, num_workers=0, eval_fraction=0.0, checkpoint_every=0, log_every=1, progress=False))
    finally:
        torch.set_num_threads(threads)
    two = json.loads((tmp_path / "two" / "training_summary.json").read_text())
    one = json.loads((tmp_path / "one" / "training_summary.json").read_text())
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert two["final"]["loss"] == pytest.approx(one["final"]["loss"], rel=1e-5)
    a, b, w0 = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two", "clip"))
    assert max((a[k] - w0[k]).abs().max().item() for k in a) > 1e-3  # training moved the weights
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    # Adam moves a weight whose gradient is ~0 (e.g. attention key biases) by up to lr on float noise alone
    assert diff.max().item() < 0.01 * 5e-3 and diff.mean().item() < 1e-7, (diff.max(), diff.mean())
