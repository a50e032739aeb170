"""train-clip on a synthetic crops dataset (a coloured shape per category on noise): learning, evaluation,
locking, exact resume, the export, and its text tower inside train-unet and a generating pipeline."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from tcompose.cli import main
from tcompose.clip.config import TrainClipConfig
from tcompose.clip.data import Preprocess, read_crops, split_by_image
from tcompose.clip.eval import compare, format_table, recall_at_k, topk_accuracy
from tcompose.clip.loop import lr_factor, run, total_steps
from tcompose.clip.towers import lock_towers, no_decay, param_groups
from tcompose.io.datasets import ShardedWriter, image_struct
from tcompose.models.clip import preprocess_config
from tcompose.testing.tiny_vision import build_clip, write_tiny_clip

SHAPES = {1: ("ball", (215, 35, 35)), 2: ("box", (35, 70, 215)), 3: ("cup", (40, 165, 60)),
          4: ("kite", (240, 215, 40)), 5: ("ring", (145, 55, 190)), 6: ("bar", (250, 250, 250))}


def crop_jpeg(cid: int, rng: np.random.Generator, size: int = 40) -> bytes:
    """Noise, and the category's shape in its colour at a random place and size (35-65 % of the side)."""
    im = Image.fromarray(rng.integers(40, 140, size=(size, size, 3), dtype=np.uint8))
    d = ImageDraw.Draw(im)
    s = rng.uniform(0.35, 0.65) * size
    cx, cy = rng.uniform(s / 2, size - s / 2, size=2)
    h = s / 2
    name, colour = SHAPES[cid]
    if name in ("ball", "ring"):
        d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=colour if name == "ball" else None, outline=colour, width=max(2, int(s / 6)))
    elif name in ("box", "bar"):
        d.rectangle([cx - h, cy - (h if name == "box" else h / 3), cx + h, cy + (h if name == "box" else h / 3)], fill=colour)
    elif name == "cup":
        d.polygon([(cx - h, cy - h), (cx + h, cy - h), (cx + 0.6 * h, cy + h), (cx - 0.6 * h, cy + h)], fill=colour)
    else:
        d.polygon([(cx, cy - h), (cx + 0.8 * h, cy), (cx, cy + h), (cx - 0.8 * h, cy)], fill=colour)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_crops(out: Path, n_images: int = 72, per_image: int = 2, seed: int = 0) -> Path:
    """A crops dataset (CROPS_COLUMNS) of ``n_images`` source images with ``per_image`` crops of distinct categories."""
    rng = np.random.default_rng(seed)
    rows = []
    for img in range(n_images):
        for k, cid in enumerate(rng.choice(list(SHAPES), size=per_image, replace=False)):
            cid = int(cid)
            rows.append({"image": image_struct(crop_jpeg(cid, rng)), "text": f"a photo of a {SHAPES[cid][0]}",
                         "category": SHAPES[cid][0], "category_id": cid, "image_id": 1000 + img, "ann_id": 10 * img + k,
                         "bbox": [0.0, 0.0, 40.0, 40.0], "crop_box": [0, 0, 40, 40]})
    w = ShardedWriter(out, kind="crops", stage="crops", content_config={"synthetic": seed}, shard_size=50)
    for shard in w.plan(len(rows)):
        w.write_shard(shard, rows[shard.items.start : shard.items.stop], {"crops": len(shard.items)}, [])
    w.finalize(len(rows))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    crops = write_crops(root / "crops")
    base = write_tiny_clip(root / "base-clip", corpus=[f"a photo of a {n}" for n, _ in SHAPES.values()], seed=0)
    return {"root": root, "crops": crops, "base": base}


def small(setup, output, **kw) -> TrainClipConfig:
    cfg = dict(data=setup["crops"], output=output, model=str(setup["base"]), batch_size=16, max_steps=60, lr=2e-3,
               warmup_steps=5, weight_decay=0.0, num_workers=0, eval_fraction=0.2, checkpoint_every=0, progress=False,
               log_every=10)
    cfg.update(kw)
    return TrainClipConfig(**cfg)


@pytest.fixture(scope="module")
def trained(setup):
    out = setup["root"] / "trained"
    summary = run(small(setup, out))
    return out, summary


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


# --------------------------------------------------------------------------------------------- pure parts


def test_preprocess_matches_clip_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(0)
    for side in (32, 224):
        cfg = preprocess_config(side)
        ref = CLIPImageProcessorPil(**{k: v for k, v in cfg.items() if k != "image_processor_type"})
        pre = Preprocess.from_config(cfg)
        for w, h in ((57, 40), (40, 91), (side, side), (300, 300), (23, 19)):
            im = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
            want = torch.as_tensor(np.asarray(ref(images=im, return_tensors="np")["pixel_values"][0]))
            got = pre(im)
            assert got.shape == (3, side, side) and torch.allclose(got, want, atol=1e-5), (side, w, h)


def test_split_by_image_keeps_each_image_on_one_side(setup):
    rows = read_crops(setup["crops"])
    assert rows.class_texts[4] == "a photo of a kite" and rows.categories[6] == "bar"
    train, held = split_by_image(rows.image_ids, 0.25, seed=3)
    assert sorted(train + held) == list(range(len(rows)))
    assert not {rows.image_ids[r] for r in train} & {rows.image_ids[r] for r in held}
    assert len({rows.image_ids[r] for r in held}) == math.ceil(0.25 * 72)
    _, capped = split_by_image(rows.image_ids, 0.25, seed=3, max_heldout=7)
    assert len(capped) == 6  # whole images only: 3 images x 2 crops
    assert split_by_image(rows.image_ids, 0.0, seed=3)[1] == []


def test_metrics_by_hand():
    classes = torch.eye(3)
    images = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.5], [0.9, 0.0, 0.1], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 2, 2])
    acc = topk_accuracy(images, classes, labels, ks=(1, 2))
    assert acc[1] == pytest.approx(0.75) and acc[2] == pytest.approx(1.0)
    rec = recall_at_k(classes, torch.tensor([0, 1, 2]), images, labels, ks=(1, 2))
    assert rec[1] == pytest.approx(1.0) and rec[2] == pytest.approx(1.0)
    rec = recall_at_k(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([2]), images, labels, ks=(1, 2))
    assert rec[1] == 0.0 and rec[2] == 1.0  # the 2nd most similar image (index 2) is of class 2


def test_lr_schedule_and_decay_groups():
    assert [lr_factor(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 20) == pytest.approx(1.0) and lr_factor(12, 4, 20) == pytest.approx(0.5)
    assert lr_factor(19, 4, 20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert lr_factor(19, 4, 20, "constant") == 1.0 and lr_factor(0, 0, 20) == 1.0
    epochs = TrainClipConfig(data=Path("d"), output=Path("o"), batch_size=16, grad_accum=2, epochs=2.0)
    assert total_steps(epochs, n_train=100, world_size=1) == 6  # 6 full micro-batches per epoch, 2 per step
    assert total_steps(epochs, n_train=100, world_size=2) == 3 and total_steps(epochs, n_train=10, world_size=1) == 1
    epochs.max_steps = 7
    assert total_steps(epochs, n_train=100, world_size=1) == 7
    model = build_clip("tiny", vocab_size=300)
    spared = {n for n, p in model.named_parameters() if no_decay(n, p)}
    assert "logit_scale" in spared and "vision_model.embeddings.class_embedding" in spared
    assert "text_model.embeddings.token_embedding.weight" in spared and "text_model.final_layer_norm.weight" in spared
    assert "text_model.encoder.layers.0.self_attn.q_proj.bias" in spared
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" not in spared
    assert "vision_model.embeddings.patch_embedding.weight" not in spared
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_lock_towers_flags():
    model = build_clip("tiny", vocab_size=300)
    lock_towers(model, lock_text=True, unlocked_text_layers=1, learn_temperature=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("text_model.encoder.layers.0.") or n.startswith("text_model.embeddings") for n in trainable)
    assert {"text_model.final_layer_norm.weight", "text_projection.weight", "vision_model.post_layernorm.weight"} <= trainable
    assert any(n.startswith("text_model.encoder.layers.2.") for n in trainable) and "logit_scale" not in trainable
    with pytest.raises(ValueError, match="only applies with --lock-text"):
        lock_towers(model, unlocked_text_layers=1)
    with pytest.raises(ValueError, match=r"in \[0, 3\]"):
        lock_towers(model, lock_text=True, unlocked_text_layers=4)
    with pytest.raises(ValueError, match="nothing left to train"):
        lock_towers(model, lock_vision=True, lock_text=True, learn_temperature=False)


def test_compare_says_when_worse():
    before = {"zero_shot_top1": 0.5, "zero_shot_top5": 0.9, "t2i_recall@1": 0.4, "t2i_recall@5": 0.8,
              "images": 10, "queries": 3, "categories": 6, "chance_top1": 1 / 6, "chance_top5": 5 / 6}
    worse = compare(before, before | {"zero_shot_top1": 0.3})
    assert worse["verdict"] == "worse" and worse["worse"] == ["zero_shot_top1"]
    assert "WORSE after finetuning: zero-shot top-1 0.500 -> 0.300" in format_table(worse)
    mixed = compare(before, before | {"zero_shot_top1": 0.3, "t2i_recall@1": 0.6})
    assert mixed["verdict"] == "mixed" and "MIXED" in format_table(mixed)
    assert compare(before, before)["verdict"] == "unchanged"
    assert compare(None, None)["verdict"] == "not evaluated"


# ------------------------------------------------------------------------------------------------- runs


def test_learning_raises_zero_shot_accuracy(trained, setup):
    out, summary = trained
    report = json.loads((out / "eval.json").read_text())
    before, after = report["before"], report["after"]
    assert before["categories"] == 6 and before["images"] > 0
    assert before["zero_shot_top1"] < 0.45  # a random CLIP: about chance (1/6)
    assert after["zero_shot_top1"] >= 0.8 and after["t2i_recall@1"] >= 0.8, report
    assert report["verdict"] == "better" and summary["eval"]["verdict"] == "better"
    per = after["per_category"]  # each category's top-1, weighted by its crops, is the overall top-1
    assert set(per) == {n for n, _ in SHAPES.values()} and sum(v["crops"] for v in per.values()) == after["images"]
    assert sum(v["top1"] * v["crops"] for v in per.values()) / after["images"] == pytest.approx(after["zero_shot_top1"])
    with Image.open(out / "eval.png") as im:
        assert im.format == "PNG" and im.height > 100
    assert summary["steps"] == 60 and summary["images_per_s"] > 0 and summary["parameters"]["frozen"] == 0
    # OUT is a CLIPModel folder whose text_encoder/ is exactly the finetuned text tower
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    clip = CLIPModel.from_pretrained(out).eval()
    text = CLIPTextModel.from_pretrained(out / "text_encoder").eval()
    ids = CLIPTokenizer.from_pretrained(out / "tokenizer")(["a photo of a cup"], padding="max_length", max_length=77,
                                                          return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(clip.text_model(input_ids=ids).last_hidden_state, text(input_ids=ids).last_hidden_state)
    assert CLIPTokenizer.from_pretrained(out)("a photo of a cup").input_ids == ids[0, :7].tolist()
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "tokenizer" / "merges.txt").is_file()
    assert json.loads((out / "preprocessor_config.json").read_text())["crop_size"] == {"height": 32, "width": 32}


def test_a_run_that_makes_things_worse_says_so(trained, tmp_path, capsys):
    out, _ = trained
    code = main(["train-clip", "--data", str(trained[0].parent / "crops"), "--model", str(out), "--output",
                 str(tmp_path / "ruined"), "--batch-size", "16", "--max-steps", "4", "--lr", "0.3", "--warmup-steps", "0",
                 "--lr-scheduler", "constant", "--max-grad-norm", "0", "--num-workers", "0", "--eval-fraction", "0.2",
                 "--no-dedupe-labels"])
    assert code == 0
    report = json.loads((tmp_path / "ruined" / "eval.json").read_text())
    assert report["verdict"] in ("worse", "mixed") and "zero_shot_top1" in report["worse"], report
    assert "after finetuning: zero-shot top-1" in capsys.readouterr().out


def test_locking_flags_freeze_what_they_say(setup, tmp_path):
    base = weights(setup["base"])
    run(small(setup, tmp_path / "a", max_steps=2, lr=1e-2, lock_vision=True, learn_temperature=False, eval_fraction=0.0,
              dedupe_labels=False))
    a = weights(tmp_path / "a")
    for name, value in a.items():
        frozen = name.startswith(("vision_model.", "visual_projection.")) or name == "logit_scale"
        assert torch.equal(value, base[name]) == frozen, name
    run(small(setup, tmp_path / "b", max_steps=2, lr=1e-2, lock_text=True, unlocked_text_layers=1, eval_fraction=0.0))
    b = weights(tmp_path / "b")
    for name, value in b.items():
        frozen = name.startswith(("text_model.embeddings.", "text_model.encoder.layers.0.", "text_model.encoder.layers.1."))
        assert torch.equal(value, base[name]) == frozen, name
    summary = json.loads((tmp_path / "b" / "training_summary.json").read_text())
    assert summary["eval"]["verdict"] == "not evaluated"


def test_exact_resume_after_a_kill(setup, tmp_path):
    out = tmp_path / "run"
    cfg = small(setup, out, batch_size=8, grad_accum=2, max_steps=6, warmup_steps=2, checkpoint_every=3, lr=5e-3,
                weight_decay=0.1)
    run(cfg)
    straight = weights(out)
    straight_opt = load_file(out / "checkpoints" / "step-000006" / "optimizer.safetensors")
    before = json.loads((out / "eval.json").read_text())["before"]
    # what a kill after step 3's checkpoint leaves behind
    shutil.rmtree(out / "checkpoints" / "step-000006")
    for name in ("model.safetensors", "eval.json", "training_summary.json"):
        (out / name).unlink()
    code = main(["train-clip", "--data", str(setup["crops"]), "--model", str(setup["base"]), "--output", str(out),
                 "--batch-size", "8", "--grad-accum", "2", "--max-steps", "6", "--warmup-steps", "2", "--checkpoint-every", "3", "--lr", "5e-3",
                 "--weight-decay", "0.1", "--num-workers", "0", "--eval-fraction", "0.2", "--resume", "latest"])
    assert code == 0
    resumed = weights(out)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), "resumed weights differ from the uninterrupted run"
    opt = load_file(out / "checkpoints" / "step-000006" / "optimizer.safetensors")
    assert all(torch.equal(straight_opt[k], opt[k]) for k in straight_opt)
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 6 and summary["steps_this_run"] == 3
    assert summary["eval"]["before"] == before  # carried in the checkpoint, not re-measured on trained weights


def test_cli_bad_input_is_one_clear_line(setup, tmp_path, capsys):
    args = ["train-clip", "--model", str(setup["base"]), "--output", str(tmp_path / "o"), "--num-workers", "0"]
    assert main([*args, "--data", str(setup["crops"]), "--unlocked-text-layers", "2"]) == 2
    assert "--unlocked-text-layers only applies with --lock-text" in capsys.readouterr().err
    assert main([*args, "--data", str(tmp_path / "missing")]) == 2
    assert "no such dataset folder" in capsys.readouterr().err
    assert main([*args, "--data", str(setup["crops"]), "--model", str(tmp_path / "nope")]) == 2
    assert "model folder not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the text tower inside SD


def test_finetuned_text_encoder_is_used_by_train_unet_and_generation(trained, tmp_path):
    from diffusers import StableDiffusionPipeline

    from tcompose.data.synthetic import make_scenes
    from tcompose.masks.config import MasksConfig
    from tcompose.masks.stage import run as make_masks
    from tcompose.models.components import TextEncoderMismatchError
    from tcompose.models.families import load_components
    from tcompose.testing.tiny_sd import write_tiny_pipeline
    from tcompose.train.config import TrainUnetConfig
    from tcompose.train.loop import run as train_unet

    out, _ = trained
    finetuned = load_file(out / "text_encoder" / "model.safetensors")
    scenes = make_scenes(tmp_path / "scenes", n_images=6, size=64, seed=0)
    make_masks(MasksConfig(coco_dir=scenes, output=tmp_path / "masks", split="train2017"), progress=False)
    base = write_tiny_pipeline(tmp_path / "sd", tokenizer_source=out / "tokenizer", seed=1)
    run_dir = tmp_path / "tc"
    train_unet(TrainUnetConfig(data=tmp_path / "masks", output=run_dir, model=str(base), text_encoder=str(out),
                               resolution=32, batch_size=2, grad_accum=1, max_steps=1, num_workers=0, checkpoint_every=0,
                               eval_fraction=0.0, progress=False))
    pipe = StableDiffusionPipeline.from_pretrained(run_dir, safety_checker=None, requires_safety_checker=False)
    saved = pipe.text_encoder.state_dict()
    assert saved.keys() == finetuned.keys() and all(torch.equal(saved[k], finetuned[k]) for k in finetuned)
    # generate --text-encoder OUT: the base model with OUT's text tower and tokenizer
    from tcompose.evaluate.generate import GenerateConfig, load_pipeline
    from tcompose.evaluate.generate import run as generate

    gen = load_pipeline(str(base), text_encoder=str(out), dtype="fp32", device="cpu")
    assert all(torch.equal(gen.text_encoder.state_dict()[k], finetuned[k]) for k in finetuned)
    assert gen.tokenizer("a photo of a cup").input_ids == load_components(str(base), text_encoder=str(out)).tokenizer("a photo of a cup").input_ids
    from tcompose.evaluate.settings import GenerationSettings

    result = generate(GenerateConfig(model=str(base), text_encoder=str(out), output=tmp_path / "gen", prompts=["a photo of a cup"],
                                     settings=GenerationSettings(steps=2, height=64, width=64, device="cpu")), progress=False)
    assert result["generated"] == 1 and len(list((tmp_path / "gen" / "images").glob("*.png"))) == 1
    # a text tower of another width is refused on load, naming both widths
    wide = write_tiny_pipeline(tmp_path / "sd64", tokenizer_source=out / "tokenizer", unet_kwargs={"cross_attention_dim": 64})
    with pytest.raises(TextEncoderMismatchError, match="hidden size 32 != UNet cross_attention_dim 64"):
        load_components(str(wide), text_encoder=str(out))


# ----------------------------------------------------------------------------- no silent wrong runs (train-clip)


def test_a_contrastive_batch_of_one_is_refused(setup, tmp_path, capsys):
    args = ["train-clip", "--data", str(setup["crops"]), "--model", str(setup["base"]), "--output", str(tmp_path / "o"),
            "--num-workers", "0", "--batch-size", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "contrastive batch of 1" in err and "no negatives" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_train_clip_refuses_a_folder_holding_a_run_and_a_resume_with_other_settings(setup, tmp_path):
    out = tmp_path / "run"
    run(small(setup, out, max_steps=4, checkpoint_every=2))
    with pytest.raises(ValueError, match="already holds a train-clip run.*--resume latest.*--overwrite"):
        run(small(setup, out, max_steps=4))
    with pytest.raises(ValueError, match=r"--batch-size x processes 16 -> 8"):
        run(small(setup, out, max_steps=4, batch_size=8, resume="latest"))
    with pytest.raises(ValueError, match=r"--lr 0.002 -> 0.004"):  # only a lower --lr may resume (divergence advice)
        run(small(setup, out, max_steps=4, lr=4e-3, resume="latest"))
    summary = run(small(setup, out, max_steps=2, checkpoint_every=1, overwrite=True))
    assert summary["steps"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    with pytest.raises(ValueError, match="--lr nan: not a finite number"):
        small(setup, out, lr=float("nan")).validate()
