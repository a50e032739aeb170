"""Table 1 end to end on tiny random models: the FID sets, fid, latency, then tcompose table over multigen,
visor, fid and latency folders, with the published rows beside and "not run" where nothing was measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tcompose.evaluate.fid.sets import coco_pairs, flickr30k_pairs
from tcompose.evaluate.settings import GenerationSettings
from tcompose.evaluate.table import COLUMNS, NOT_RUN

SETTINGS = GenerationSettings(steps=2, height=32, width=32, device="cpu")  # tiny models: 32 px, 2 steps

# ------------------------------------------------------------------------------------------------ the sets


def test_coco_pairs_draw_captions_from_the_folder(test_data):
    folder = test_data / "coco-mini-val2017"
    anns = json.loads((folder / "annotations" / "captions_val2017.json").read_text())["annotations"]
    pairs, ref = coco_pairs(folder, n=50, seed=0)
    assert len(pairs) == 50 and [p.prompt_id for p in pairs] == list(range(50))
    assert pairs == coco_pairs(folder, n=50, seed=0)[0] and pairs != coco_pairs(folder, n=50, seed=1)[0]
    ids = [int(p.caption_id) for p in pairs]
    assert ids == sorted(ids) and len(set(ids)) == 50  # no caption twice, in annotation-id order
    by_id = {a["id"]: a for a in anns}
    assert all(" ".join(by_id[i]["caption"].split()) == p.caption for i, p in zip(ids, pairs))
    assert all(str(by_id[i]["image_id"]) == p.image_id for i, p in zip(ids, pairs))
    assert len(ref) == len(list((folder / "val2017").glob("*.jpg"))) and all((folder / r).is_file() for r in ref)
    n = sum((folder / "val2017" / f"{a['image_id']:012d}.jpg").is_file() for a in anns)
    assert len(coco_pairs(folder, n=n)[0]) == n  # every caption whose image is there; more are refused
    with pytest.raises(ValueError, match=f"--coco-captions {n + 1}: .* has only {n} captions"):
        coco_pairs(folder, n=n + 1)
    with pytest.raises(ValueError, match="captions_val2017.json"):
        coco_pairs(folder / "val2017")


def _flickr(root: Path, n_images=6, kaggle=False) -> Path:
    images = root / "flickr30k-images"
    images.mkdir(parents=True)
    lines = []
    for i in range(n_images):
        Image.fromarray(np.full((40 + i, 50, 3), 20 * i, np.uint8)).save(images / f"{1000 + i}.jpg")
        lines += [(f"{1000 + i}.jpg", k, f"caption {k} of image {i}") for k in range(5)]
    if kaggle:
        (root / "results.csv").write_text("image_name| comment_number| comment\n" + "\n".join(
            f"{f}| {k}| {t}" for f, k, t in lines) + "\n")
    else:
        (root / "results_20130124.token").write_text("\n".join(f"{f}#{k}\t{t}" for f, k, t in lines) + "\n")
    return root


def test_flickr30k_pairs_one_caption_per_image_from_the_split(tmp_path):
    folder = _flickr(tmp_path / "f")
    (tmp_path / "val.txt").write_text("1001\n1002\n1003\n1004\n")
    pairs, ref = flickr30k_pairs(folder, n=3, seed=0, split_file=tmp_path / "val.txt")
    assert len(pairs) == 3 and {p.image_id for p in pairs} <= {"1001", "1002", "1003", "1004"}
    assert len({p.image_id for p in pairs}) == 3 and ref == [p.image for p in pairs]
    assert all(p.caption.startswith("caption ") and p.caption.endswith(f"image {int(p.image_id) - 1000}")
               for p in pairs)
    assert pairs == flickr30k_pairs(folder, n=3, seed=0, split_file=tmp_path / "val.txt")[0]
    kaggle = _flickr(tmp_path / "k", kaggle=True)
    assert [p.image_id for p in flickr30k_pairs(kaggle, n=6)[0]] == [str(1000 + i) for i in range(6)]
    with pytest.raises(ValueError, match="--flickr30k-pairs 7: .* has only 6 images with captions; pass "
                                         "--flickr30k-pairs 6 or fewer"):
        flickr30k_pairs(kaggle, n=7)  # never fewer pairs than asked, silently
    with pytest.raises(ValueError, match="only 4 images with captions among the ids of --flickr30k-split"):
        flickr30k_pairs(folder, n=5, split_file=tmp_path / "val.txt")
    with pytest.raises(ValueError, match="no captions file"):
        flickr30k_pairs(tmp_path)


# ------------------------------------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, test_data):
    from tcompose.evaluate.multigen.prompts import sample_prompts
    from tcompose.data.categories import COCO_80
    from tcompose.evaluate.visor.prompts import spatial_prompts
    from tcompose.testing.tiny_sd import write_tiny_pipeline
    from tcompose.testing.tiny_detectors import write_tiny_owlv2, write_tiny_owlvit
    from tcompose.testing.tiny_vision import write_tiny_clip

    root = tmp_path_factory.mktemp("t1")
    caps = [a["caption"] for a in json.loads((test_data / "coco-mini-val2017" / "annotations" /
                                              "captions_val2017.json").read_text())["annotations"]]
    corpus = caps + [p.text for p in sample_prompts(COCO_80, 5, seed=0)] + [q.text for q in spatial_prompts(5)]
    return {"sd": write_tiny_pipeline(root / "sd", corpus=corpus), "owlv2": write_tiny_owlv2(root / "owlv2"),
            "owlvit": write_tiny_owlvit(root / "owlvit"), "clip": write_tiny_clip(root / "clip", corpus=caps),
            "coco": test_data / "coco-mini-val2017", "root": root,
            "coco_prompts": test_data / "multigen" / "coco_obj_comp_5_1k.json"}


def _models(tiny):
    return [f"A={tiny['sd']}", f"B={tiny['sd']}"]


@pytest.mark.slow
def test_fid_run_against_a_recomputation_and_resume(tiny, tmp_path):
    from tcompose.evaluate.fid.frechet import frechet_distance
    from tcompose.evaluate.fid.inception import TinyFeatureNet
    from tcompose.evaluate.fid.stage import FidConfig, generated_pixels, reference_pixels, run
    from tcompose.evaluate.fid.clip_score import ClipScorer

    net = TinyFeatureNet(seed=0)
    flickr = _flickr(tmp_path / "flickr")
    cfg = FidConfig(models=_models(tiny), output=tmp_path / "fid", coco=tiny["coco"], coco_captions=6,
                    flickr30k=flickr, flickr30k_pairs=4, settings=SETTINGS, reference_size=32,
                    clip_model=str(tiny["clip"]), cache_dir=tmp_path / "cache", feature_batch_size=5)
    summary = run(cfg, progress=False, net=net)
    a = summary["models"]["A"]
    assert a["coco"]["images"] == 6 and a["flickr30k"]["images"] == 4 and a["flickr30k"]["reference_images"] == 4
    assert summary["models"]["A"] == summary["models"]["B"]  # same model, same seeds
    # the FID is the Frechet distance of the features, recomputed here image by image
    sets = json.loads((tmp_path / "fid" / "sets" / "coco.json").read_text())
    ref = np.concatenate([net.features(_nchw(reference_pixels(tiny["coco"] / r, 32))).numpy()
                          for r in sets["reference"]])
    gen_paths = sorted((tmp_path / "fid" / "models" / "A" / "coco" / "images").glob("*.png"))
    gen = np.concatenate([net.features(_nchw(generated_pixels(p))).numpy() for p in gen_paths])
    want = frechet_distance(gen.mean(0), np.cov(gen, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False))
    assert a["coco"]["fid"] == pytest.approx(want, rel=1e-6)
    scorer = ClipScorer.load(str(tiny["clip"]), device="cpu")
    clip = scorer.score([generated_pixels(p) for p in gen_paths], [q["caption"] for q in sets["pairs"]])
    assert a["coco"]["clip_score"] == pytest.approx(float(np.mean(clip)), rel=1e-5)
    assert list((tmp_path / "cache").glob("reference-coco-*.npz"))  # the reference statistics are cached
    md = (tmp_path / "fid" / "summary.md").read_text()
    assert "| A |" in md and "SD1.4 (paper)" in md and "20.88" in md

    again = run(cfg, progress=False, net=net)  # nothing is generated again, the statistics are reused
    assert again["models"] == summary["models"]
    only_a = run(FidConfig(**{**cfg.__dict__, "models": _models(tiny)[:1]}), progress=False, net=net)
    assert only_a["models"] == summary["models"]  # B, scored by an earlier run into this folder, stays
    gen_run = json.loads((tmp_path / "fid" / "models" / "A" / "coco" / "run.json").read_text())["summary"]
    assert gen_run["generated"] == 0
    with pytest.raises(ValueError, match="other caption sets"):
        run(FidConfig(**{**cfg.__dict__, "coco_captions": 5}), progress=False, net=net)


def _nchw(pixels):
    import torch

    return torch.from_numpy(np.array(pixels))[None].permute(0, 3, 1, 2).contiguous()


def test_table_takes_only_the_papers_multigen_prompts(tmp_path):
    from tcompose.evaluate.table import collect

    summary = {"dataset": "coco", "prompt_source": {"kind": "sampled", "dataset": "coco"}, "num_prompts": 1000,
               "images_per_prompt": 10, "threshold": 0.1,
               "models": {"A": {"MG1": [90.0, 1.0], "MG2": [50.0, 1.0], "MG3": [20.0, 1.0], "MG4": [5.0, 1.0],
                                "MG5": [1.0, 0.5]}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="sampled 'coco' prompts, not the paper's 'coco' set"):
        collect(multigen_coco=tmp_path)
    summary["prompt_source"]["kind"] = "paper"
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    got = collect(multigen_coco=tmp_path)
    assert got["models"]["A"][COLUMNS[1]] == [50.0, 20.0, 5.0, 1.0]  # MG2..MG5, the means
    assert got["protocols"]["MultiGen coco"] == "1000 prompts x 10 images, threshold 0.1"


def test_fid_refuses_bad_input_before_any_image(tiny, tmp_path, capsys, monkeypatch):
    from tcompose.cli import main

    monkeypatch.setenv("TCOMPOSE_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "fid"
    args = ["fid", "--model", f"A={tiny['sd']}", "-o", str(out), "--steps", "2", "--height", "32", "--width", "32",
            "--coco-captions", "4"]
    assert main(args) == 2  # no --coco / --flickr30k
    assert main([*args, "--coco", str(tiny["coco"])]) == 2  # no Inception weights in the cache
    assert main([*args, "--coco", str(tiny["coco"] / "val2017")]) == 2
    err = capsys.readouterr().err
    assert "pass --coco COCO_DIR and/or --flickr30k" in err and "tcompose download fid" in err
    assert "captions_val2017.json" in err and not out.exists()


@pytest.mark.slow
def test_table1_from_every_benchmark_folder(tiny, tmp_path, capsys):
    from tcompose.cli import main
    from tcompose.evaluate.fid.inception import TinyFeatureNet
    from tcompose.evaluate.fid.stage import FidConfig
    from tcompose.evaluate.fid.stage import run as fid_run
    from tcompose.evaluate.multigen.stage import MultigenConfig
    from tcompose.evaluate.multigen.stage import run as multigen_run
    from tcompose.evaluate.visor.stage import VisorConfig
    from tcompose.evaluate.visor.stage import run as visor_run

    common = dict(settings=SETTINGS)
    multigen_run(MultigenConfig(models=_models(tiny), output=tmp_path / "mg", dataset="coco", prompts=2, images=2,
                                prompt_file=tiny["coco_prompts"], detector=str(tiny["owlv2"]), **common),
                 progress=False)
    visor_run(VisorConfig(models=_models(tiny), output=tmp_path / "visor", prompts=2, images=2,
                          detector=str(tiny["owlvit"]), **common), progress=False)
    fid_run(FidConfig(models=_models(tiny)[:1], output=tmp_path / "fid", coco=tiny["coco"], coco_captions=4,
                      reference_size=32, clip_model=None, cache_dir=tmp_path / "cache", **common),
            progress=False, net=TinyFeatureNet(seed=0))
    assert main(["latency", "--model", _models(tiny)[0], "-o", str(tmp_path / "lat"), "--images", "2",
                 "--steps", "2", "--height", "32", "--width", "32"]) == 0
    lat = json.loads((tmp_path / "lat" / "latency.json").read_text())["models"]["A"]
    assert lat["s_per_image"] > 0 and lat["images"] == 2 and lat["steps"] == 2 and lat["device_name"].startswith("CPU")

    assert main(["table", "--multigen-ade20k", str(tmp_path / "mg")]) == 2  # a COCO run given as ADE20K
    assert "not the paper's 'ade20k' set" in capsys.readouterr().err
    out = tmp_path / "table.md"
    assert main(["table", "--multigen-coco", str(tmp_path / "mg"), "--visor", str(tmp_path / "visor"),
                 "--fid", str(tmp_path / "fid"),
                 "--latency", str(tmp_path / "lat"), "--output", str(out)]) == 0
    md = out.read_text()
    assert md == capsys.readouterr().out
    table = json.loads(out.with_suffix(".json").read_text())
    a, b = table["models"]["A"], table["models"]["B"]
    visor = json.loads((tmp_path / "visor" / "summary.json").read_text())["models"]
    assert a["OA"] == visor["A"]["OA"] and a["latency (s/img)"] == lat["s_per_image"]
    mg = json.loads((tmp_path / "mg" / "summary.json").read_text())["models"]["A"]
    assert a["MG COCO (2/3/4/5)"] == [mg[k][0] for k in ("MG2", "MG3", "MG4", "MG5")]
    assert a["FID COCO"] == json.loads((tmp_path / "fid" / "summary.json").read_text())["models"]["A"]["coco"]["fid"]
    assert "FID COCO" not in b and "latency (s/img)" not in b  # B was not measured there
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert rows["B"].count(NOT_RUN) == len(COLUMNS) - 2  # only its OA and MultiGen COCO were measured
    assert "TokenCompose SD1.4 (paper)" in rows and "52.15" in rows["TokenCompose SD1.4 (paper)"]
    assert "98.08 / 76.16 / 28.81 / 3.28" in rows["TokenCompose SD1.4 (paper)"]
    assert "VISOR: 2 spatial prompts x 2 images" in md and "latency A: 2 steps" in md
    assert "MultiGen coco: 2 prompts x 2 images" in md
    assert main(["table"]) == 2 and "pass at least one run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_a_rerun_of_a_finished_fid_keeps_the_recorded_timing(tiny, tmp_path):
    from tcompose.evaluate.fid.inception import TinyFeatureNet
    from tcompose.evaluate.fid.stage import FidConfig, run

    net = TinyFeatureNet(seed=0)
    cfg = FidConfig(models=_models(tiny)[:1], output=tmp_path / "fid", coco=tiny["coco"], coco_captions=4,
                    flickr30k=None, settings=SETTINGS, reference_size=32, clip_model=None,
                    cache_dir=tmp_path / "cache", feature_batch_size=5)
    first = run(cfg, progress=False, net=net)
    assert first["generation"]["A/coco"]["generated"] == 4
    again = run(cfg, progress=False, net=net)  # nothing left to generate
    assert again["models"] == first["models"]
    for key in ("generation", "seconds_scoring"):
        assert again[key] == first[key], key
        assert json.loads((tmp_path / "fid" / "summary.json").read_text())[key] == first[key], key
