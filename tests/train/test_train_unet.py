"""train-unet end to end on the synthetic scenes: resume, batching, learning, data preparation, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tcompose.cli import app
from tcompose.grounding.objective import tokencompose_losses
from tcompose.io.datasets import ShardedWriter, encode_mask, image_struct
from tcompose.models.families import load_components
from tcompose.testing.tiny_sd import build_tiny_text_encoder
from tcompose.train.config import TrainUnetConfig
from tcompose.train.examples import TrainingExamples, collate, prepare_rows
from tcompose.train.loop import run as train

from helpers import make_training_setup, tiny_train_config

RES = 32  # training resolution of these tests: 16x16 latents, attention maps of 16x16 and 8x8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_training_setup(tmp_path_factory.mktemp("train"), n_images=40, seed=0)


def small(setup, output, **kw) -> TrainUnetConfig:
    return tiny_train_config(setup, output, **({"grad_accum": 2, "max_steps": 6, "eval_fraction": 0.1,
                                                "eval_max_examples": 4} | kw))


def unet_weights(run_dir: Path) -> dict:
    return load_file(run_dir / "unet" / "diffusion_pytorch_model.safetensors")


def test_exact_resume_in_a_new_process(setup, tmp_path):
    straight = tmp_path / "straight"
    train(small(setup, straight, use_ema=True, ema_decay=0.9))
    resumed = tmp_path / "resumed"
    train(small(setup, resumed, max_steps=3, use_ema=True, ema_decay=0.9))
    assert (resumed / "checkpoints" / "step-000003" / "state.json").exists()
    cmd = [sys.executable, "-m", "tcompose", "train-unet", "--data", str(setup["masks"]), "--output", str(resumed),
           "--model", str(setup["base"]), "--resolution", str(RES), "--batch-size", "2", "--grad-accum", "2",
           "--max-steps", "6", "--lr", "1e-3", "--lambda", "1.0", "--gamma", "0.1", "--num-workers", "0",
           "--checkpoint-every", "0", "--eval-fraction", "0.1", "--eval-max-examples", "4", "--eval-timesteps", "500",
           "--use-ema", "--ema-decay", "0.9", "--log-every", "1", "--resume", "latest"]
    # bit-identical needs the same float reduction order: the same number of CPU threads in the new process
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = unet_weights(straight), unet_weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run's EMA UNet differs from the uninterrupted run's"
    raw_a = load_file(straight / "checkpoints" / "step-000006" / "model.safetensors")
    raw_b = load_file(resumed / "checkpoints" / "step-000006" / "model.safetensors")
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)
    s_a = json.loads((straight / "training_summary.json").read_text())
    s_b = json.loads((resumed / "training_summary.json").read_text())
    assert s_b["steps"] == 6 and s_b["steps_this_run"] == 3
    assert s_a["grounding_before"] == s_b["grounding_before"]  # carried in the checkpoint


def test_batch_of_two_equals_mean_of_single_examples(setup):
    comps = load_components(str(setup["base"]))
    prep = prepare_rows(setup["masks"], comps)
    ex = TrainingExamples(prep, RES, (4, RES // 2, RES // 2), 1000, seed=0)
    one_word = next(i for i in range(len(prep)) if len(prep.words[i]) == 1)
    more = next(i for i in range(len(prep)) if len(prep.words[i]) >= 2)
    rows = [one_word, more]  # different word counts: the batch pads one of them
    items = [ex[(r, n)] for n, r in enumerate(rows)]

    def loss(examples):
        batch = collate(examples)
        latents, emb = comps.encode_batch(batch)
        return tokencompose_losses(comps.unet, latents, emb, batch, comps.noise_scheduler, ("mid", "up"), 1.0, 0.1)

    both = loss(items)
    one, two = loss(items[:1]), loss(items[1:])
    for key in ("ldm", "token", "pixel", "total"):
        assert both[key].item() == pytest.approx((one[key].item() + two[key].item()) / 2, rel=1e-5), key
    assert both["token"].item() > 0 and both["pixel"].item() > 0


def test_grounding_losses_move_attention_into_masks(setup, tmp_path):
    """The learning test: same seed and steps, losses off vs on; on must ground far better."""
    common = dict(batch_size=8, grad_accum=1, max_steps=40, lr=2e-3, eval_fraction=0.2, eval_max_examples=16,
                  eval_timesteps=(300, 700), log_every=10)
    off = train(small(setup, tmp_path / "off", lambda_token=0.0, gamma_pixel=0.0, **common))
    on = train(small(setup, tmp_path / "on", lambda_token=1.0, gamma_pixel=0.1, **common))
    assert off["grounding_before"]["score"] == pytest.approx(on["grounding_before"]["score"])
    chance = on["grounding_after"]["chance"]
    gain_on = on["grounding_after"]["score"] - chance
    gain_off = off["grounding_after"]["score"] - chance
    assert on["grounding_after"]["score"] > 1.5 * off["grounding_after"]["score"], (off["grounding_after"], on["grounding_after"])
    assert gain_on > 3 * max(gain_off, 0.01)


def test_prepare_rows_counts_what_it_cannot_supervise(setup, tmp_path):
    comps = load_components(str(setup["base"]))
    img = (setup["scenes"] / "train2017").glob("*.jpg").__next__().read_bytes()
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[10:30, 10:30] = True
    png = encode_mask(mask.numpy())
    row = dict(image_id=1, file_name="x.jpg", image=image_struct(img, "x.jpg"), width=64, height=64,
               caption="a red ball and a blue cup", phrases=["ball", "cup", "kite"], categories=["ball", "cup", "kite"],
               masks=[image_struct(png), None, image_struct(png)], source="test")
    w = ShardedWriter(tmp_path / "ds", "masks", "test", {"v": 1})
    (shard,) = w.plan(1)
    w.write_shard(shard, [row], {}, [])
    w.finalize(1)
    prep = prepare_rows(tmp_path / "ds", comps)
    assert prep.stats["phrase_no_mask"] == 1 and prep.stats["phrase_not_in_tokens"] == 1
    assert prep.words[0] == [[3]]  # "ball": <start> a red ball
    assert prep.dropped[0]["phrase"] == "kite"


def test_cli_masks_and_train_unet(setup, tmp_path):
    runner = CliRunner()
    data = tmp_path / "masks"
    res = runner.invoke(app, ["masks", str(setup["scenes"]), "--source", "coco-gt", "--split", "train2017", "--output", str(data), "--limit", "20"])
    assert res.exit_code == 0, res.output
    other = tmp_path / "other-te"
    enc = build_tiny_text_encoder(vocab_size=len(load_components(str(setup["base"])).tokenizer), seed=7)
    enc.save_pretrained(other / "text_encoder")
    load_components(str(setup["base"])).tokenizer.save_pretrained(other / "tokenizer")
    out = tmp_path / "run"
    res = runner.invoke(app, ["train-unet", "--data", str(data), "--output", str(out), "--model", str(setup["base"]),
                              "--resolution", str(RES), "--batch-size", "2", "--grad-accum", "1", "--max-steps", "2",
                              "--num-workers", "0", "--text-encoder", str(other), "--eval-fraction", "0.2",
                              "--eval-timesteps", "500", "--layers", "mid,up_16"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "training_summary.json").read_text())
    for key in ("steps", "final_losses", "train_seconds", "images_per_s", "peak_memory_mb", "grounding_before", "grounding_after"):
        assert key in summary
    assert summary["steps"] == 2 and set(summary["final_losses"]) == {"ldm", "token", "pixel", "total"}
    assert list((out / "logs").rglob("events.out.tfevents*")), "no tensorboard log"

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    saved = pipe.text_encoder.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in enc.state_dict().items()), "the swapped text encoder was not saved"
    image = pipe("a red ball", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/masks"], "no such dataset folder"),
        (["--data", "{masks}", "--mixed-precision", "fp8"], "--mixed-precision"),
        (["--data", "{masks}", "--batch-size", "1000"], "too few for one batch"),
        (["--data", "{masks}", "--layers", "sideways"], "unknown layer"),
    ],
)
def test_cli_bad_input_is_one_clear_line(setup, tmp_path, args, message):
    args = [a.replace("{masks}", str(setup["masks"])) for a in args]
    res = CliRunner().invoke(app, ["train-unet", *args, "--output", str(tmp_path / "o"), "--model", str(setup["base"]),
                                   "--resolution", str(RES), "--num-workers", "0", "--max-steps", "1", "--eval-fraction", "0"])
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_cli_masks_missing_annotations(tmp_path):
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    res = CliRunner().invoke(app, ["masks", str(tmp_path / "coco"), "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "captions_train2017.json" in res.output


def test_resume_refuses_another_batch_layout(setup, tmp_path):
    out = tmp_path / "run"
    train(small(setup, out, max_steps=2))
    with pytest.raises(ValueError, match="would not continue the same run"):
        train(small(setup, out, max_steps=4, batch_size=1, resume="latest"))
    with pytest.raises(ValueError, match="--seed 0"):
        train(small(setup, out, max_steps=4, seed=1, resume="latest"))
    summary = train(small(setup, out, max_steps=3, resume="latest"))  # the same layout continues
    assert summary["steps"] == 3 and summary["steps_this_run"] == 1
