"""tcompose download: what each command needs, pinning, and the offline check of a warm (or cold) cache."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from tcompose.cli import app
from tcompose.download import DownloadConfig, DownloadError, defaults, ignore_patterns, parse_revisions, plan, run


def names(items):
    return [i.name for i in items]


def test_plan_follows_the_stages_defaults():
    d = defaults()
    assert d["base"] == "CompVis/stable-diffusion-v1-4" and d["owlv2"] == "google/owlv2-large-patch14-ensemble"
    assert names(plan(DownloadConfig(commands=("train-unet",)))) == [d["base"]]
    assert names(plan(DownloadConfig(commands=("masks",)))) == [d["grounding_dino"], d["segmenter"], d["caption_clip"]]
    multigen = plan(DownloadConfig(commands=("multigen",)))
    assert [(i.kind, i.name) for i in multigen] == [("model", d["base"]), ("model", d["owlv2"]),
                                                    ("prompts", "coco"), ("prompts", "ade20k")]
    assert [(i.kind, i.name) for i in plan(DownloadConfig(commands=("visor",)))] == [
        ("model", d["base"]), ("model", "google/owlvit-base-patch32")]
    assert [(i.kind, i.name) for i in plan(DownloadConfig(commands=("geneval",)))] == [
        ("model", d["base"]), ("model", "facebook/mask2former-swin-small-coco-instance"), ("model", d["clip"]),
        ("prompts", "geneval")]
    assert [(i.kind, i.name) for i in plan(DownloadConfig(commands=("fid",)))] == [
        ("model", d["base"]), ("weights", "inception-2015-12-05"), ("model", d["clip"])]
    everything = plan(DownloadConfig())
    assert len(names(everything)) == len(set(names(everything)))  # each item once
    assert set(names(everything)) >= {d["base"], d["clip"], d["owlv2"], d["grounding_dino"], d["segmenter"]}


def test_plan_takes_model_specs_revisions_and_skips_local_folders(tmp_path):
    local = tmp_path / "run"
    local.mkdir()
    cfg = DownloadConfig(commands=("generate",), models=(f"tc={local}", "sd=org/sd,revision=v2,text_encoder=org/clip"),
                         revisions={"org/clip": "abc123"})
    items = plan(cfg)
    assert [(i.name, i.revision, i.role) for i in items] == [("org/sd", "v2", "Stable Diffusion"),
                                                              ("org/clip", "abc123", "text encoder")]
    with pytest.raises(ValueError, match="unknown command"):
        plan(DownloadConfig(commands=("trian-unet",)))


def test_parse_revisions():
    assert parse_revisions(["a/b=main", " c/d = 0123abc "]) == {"a/b": "main", "c/d": "0123abc"}
    for bad in ("a/b", "=main", "a/b="):
        with pytest.raises(ValueError, match="REPO_ID=REVISION"):
            parse_revisions([bad])


def test_ignore_patterns_keep_bin_only_without_safetensors():
    assert "*.bin" in ignore_patterns(["config.json", "model.safetensors", "pytorch_model.bin"])
    assert "*.bin" not in ignore_patterns(["config.json", "pytorch_model.bin"])
    assert "*.bin" not in ignore_patterns(["config.json", "unet/x.fp16.safetensors", "unet/x.bin"])
    assert "*.ckpt" in ignore_patterns([])


def fake_cached_repo(hub, repo: str, commit: str = "0" * 40):
    """A repo as huggingface_hub lays it out in its cache (refs/main -> snapshots/COMMIT/...)."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    return snap


def test_offline_check_of_a_warm_and_a_cold_cache(tmp_path, monkeypatch, test_data):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    # cold: every item fails, each named with its reason, and the command exits non-zero
    with pytest.raises(DownloadError, match="could not fetch 4 of 4 items.*HF_HUB_OFFLINE") as err:
        run(DownloadConfig(commands=("multigen",)), progress=False)
    assert "CompVis/stable-diffusion-v1-4" in str(err.value) and "ade20k" in str(err.value)
    result = CliRunner().invoke(app, ["download", "multigen"])
    assert result.exit_code == 2 and "could not fetch" in result.output
    # warm: the models are in the hub cache, the prompt sets beside it
    d = defaults()
    for repo in (d["base"], d["owlv2"]):
        fake_cached_repo(tmp_path / "hf" / "hub", repo, commit="1" * 40)
    prompts = tmp_path / "hf" / "tcompose" / "multigen"
    prompts.mkdir(parents=True)
    for name in ("coco_obj_comp_5_1k.json", "ade20k_obj_comp_5_1k.json"):
        shutil.copy(test_data / "multigen" / name, prompts / name)
    report = run(DownloadConfig(commands=("multigen",)), progress=False)
    assert report["failed"] == 0 and {r["status"] for r in report["items"]} == {"cached"}
    lock = json.loads((tmp_path / "hf" / "tcompose" / "download-lock.json").read_text())
    assert lock[d["base"]] == {"revision": "main", "commit": "1" * 40}


def test_dry_run_lists_without_fetching(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    report = run(DownloadConfig(commands=("train-clip",), dry_run=True), progress=False)
    assert [(r["name"], r["status"]) for r in report["items"]] == [(defaults()["clip"], "planned")]
    assert not (tmp_path / "hf").exists()


def test_geneval_prompts_offline_from_a_warm_cache(tmp_path, monkeypatch, test_data):
    """GenEval's prompt file is checked in its cache like MultiGen's (a tampered copy is refused)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    from tcompose.download import Item, fetch_prompts

    with pytest.raises(Exception, match="evaluation_metadata"):
        fetch_prompts(Item("prompts", "geneval", "GenEval prompts"))
    cache = tmp_path / "hf" / "tcompose" / "geneval"
    cache.mkdir(parents=True)
    shutil.copy(test_data / "geneval" / "evaluation_metadata.jsonl", cache / "evaluation_metadata.jsonl")
    got = fetch_prompts(Item("prompts", "geneval", "GenEval prompts"))
    assert got["status"] == "cached" and got["path"] == str(cache / "evaluation_metadata.jsonl")
    with (cache / "evaluation_metadata.jsonl").open("a") as f:
        f.write("\n")
    with pytest.raises(Exception, match="sha256"):
        fetch_prompts(Item("prompts", "geneval", "GenEval prompts"))
