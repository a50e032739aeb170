"""train-clip's --report-to (accelerate's trackers), --push-to-hub / --hub-model-id and its model card (OUT/README.md),
as train-unet has them (tests/train/test_trainer_flags.py): trackers get what is logged, a push that cannot happen is
refused before any work, and a whole run pushes the model with its card but not its checkpoints."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from tcompose.cli import main
from tcompose.clip.config import TrainClipConfig, resume_settings
from tcompose.clip.loop import run
from tcompose.io.errors import UserError
from tcompose.testing.tiny_vision import write_tiny_clip

from helpers import HubStandIn, online_without_token
from test_train_clip import SHAPES, write_crops


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-hub")
    return {"crops": write_crops(root / "crops", n_images=24),
            "base": write_tiny_clip(root / "base-clip", corpus=[f"a photo of a {n}" for n, _ in SHAPES.values()], seed=0)}


def tiny(setup, output, **kw) -> TrainClipConfig:
    return TrainClipConfig(**{"data": setup["crops"], "output": output, "model": str(setup["base"]), "batch_size": 8,
                              "max_steps": 3, "lr": 5e-3, "warmup_steps": 1, "num_workers": 0, "eval_fraction": 0.25,
                              "checkpoint_every": 0, "progress": False, "log_every": 1} | kw)


def cli_args(setup, out, *extra) -> list[str]:
    return ["train-clip", "--data", str(setup["crops"]), "--model", str(setup["base"]), "--output", str(out),
            "--batch-size", "8", "--max-steps", "3", "--warmup-steps", "1", "--lr", "5e-3", "--num-workers", "0",
            "--eval-fraction", "0.25", "--checkpoint-every", "2", *extra]


def events(out):
    return list(out.rglob("events.out.tfevents.*"))


# -------------------------------------------------------------------------------------------------------- report to


def test_report_to_none_writes_no_logs(setup, tmp_path):
    out = tmp_path / "run"
    run(tiny(setup, out, report_to="none"))
    assert not (out / "logs").exists() and not events(out)
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


def test_report_to_tensorboard_gets_the_loss_the_held_out_scores_and_the_eval_chart(setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run(tiny(setup, out))  # the default: tensorboard
    found = events(out)
    assert found and all(p.is_relative_to(out / "logs") for p in found)
    acc = EventAccumulator(str(found[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/logit_scale"} <= set(scalars), scalars
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    report = json.loads((out / "eval.json").read_text())
    top1 = {e.step: e.value for e in acc.Scalars("eval/zero_shot_top1")}  # before at step 0, after at the last
    assert top1 == pytest.approx({0: report["before"]["zero_shot_top1"], 3: report["after"]["zero_shot_top1"]})
    assert acc.Tags()["images"] == ["eval"]  # eval.png, under its own name


def test_tracker_settings_are_not_resume_settings(setup, tmp_path):
    """--report-to and --push-to-hub change nothing that is trained: a resume may change them."""
    default = resume_settings(tiny(setup, tmp_path), 1, 3)
    other = resume_settings(tiny(setup, tmp_path, report_to="none", push_to_hub=True, hub_model_id="me/clip",
                                 command="tcompose train-clip ..."), 1, 3)
    assert other == default


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed: nothing to refuse")
@pytest.mark.parametrize("report_to", ["wandb", "all"])
def test_report_to_wandb_without_wandb_is_refused_before_any_work(setup, tmp_path, report_to, capsys):
    with pytest.raises(UserError, match="pip install wandb"):
        run(tiny(setup, tmp_path / "run", report_to=report_to))
    assert not (tmp_path / "run").exists()
    assert main(cli_args(setup, tmp_path / "cli", "--report-to", report_to)) == 2
    err = capsys.readouterr().err
    assert "pip install wandb" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "cli").exists()


def test_an_unknown_tracker_is_refused(setup, tmp_path):
    with pytest.raises(UserError, match="--report-to must be one of tensorboard, wandb, all, none"):
        tiny(setup, tmp_path / "run", report_to="comet").validate()


# ------------------------------------------------------------------------------------------------------- push to hub


def test_push_to_hub_offline_is_refused_in_one_line_before_any_work(setup, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="offline") as e:
        run(tiny(setup, tmp_path / "run", push_to_hub=True))
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()
    assert main(cli_args(setup, tmp_path / "cli", "--push-to-hub")) == 2
    err = capsys.readouterr().err
    assert "offline" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "cli").exists()
    with pytest.raises(UserError, match="--hub-model-id goes with --push-to-hub"):
        run(tiny(setup, tmp_path / "run", hub_model_id="me/clip"))
    assert not (tmp_path / "run").exists()


def test_push_to_hub_without_a_token_is_refused_before_any_work(setup, tmp_path, monkeypatch):
    online_without_token(monkeypatch, tmp_path)
    with pytest.raises(UserError, match="needs a Hugging Face token") as e:
        run(tiny(setup, tmp_path / "run", push_to_hub=True))
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_push_to_hub_uploads_the_model_and_its_card_but_not_checkpoints(setup, tmp_path, monkeypatch):
    """The whole run from the command line, with --push-to-hub, against a local stand-in of the Hub's upload API; the
    base model's card gives the licence."""
    from huggingface_hub import ModelCard

    base = tmp_path / "base"
    shutil.copytree(setup["base"], base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a base CLIP\n")
    hub_api = HubStandIn()
    try:
        hub_api.route(monkeypatch, "tcompose.clip.loop.push_run")
        out = tmp_path / "run"
        args = cli_args(setup, out, "--push-to-hub", "--hub-model-id", "me/clip-crops")
        args[args.index("--model") + 1] = str(base)
        assert main(args) == 0
    finally:
        hub_api.close()
    assert hub_api.repos and hub_api.repos[0]["name"] in ("clip-crops", "me/clip-crops")
    assert hub_api.commits == ["tcompose train-clip"]
    sent = hub_api.files
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "text_encoder/model.safetensors",
                 "tokenizer/vocab.json", "eval.json", "eval.png", "training_summary.json", "README.md"):
        assert name in sent, name
    assert sent["README.md"] == (out / "README.md").read_bytes()
    assert not any(p.startswith("checkpoints/") for p in sent) and (out / "checkpoints" / "step-000002").is_dir()
    assert any(p.startswith("logs/") for p in sent)

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == str(base) and card.data.license == "mit"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "zero-shot-image-classification"
    assert {"tcompose", "clip"} <= set(card.data.tags)
    assert "CLIPModel.from_pretrained" in card.text and "--text-encoder OUT" in card.text
    assert f"tcompose train-clip --data {setup['crops']}" in card.text and "--push-to-hub" in card.text
    report = json.loads((out / "eval.json").read_text())
    before, after = report["before"], report["after"]
    row = f"| zero-shot top-1 | {before['zero_shot_top1']:.4f} | {after['zero_shot_top1']:.4f} |"
    assert row in card.text, card.text
    assert f"| text->image R@1 | {before['t2i_recall@1']:.4f} | {after['t2i_recall@1']:.4f} |" in card.text
    assert "![zero-shot top-1 per category before and after](eval.png)" in card.text
    assert "| steps | 3 (batch 8 x 1 process x 1 accumulation; contrastive batch 8) |" in card.text
    assert "lr 0.005 (cosine, 1 warmup steps)" in card.text


def test_a_card_without_a_held_out_set_says_so(setup, tmp_path):
    from tcompose.clip.card import card_text
    from tcompose.clip.eval import compare

    cfg = tiny(setup, tmp_path / "run", lock_vision=True, eval_fraction=0.0)
    text = card_text(cfg, {"steps": 3, "eval": compare(None, None), "parameters": {"trainable": 10, "frozen": 30}}, None)
    assert "license: other" in text and "Not evaluated: no held-out crops" in text and "(trained through the Python API)" in text
    assert "the text tower (vision locked); 10 of 40 parameters" in text
