"""The train-unet flags diffusers' train_text_to_image.py users reach for: --noise-offset, --prediction-type,
--max-train-samples, --report-to, --optimizer. Each is checked to change what it should (and nothing at its
default)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tcompose.io.errors import UserError
from tcompose.train.config import resume_settings
from tcompose.train.loop import run as train

from helpers import RES, HubStandIn, make_training_setup, online_without_token, tiny_train_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_training_setup(tmp_path_factory.mktemp("flags"), n_images=10, seed=11)


@pytest.fixture(scope="module")
def baseline(setup, tmp_path_factory):
    """A tiny run with every new flag at its default."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    return train(tiny_train_config(setup, out)), out


@pytest.fixture(scope="module")
def examples(setup):
    """``TrainingExamples`` of the tiny dataset, with and without a noise offset."""
    from tcompose.models.families import load_components
    from tcompose.train.examples import TrainingExamples, prepare_rows

    comps = load_components(str(setup["base"]))
    prep = prepare_rows(setup["masks"], comps)
    shape = (comps.unet.config.in_channels, RES // 8, RES // 8)
    make = lambda offset: TrainingExamples(prep, RES, shape, 1000, seed=3, noise_offset=offset)  # noqa: E731
    return make(0.0), make(0.5), TrainingExamples(prep, RES, shape, 1000, seed=3)


# ---------------------------------------------------------------------------------------------------------- noise offset


def test_noise_offset_zero_is_todays_noise_and_an_offset_shifts_each_channel(examples):
    zero, offset, default = examples
    n = 200
    shifts = []
    for number in range(n):
        a, b, c = zero[(0, number)], offset[(0, number)], default[(0, number)]
        assert torch.equal(a["noise"], c["noise"])  # 0: exactly the noise drawn without the option
        for key in ("latent_eps", "timestep"):  # the offset is drawn last: nothing else moves
            assert torch.equal(b[key], c[key])
        diff = b["noise"] - c["noise"]
        # one constant per channel: diffusers' offset * randn(B, C, 1, 1)
        assert torch.allclose(diff, diff[:, :1, :1].expand_as(diff), atol=1e-6)
        shifts.append(diff[:, 0, 0])
        if number < 3:  # deterministic per example
            assert torch.equal(offset[(0, number)]["noise"], b["noise"])
    shifts = torch.stack(shifts)  # [n, C]: offset * N(0, 1)
    assert 0.4 < shifts.std().item() < 0.6, shifts.std()
    assert abs(shifts.mean().item()) < 0.1
    # the variance of each channel's spatial mean grows by offset^2 (from 1/(h*w) to 0.5^2 + 1/(h*w))
    means = torch.stack([offset[(0, i)]["noise"].mean(dim=(1, 2)) for i in range(n)])
    base = torch.stack([default[(0, i)]["noise"].mean(dim=(1, 2)) for i in range(n)])
    assert abs(base.var().item() - 1 / base_hw(default)) < 0.02
    assert abs(means.var().item() - (0.5**2 + base.var().item())) < 0.06


def base_hw(ex) -> int:
    return ex.latent_shape[1] * ex.latent_shape[2]


def test_noise_offset_trains_differently_and_is_recorded(setup, baseline, tmp_path):
    summary = train(tiny_train_config(setup, tmp_path / "run", noise_offset=0.1))
    assert summary["config"]["noise_offset"] == 0.1
    assert summary["final_losses"]["ldm"] != baseline[0]["final_losses"]["ldm"]
    assert "noise offset" in (tmp_path / "run" / "README.md").read_text()
    with pytest.raises(UserError, match="--noise-offset"):
        tiny_train_config(setup, tmp_path / "bad", noise_offset=-0.1).validate()


def test_new_settings_join_the_resume_check_only_when_set(setup, tmp_path):
    default = resume_settings(tiny_train_config(setup, tmp_path), RES, 1)
    for flag in ("--noise-offset", "--prediction-type", "--max-train-samples", "--optimizer"):
        assert flag not in default  # a checkpoint from before these flags still resumes at their defaults
    changed = resume_settings(tiny_train_config(setup, tmp_path, noise_offset=0.1, prediction_type="v_prediction",
                                                max_train_samples=4, optimizer="adamw8bit"), RES, 1)
    assert changed["--noise-offset"] == 0.1 and changed["--prediction-type"] == "v_prediction"
    assert changed["--max-train-samples"] == 4 and changed["--optimizer"] == "adamw8bit"


def test_a_resume_with_another_noise_offset_is_refused(setup, tmp_path):
    out = tmp_path / "run"
    train(tiny_train_config(setup, out, max_steps=2, checkpoint_every=1, noise_offset=0.1))
    with pytest.raises(UserError, match="--noise-offset 0.1 -> 0.2"):
        train(tiny_train_config(setup, out, max_steps=3, checkpoint_every=1, noise_offset=0.2, resume="latest"))
    # left out, the setting is its default, and the refusal says so (not "not recorded")
    with pytest.raises(UserError, match=r"--noise-offset 0.1 -> 0.0(?!.*not recorded)"):
        train(tiny_train_config(setup, out, max_steps=3, checkpoint_every=1, resume="latest"))
    with pytest.raises(UserError, match=r"--optimizer adamw -> adamw8bit"):
        train(tiny_train_config(setup, out, max_steps=3, checkpoint_every=1, noise_offset=0.1, optimizer="adamw8bit",
                                resume="latest"))


# ------------------------------------------------------------------------------------------------------- prediction type


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_the_objectives_target_follows_the_overridden_prediction_type(kind):
    from diffusers import DDPMScheduler

    from tcompose.grounding.objective import UNET

    scheduler = DDPMScheduler(prediction_type="v_prediction" if kind == "epsilon" else "epsilon")
    scheduler.register_to_config(prediction_type=kind)  # what train-unet does with --prediction-type
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    noisy, target = UNET.training_inputs(scheduler, latents, noise, t)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(noisy, a.sqrt() * latents + (1 - a).sqrt() * noise, atol=1e-5)
    want = noise if kind == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    assert torch.allclose(target, want, atol=1e-5)


def test_prediction_type_changes_the_training_target_and_the_saved_scheduler(setup, baseline, tmp_path):
    base_kind = json.loads((baseline[1] / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
    assert base_kind == "epsilon"
    out = tmp_path / "run"
    summary = train(tiny_train_config(setup, out, prediction_type="v_prediction"))
    assert summary["final_losses"]["ldm"] != baseline[0]["final_losses"]["ldm"]
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert "v_prediction" in (out / "README.md").read_text()
    # naming the model's own type changes nothing
    same = train(tiny_train_config(setup, tmp_path / "same", prediction_type="epsilon"))
    assert same["final_losses"] == baseline[0]["final_losses"]
    with pytest.raises(UserError, match="--prediction-type"):
        tiny_train_config(setup, tmp_path / "bad", prediction_type="sample").validate()


def test_a_lora_trained_for_v_prediction_generates_with_it(setup, tmp_path):
    """LoRA adapters keep no scheduler: the prediction type is recorded beside them and set when they load."""
    from diffusers import StableDiffusionPipeline

    from tcompose.models.lora import apply_lora, read_lora_meta

    out = tmp_path / "lora"
    train(tiny_train_config(setup, out, prediction_type="v_prediction", lora_rank=4, fuse=True))
    assert read_lora_meta(out)["prediction_type"] == "v_prediction"
    pipe = StableDiffusionPipeline.from_pretrained(str(setup["base"]), safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    apply_lora(pipe, out)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    fused = json.loads((out / "fused" / "scheduler" / "scheduler_config.json").read_text())
    assert fused["prediction_type"] == "v_prediction"


# ----------------------------------------------------------------------------------------------------- max train samples


def test_max_train_samples_takes_the_first_rows_after_the_split(setup, baseline, tmp_path, monkeypatch):
    from tcompose.io import batches

    seen = []
    real = batches.MicroBatches.__init__

    def record(self, rows, *a, **kw):
        seen.append(list(rows))
        real(self, rows, *a, **kw)

    monkeypatch.setattr(batches.MicroBatches, "__init__", record)
    summary = train(tiny_train_config(setup, tmp_path / "run", max_train_samples=3))
    assert summary["data"]["train_rows"] == 3 < baseline[0]["data"]["train_rows"]
    assert summary["data"]["heldout_rows"] == baseline[0]["data"]["heldout_rows"]  # the split is not touched
    again = train(tiny_train_config(setup, tmp_path / "again", max_train_samples=3))
    assert again["final_losses"] == summary["final_losses"]  # deterministic
    assert seen[0] == seen[1] == sorted(seen[0]) and len(seen[0]) == 3
    assert "first 3" in (tmp_path / "run" / "README.md").read_text()
    with pytest.raises(UserError, match="--max-train-samples 1"):  # below one batch (--batch-size 2)
        train(tiny_train_config(setup, tmp_path / "small", max_train_samples=1))
    assert not (tmp_path / "small" / "logs").exists()


# -------------------------------------------------------------------------------------------------------- report to


def test_report_to_none_writes_no_logs_and_trains_the_same(setup, baseline, tmp_path):
    summary = train(tiny_train_config(setup, tmp_path / "run", report_to="none"))
    assert summary["final_losses"] == baseline[0]["final_losses"]
    assert not list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert list(baseline[1].rglob("events.out.tfevents.*"))  # the default: tensorboard


def test_report_to_tensorboard_gets_the_scalars_and_the_validation_images(setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(tiny_train_config(setup, out, report_to="tensorboard", max_steps=2,
                            validation_prompts=("a red ball",), validation_steps=2))
    acc = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    acc.Reload()
    assert "loss/total" in acc.Tags()["scalars"] and "validation" in acc.Tags()["images"]


def test_validation_images_go_to_every_tracker():
    from tcompose.io.trainer import log_validation_images

    calls = []

    class Tracker:
        def __init__(self, name):
            self.name = name

        def log_images(self, values, step, **kw):
            calls.append((self.name, values["validation"].shape, step))

    class Acc:
        trackers = [Tracker("tensorboard"), Tracker("mlflow")]

    log_validation_images(Acc(), torch.zeros(4, 6, 3, dtype=torch.uint8).numpy(), 7)
    assert [c[0] for c in calls] == ["tensorboard", "mlflow"] and all(c[1:] == ((1, 4, 6, 3), 7) for c in calls)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed: nothing to refuse")
@pytest.mark.parametrize("report_to", ["wandb", "all"])
def test_report_to_wandb_without_wandb_is_refused_before_any_work(setup, tmp_path, report_to):
    with pytest.raises(UserError, match="pip install wandb"):
        train(tiny_train_config(setup, tmp_path / "run", report_to=report_to))
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="--report-to"):
        tiny_train_config(setup, tmp_path / "bad", report_to="comet").validate()


# -------------------------------------------------------------------------------------------------------- optimizer


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw8bit_without_bitsandbytes_is_refused_naming_the_extra(setup, tmp_path):
    with pytest.raises(UserError, match=r"tcompose\[bnb\]"):
        train(tiny_train_config(setup, tmp_path / "run", optimizer="adamw8bit"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="--optimizer"):
        tiny_train_config(setup, tmp_path / "bad", optimizer="sgd").validate()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes is not installed (pip install 'tcompose[bnb]'): its 8-bit state is not checked")
def test_adamw8bit_keeps_8bit_optimizer_state(setup, tmp_path, monkeypatch):
    from tcompose.io import trainer

    made = []
    real = trainer.adamw_class

    def spy(name):
        cls = real(name)

        def build(*a, **kw):
            made.append(cls(*a, **kw))
            return made[-1]
        return build

    monkeypatch.setattr("tcompose.train.loop.adamw_class", spy)
    summary = train(tiny_train_config(setup, tmp_path / "run", optimizer="adamw8bit"))
    assert summary["config"]["optimizer"] == "adamw8bit"
    # bitsandbytes keeps tensors of 4,096+ elements in 8 bits (both moments), smaller ones in 32
    big = [s for p, s in made[-1].state.items() if p.numel() >= 4096]
    assert big and all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in big)
    # the 8-bit state checkpoints and resumes exactly: 2 steps + 2 resumed = 4 straight
    from safetensors.torch import load_file

    out = tmp_path / "resumed"
    train(tiny_train_config(setup, out, optimizer="adamw8bit", max_steps=2, checkpoint_every=2))
    train(tiny_train_config(setup, out, optimizer="adamw8bit", resume="latest"))
    straight = load_file(tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


# ------------------------------------------------------------------------------------------------------- push to hub


def test_push_to_hub_offline_is_refused_in_one_line_before_any_work(setup, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="offline") as e:
        train(tiny_train_config(setup, tmp_path / "run", push_to_hub=True))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="--hub-model-id goes with --push-to-hub"):
        train(tiny_train_config(setup, tmp_path / "run", hub_model_id="me/tc"))


def test_push_to_hub_without_a_token_is_refused_before_any_work(setup, tmp_path, monkeypatch):
    online_without_token(monkeypatch, tmp_path)
    with pytest.raises(UserError, match="needs a Hugging Face token") as e:
        train(tiny_train_config(setup, tmp_path / "run", push_to_hub=True))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_a_failed_upload_keeps_the_run_and_says_how_to_upload_it(baseline, tmp_path, monkeypatch):
    """A real upload attempt to a Hub endpoint that does not answer (a closed local port)."""
    import socket

    import huggingface_hub.constants as hub_constants

    from tcompose.io.hub import push_run

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = baseline[1]
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(UserError, match="huggingface-cli upload me/tc") as e:
        push_run(out, "me/tc", print, endpoint=f"http://127.0.0.1:{port}")
    assert "\n" not in str(e.value) and f"the run is complete in {out}" in str(e.value)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_push_to_hub_uploads_the_pipeline_and_its_card_but_not_checkpoints(setup, tmp_path, monkeypatch):
    """The whole run with --push-to-hub against a local stand-in of the Hub's upload API; the checkpoints and the
    latent and text caches stay local."""
    hub_api = HubStandIn()
    try:
        hub_api.route(monkeypatch, "tcompose.train.loop.push_run")
        out = tmp_path / "run"
        train(tiny_train_config(setup, out, push_to_hub=True, hub_model_id="me/tc", checkpoint_every=2,
                                max_steps=3, cache_latents=True, cache_text=True))
    finally:
        hub_api.close()
    assert hub_api.repos and hub_api.repos[0]["name"] in ("tc", "me/tc")
    sent = hub_api.files
    assert "README.md" in sent and "unet/diffusion_pytorch_model.safetensors" in sent and "model_index.json" in sent
    assert sent["README.md"] == (out / "README.md").read_bytes()
    for local in ("checkpoints", "latent_cache", "text_cache"):
        assert not any(p.startswith(local + "/") for p in sent) and (out / local).is_dir(), local
