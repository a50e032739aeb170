"""Input that is refused in one line (a UserError, exit 2) before work, or handled with a note, instead of a
traceback or a silently wrong result: LoRA adapters of another family or without their text encoder, --mixed-
precision fp16 on a CPU, table given another stage's folder, FID weights of the wrong sha256, --coco-captions
above what exists, crops --size without bound."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tcompose.io.errors import UserError


class Loaded(Exception):
    """Raised by a patched loader: the code under test got as far as loading (or generating)."""


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory, test_data) -> Path:
    from tcompose.testing.tiny_sd import write_tiny_pipeline

    caps = [a["caption"] for a in json.loads((test_data / "coco-mini-val2017" / "annotations" /
                                              "captions_val2017.json").read_text())["annotations"]]
    return write_tiny_pipeline(tmp_path_factory.mktemp("refused") / "sd", corpus=caps[:200])


@pytest.fixture
def no_loading(monkeypatch):
    """load_components replaced: records its arguments and raises :class:`Loaded`."""
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        raise Loaded

    monkeypatch.setattr("tcompose.models.families.load_components", fake)
    return calls


def _lora_folder(path: Path, **meta) -> Path:
    from tcompose.models.lora import META, WEIGHTS

    path.mkdir(parents=True)
    (path / WEIGHTS).write_bytes(b"")
    (path / META).write_text(json.dumps({"format": "diffusers", "weights": WEIGHTS, "rank": 4, "alpha": 4, **meta}))
    return path


# ------------------------------------------------------------------------------------------------ LoRA


def test_lora_of_another_family_is_refused_before_loading(tiny_sd, tmp_path, no_loading, capsys):
    from tcompose.cli import main
    from tcompose.evaluate.sampling import load_pipeline

    xl = _lora_folder(tmp_path / "xl-lora", base_model="stabilityai/stable-diffusion-xl-base-1.0", family="sdxl")
    with pytest.raises(UserError, match=r"LoRA .*xl-lora \(--lora, or lora= in --model\): SDXL adapters .* is "
                                        r"SD1.x / SD2.x; pass a base model"):
        load_pipeline(str(tiny_sd), lora=str(xl), device="cpu", dtype="fp32")
    assert no_loading == []  # refused from the recorded family, before any weight was read
    out = tmp_path / "g"
    assert main(["generate", "--model", str(tiny_sd), "--lora", str(xl), "-o", str(out), "--prompt", "a cat",
                 "--steps", "2", "--height", "32", "--width", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SDXL adapters" in err and no_loading == []


def test_lora_records_its_text_encoder(tiny_sd, tmp_path, monkeypatch):
    from tcompose.models.families import family_named
    from tcompose.models.lora import DEFAULT_TARGETS
    from tcompose.train.output import save_lora_outputs

    saved = {}
    monkeypatch.setattr("tcompose.models.lora.save_lora", lambda out, unet, meta, pipeline: saved.update(meta))
    cfg = SimpleNamespace(model=str(tiny_sd), revision=None, vae=None, text_encoder=str(tiny_sd), lora_rank=4,
                          lora_alpha=None, lora_targets=DEFAULT_TARGETS, fuse=False, prediction_type=None)
    save_lora_outputs(cfg, None, None, tmp_path / "out", family_named("sd"))
    assert saved["text_encoder"] == str(tiny_sd.resolve()) and saved["family"] == "sd"


def test_lora_generates_with_its_recorded_text_encoder_or_is_refused(tiny_sd, tmp_path, no_loading):
    from tcompose.evaluate.sampling import load_pipeline

    te = str(tiny_sd.resolve())
    out = _lora_folder(tmp_path / "lora", base_model=te, family="sd", text_encoder=te)
    with pytest.raises(Loaded):
        load_pipeline(str(out), device="cpu", dtype="fp32")  # the LoRA OUT as the model
    with pytest.raises(Loaded):
        load_pipeline(str(tiny_sd), lora=str(out), device="cpu", dtype="fp32")  # lora=OUT on its base
    assert [kw["text_encoder"] for _, kw in no_loading] == [te, te]
    gone = _lora_folder(tmp_path / "gone", base_model=te, family="sd", text_encoder=str(tmp_path / "moved-te"))
    with pytest.raises(UserError, match=r"trained with --text-encoder .*moved-te.*pass that text encoder with "
                                        r"--text-encoder PATH"):
        load_pipeline(str(gone), device="cpu", dtype="fp32")
    assert len(no_loading) == 2  # refused before loading
    with pytest.raises(Loaded):  # a text encoder given on the command line is the user's choice
        load_pipeline(str(gone), text_encoder=te, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    """Scenes -> masks -> a tiny SD pipeline and another text encoder of its shape (another seed, same tokenizer)."""
    from helpers import make_training_setup

    return make_training_setup(tmp_path_factory.mktemp("refused-train"), n_images=4, seed=1,
                               models={"sd": {}, "te": {"seed": 1}})


def _image(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a red ball and a blue cup", num_inference_steps=2, height=32, width=32, generator=g,
                output_type="np").images[0]


def test_a_lora_trained_with_a_text_encoder_generates_with_it(train_setup, tmp_path):
    from helpers import tiny_train_config
    from tcompose.evaluate.sampling import load_pipeline
    from tcompose.models.lora import read_lora_meta
    from tcompose.train.loop import run as train

    te = str(train_setup["te"].resolve())
    out = tmp_path / "lora"
    train(tiny_train_config(train_setup, out, "sd", lora_rank=4, text_encoder=te, max_steps=1, eval_fraction=0.0))
    assert read_lora_meta(out)["text_encoder"] == te
    common = dict(device="cpu", dtype="fp32")
    recorded = _image(load_pipeline(str(out), **common))  # the LoRA OUT alone: its base, adapters, text encoder
    assert np.array_equal(recorded, _image(load_pipeline(str(train_setup["sd"]), lora=str(out), **common)))
    assert np.array_equal(recorded, _image(load_pipeline(str(out), text_encoder=te, **common)))
    base_te = _image(load_pipeline(str(out), text_encoder=str(train_setup["sd"]), **common))
    assert np.abs(recorded - base_te).max() > 0  # the text encoder matters: the recorded one was used


# ------------------------------------------------------------------------------------------------ fp16 on CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 on a CPU")
def test_mixed_precision_fp16_on_cpu_trains_in_fp32_with_a_note(train_setup, tmp_path, capsys):
    from helpers import tiny_train_config
    from tcompose.io.trainer import trainer_accelerator
    from tcompose.train.loop import run as train

    assert trainer_accelerator(tmp_path / "acc", 1, "fp16").mixed_precision == "no"
    assert "--mixed-precision fp16 on CPU: training in fp32" in capsys.readouterr().out
    out = tmp_path / "out"
    summary = train(tiny_train_config(train_setup, out, "sd", mixed_precision="fp16", max_steps=1, eval_fraction=0.0))
    assert (out / "unet").is_dir() and "training in fp32" in capsys.readouterr().out
    assert summary["mixed_precision"] == "no"  # recorded as what it trained in, and the model card says so
    assert "| precision | fp32" in (out / "README.md").read_text()


# ------------------------------------------------------------------------------------------------ table


def _write(folder: Path, name: str, data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))
    return folder


MULTIGEN = {"dataset": "coco", "prompt_source": {"kind": "paper", "dataset": "coco"}, "num_prompts": 2,
            "images_per_prompt": 2, "threshold": 0.1,
            "models": {"A": {f"MG{k}": [10.0 * k, 1.0] for k in range(1, 6)}}}
VISOR = {"prompts": 2, "images_per_prompt": 2, "threshold": 0.1, "models": {"A": {"OA": 50.0}}}


def test_table_refuses_another_stages_folder_and_a_summary_missing_a_column(tmp_path, capsys):
    from tcompose.cli import main

    mg = _write(tmp_path / "mg", "summary.json", MULTIGEN)
    visor = _write(tmp_path / "visor", "summary.json", VISOR)
    cases = [
        (["--visor", str(mg)], "'prompts'"),  # a multigen folder given as VISOR's
        (["--multigen-coco", str(visor)], "'dataset'"),  # and the other way round
        (["--fid", str(visor)], "'network'"),  # would have given an empty row, silently
        (["--visor", str(_write(tmp_path / "no-oa", "summary.json", {**VISOR, "models": {"A": {"VISOR_cond": 1}}}))],
         "'OA' of model 'A'"),
        (["--latency", str(_write(tmp_path / "lat", "latency.json", {"stage": "latency", "models": {"A": {}}}))],
         "'s_per_image'"),
        (["--fid", str(_write(tmp_path / "fid", "summary.json", {"network": "x", "sets": {},
                                                               "models": {"A": {"coco": {"images": 2}}}}))],
         "'fid', 'reference_images' of model 'A' on 'coco'"),
    ]
    for args, lacks in cases:
        assert main(["table", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert "summary.json" in err or "latency.json" in err
        assert lacks in err and "pass the --output folder of `tcompose" in err, err


def test_a_table_without_a_measured_row_says_so(tmp_path, capsys):
    from tcompose.cli import main

    empty = _write(tmp_path / "visor", "summary.json", {**VISOR, "models": {}})
    assert main(["table", "--visor", str(empty)]) == 0
    out = capsys.readouterr().out
    assert "No measured row: the given folders hold no model's results" in out
    assert main(["table", "--visor", str(_write(tmp_path / "v2", "summary.json", VISOR))]) == 0
    assert "No measured row" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ FID


@pytest.fixture
def no_images(monkeypatch):
    def fake(*args, **kwargs):
        raise Loaded("an image would be generated")

    monkeypatch.setattr("tcompose.evaluate.generate.run", fake)


def _fid_args(tiny_sd, out, coco, *extra):
    return ["fid", "--model", f"A={tiny_sd}", "-o", str(out), "--steps", "2", "--height", "32", "--width", "32",
            "--coco", str(coco), "--clip-model", "none", *extra]


def test_fid_checks_the_weights_sha256_before_any_image(tiny_sd, test_data, tmp_path, monkeypatch, capsys, no_images):
    from tcompose.cli import main
    from tcompose.evaluate.fid.inception import WEIGHTS_SHA256_PREFIX, weights_path

    monkeypatch.setenv("TCOMPOSE_CACHE", str(tmp_path / "cache"))
    coco = test_data / "coco-mini-val2017"
    bad = tmp_path / "weights.pth"
    torch.save({"not": torch.zeros(1)}, bad)
    out = tmp_path / "fid"
    assert main(_fid_args(tiny_sd, out, coco, "--coco-captions", "2", "--inception", str(bad))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--inception {bad}: sha256" in err and WEIGHTS_SHA256_PREFIX in err
    assert not (out / "models").exists()
    cached = weights_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(bad.read_bytes())  # a corrupt file in the cache
    assert main(_fid_args(tiny_sd, out, coco, "--coco-captions", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{cached} (the cached FID Inception weights): sha256" in err
    assert "tcompose download fid" in err and not (out / "models").exists()


def test_download_offline_checks_the_fid_weights_sha256(tmp_path, monkeypatch):
    from tcompose.download import DownloadConfig, fetch_weights, plan
    from tcompose.evaluate.fid.inception import weights_path

    monkeypatch.setenv("TCOMPOSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    item = next(i for i in plan(DownloadConfig(commands=("fid",))) if i.kind == "weights")
    weights_path().parent.mkdir(parents=True)
    weights_path().write_bytes(b"a truncated download")
    with pytest.raises(UserError, match="wrong sha256.*delete the file"):
        fetch_weights(item)


def test_coco_captions_above_what_exists_are_refused(tiny_sd, test_data, tmp_path, capsys, no_images):
    from tcompose.cli import main
    from tcompose.evaluate.fid.sets import coco_pairs

    coco = test_data / "coco-mini-val2017"
    anns = json.loads((coco / "annotations" / "captions_val2017.json").read_text())["annotations"]
    n = sum((coco / "val2017" / f"{a['image_id']:012d}.jpg").is_file() for a in anns)
    assert len(coco_pairs(coco, n=n)[0]) == n  # every caption whose image is there
    with pytest.raises(UserError, match=f"--coco-captions {n + 1}: .* has only {n} captions"):
        coco_pairs(coco, n=n + 1)
    out = tmp_path / "fid"
    assert main(_fid_args(tiny_sd, out, coco, "--coco-captions", "100000")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pass --coco-captions {n} or fewer" in err and not out.exists()


# ------------------------------------------------------------------------------------------------ crops


def test_crops_size_has_an_upper_bound(test_data, tmp_path, monkeypatch, capsys):
    from tcompose.cli import main
    from tcompose.crops.stage import CropsConfig, run

    MAX_SIZE = 4096
    def no_crop(*args, **kwargs):
        raise Loaded("a crop would be made")

    monkeypatch.setattr("tcompose.crops.stage.encode_crop", no_crop)
    coco, out = test_data / "coco-mini-val2017", tmp_path / "crops"
    with pytest.raises(UserError, match=f"--size 100000: at most {MAX_SIZE} pixels"):
        run(CropsConfig(coco, out, split="val2017", limit=1, size=100_000, workers=1), progress=False)
    assert main(["crops", str(coco), "--split", "val2017", "--size", str(MAX_SIZE + 1), "-o", str(out)]) == 2
    assert f"pass --size {MAX_SIZE} or less" in capsys.readouterr().err and not out.exists()
