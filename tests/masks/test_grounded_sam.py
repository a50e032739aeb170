"""The grounded-SAM masks source: phrase mapping on crafted GroundingDINO outputs, prompts, and the pipeline end
to end with tiny random GroundingDINO / SAM-HQ / SAM / CLIP models saved to and loaded from disk."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tcompose.data.synthetic import make_scenes
from tcompose.io.datasets import MANIFEST, DatasetError, decode_mask, iter_rows, schema_for, shard_files
from tcompose.masks.caption_choice import best_per_image
from tcompose.masks.config import MasksConfig
from tcompose.masks.grounding_dino import assign_phrases, boxes_to_pixels, build_prompts, clean_phrase
from tcompose.masks.segment import scale_boxes, union_by_label
from tcompose.masks.sources import SOURCES
from tcompose.masks.stage import STATS_KEYS, run
from tcompose.testing.tiny_vision import bert_tokenizer

# --------------------------------------------------------------------------------------------------------------
# Phrase mapping on hand-made outputs


def _reference_assign(probs, spans, box_t, text_t):
    """The rule, spelt out in float64 with plain loops."""
    out = []
    for row in probs.double().tolist():
        if max(row) <= box_t:
            out.append(-1)
            continue
        best = [max(row[t] for t in s) for s in spans]
        k = max(range(len(spans)), key=lambda i: (best[i], -i))
        out.append(k if best[k] > text_t else -1)
    return out


def test_assign_phrases_on_crafted_outputs():
    # [CLS] wine glass . dog . wine glass . [SEP] pad pad: "wine glass" twice (a repeated phrase), separators at 3/5/8
    spans = [(1, 2), (4,), (6, 7)]
    probs = torch.zeros(9, 12)
    probs[0, 4] = 0.9  # clearly "dog"
    probs[1, 2] = 0.6  # the second token of "wine glass" carries it
    probs[2, 1], probs[2, 4] = 0.7, 0.7  # a tie: the earlier phrase wins
    probs[3, 3], probs[3, [1, 2, 4, 6, 7]] = 0.95, 0.1  # above the box threshold only on a separator: dropped
    probs[4, 0], probs[4, 9] = 0.99, 0.99  # only [CLS] / [SEP]: dropped
    probs[5, :10] = 0.2  # below the box threshold everywhere
    probs[6, 4] = 0.3  # kept at text threshold 0.25, dropped at 0.35
    probs[7, 7], probs[7, 1] = 0.8, 0.5  # the repeated phrase's second copy is the better one
    probs[8, 3], probs[8, 4] = 0.99, 0.3  # best on a separator, but "dog" passes the text threshold
    got = assign_phrases(probs, spans, 0.25, 0.25)
    assert got.tolist() == [1, 0, 0, -1, -1, -1, 1, 2, 1] == _reference_assign(probs, spans, 0.25, 0.25)
    strict = assign_phrases(probs, spans, 0.25, 0.35)
    assert strict.tolist() == [1, 0, 0, -1, -1, -1, -1, 2, -1] == _reference_assign(probs, spans, 0.25, 0.35)
    logits = torch.randn(50, 16, generator=torch.Generator().manual_seed(0)) * 3
    logits[:, 11:] = float("-inf")  # padding of GroundingDINO's 256 text positions
    spans = [(1,), (3, 4), (6,), (8, 9)]
    probs = logits.sigmoid()
    assert assign_phrases(probs, spans, 0.3, 0.4).tolist() == _reference_assign(probs, spans, 0.3, 0.4)
    assert assign_phrases(torch.zeros(0, 16), spans).shape == (0,)
    assert assign_phrases(torch.ones(3, 16), []).tolist() == [-1, -1, -1]


@pytest.fixture(scope="module")
def bert():
    return bert_tokenizer(["wine", "glass", "dog", "hot", "stand", "mr", "smith", "table"])


def test_prompts_spans_and_dedup(bert):
    phrases = ["wine glass", "Dog", "dog", "hot-dog stand", "mr. smith", "?", "zebrafish", "wine  glass"]
    ps = build_prompts(bert, phrases)
    (prompt,) = ps.prompts
    assert prompt.text == "wine glass . dog . hot-dog stand . mr smith . zebrafish ."
    assert list(prompt.input_ids) == bert(prompt.text)["input_ids"]
    assert ps.index == [(0, 0), (0, 1), (0, 1), (0, 2), (0, 3), None, (0, 4), (0, 0)]
    separators = {i for i, t in enumerate(prompt.input_ids) if t in (101, 102, 1012)}
    for key, span in zip(prompt.phrases, prompt.spans):
        assert not separators & set(span) and list(span) == list(range(span[0], span[-1] + 1))
        assert bert.decode([prompt.input_ids[t] for t in span]).replace(" ", "") == key.replace(" ", "")
    assert len(prompt.spans[4]) > 3  # "zebrafish" is word pieces: every piece is in the span
    assert clean_phrase(" Mr. Smith? ") == "mr smith"


def test_long_prompts_are_split_in_order(bert):
    phrases = ["dog", "wine glass", "table", "hot dog stand", "smith", "wine wine wine wine wine wine wine", "mr"]
    ps = build_prompts(bert, phrases, max_tokens=8)  # [CLS] + 6 + [SEP]
    assert all(len(p.input_ids) <= 8 for p in ps.prompts)
    assert [p.text for p in ps.prompts] == ["dog . wine glass .", "table . hot dog stand .", "smith . mr ."]
    assert [k for p in ps.prompts for k in p.phrases] == [p for p in phrases if p != phrases[5]]
    assert ps.index[5] is None  # longer than a whole prompt
    for i, where in enumerate(ps.index):
        if where is not None:
            assert ps.prompts[where[0]].phrases[where[1]] == phrases[i]


def test_boxes_masks_and_caption_choice_helpers():
    from transformers.image_transforms import center_to_corners_format
    from transformers.models.sam.image_processing_pil_sam import _normalize_coordinates

    rel = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.3, 0.1]])
    expected = center_to_corners_format(rel) * torch.tensor([640, 480, 640, 480])
    assert torch.allclose(boxes_to_pixels(rel, 480, 640), expected)
    boxes = torch.tensor([[10.0, 20.0, 300.0, 400.0], [0.0, 0.0, 640.0, 427.0]])
    sam_frame = _normalize_coordinates(1024, boxes.numpy(), (427, 640), is_bounding_box=True)
    assert torch.allclose(scale_boxes(boxes, (427, 640), (683, 1024)), torch.tensor(sam_frame, dtype=torch.float32))
    masks = torch.zeros(4, 3, 3, dtype=torch.bool)
    masks[0, 0, 0] = masks[1, 1, 1] = masks[2, 2, 2] = masks[3, 0, 2] = True
    union = union_by_label(masks, torch.tensor([2, 0, 2, 0]), 3)
    assert union[1] is None
    assert union[0].nonzero().tolist() == [[0, 2], [1, 1]] and union[2].nonzero().tolist() == [[0, 0], [2, 2]]
    scores = torch.tensor([[0.1, 0.3, 0.3, 9.0, 9.0], [5.0, 5.0, 0.2, 0.4, 0.4]])
    assert best_per_image(scores, [3, 2]) == [1, 0]  # image 0: its 3 captions; image 1: its 2 (a tie each)


# --------------------------------------------------------------------------------------------------------------
# Tiny models on disk


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tcompose.testing.tiny_vision import write_tiny_clip, write_tiny_grounding_dino, write_tiny_sam

    root = tmp_path_factory.mktemp("models")
    scenes = make_scenes(root / "coco", n_images=7, size=48, seed=3, corrupt=1)
    caps = json.loads((scenes / "annotations" / "captions_train2017.json").read_text())
    words = {w.strip(",.").lower() for a in caps["annotations"] for w in a["caption"].split()}
    return {
        "scenes": scenes,
        "gd": write_tiny_grounding_dino(root / "gd", words=sorted(words)),
        "gd_short": write_tiny_grounding_dino(root / "gd-short", words=sorted(words), max_text_len=12),
        "sam_hq": write_tiny_sam(root / "sam-hq", hq=True),
        "sam": write_tiny_sam(root / "sam", hq=False),
        "clip": write_tiny_clip(root / "clip", corpus=[a["caption"] for a in caps["annotations"]]),
    }


def _images(scenes, n=3):
    files = sorted((scenes / "train2017").glob("*.jpg"))[:n]
    return [Image.open(f).convert("RGB") for f in files]


def _reference_masks(tiny, image, phrases, gd="gd", box_t=0.25, text_t=0.25):
    """One image through transformers' own processors and post-processing: per phrase, the OR of its boxes' masks."""
    from transformers import (
        AutoModelForZeroShotObjectDetection,
        AutoTokenizer,
        GroundingDinoProcessor,
        SamHQModel,
        SamHQProcessor,
    )
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil
    from transformers.models.sam import SamImageProcessorPil

    tok = AutoTokenizer.from_pretrained(tiny[gd])
    proc = GroundingDinoProcessor(GroundingDinoImageProcessorPil.from_pretrained(tiny[gd]), tok)
    ps = build_prompts(tok, phrases, AutoModelForZeroShotObjectDetection.from_pretrained(tiny[gd]).config.max_text_len)
    det = AutoModelForZeroShotObjectDetection.from_pretrained(tiny[gd]).eval()
    sam_proc = SamHQProcessor(SamImageProcessorPil.from_pretrained(tiny["sam_hq"]))
    sam = SamHQModel.from_pretrained(tiny["sam_hq"]).eval()
    out = {}
    for prompt in ps.prompts:
        inputs = proc(images=image, text=prompt.text, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == list(prompt.input_ids)
        with torch.no_grad():
            res = det(**inputs)
        post = proc.post_process_grounded_object_detection(res, threshold=box_t, text_threshold=text_t,
                                                           target_sizes=[(image.height, image.width)])[0]
        probs = res.logits.sigmoid()[0]
        labels = assign_phrases(probs, prompt.spans, box_t, text_t)
        boxes = post["boxes"][labels[probs.max(-1).values > box_t] >= 0]
        labels = labels[labels >= 0]
        for slot, key in enumerate(prompt.phrases):
            sel = boxes[labels == slot]
            if not len(sel):
                out[key] = None
                continue
            enc = sam_proc(images=image, input_boxes=[sel.tolist()], return_tensors="pt")
            with torch.no_grad():
                pred = sam(pixel_values=enc["pixel_values"], input_boxes=enc["input_boxes"], multimask_output=False)
            masks = sam_proc.post_process_masks(pred.pred_masks, enc["original_sizes"], enc["reshaped_input_sizes"])[0]
            out[key] = masks[:, 0].any(0).numpy()
    return {p: out.get(clean_phrase(p)) for p in phrases}


def test_ground_phrases_match_transformers_reference(tiny):
    from tcompose.masks import grounding_dino, segment
    from tcompose.masks.grounded_sam import GroundedSam

    det = grounding_dino.Detector.load(str(tiny["gd"]), batch_size=2)  # 3 images: two detector batches
    seg = segment.Segmenter.load(str(tiny["sam_hq"]), batch_size=2)
    images = _images(tiny["scenes"])
    inputs = {"detector": grounding_dino.preprocess(det.image_processor, images),
              "segmenter": segment.preprocess(seg.image_processor, images)}
    phrases = [[["table", "kite"], ["Kite", "red ball"]], [["cup"]], [["ball", "box", "table"]]]
    captions = [["c0", "c1"], ["c2"], ["c3"]]
    got = GroundedSam(det, seg).ground_phrases(inputs, [(im.height, im.width) for im in images], captions, phrases)
    assert [[g.caption for g in gs] for gs in got] == captions
    for image, per_caption, groundings in zip(images, phrases, got):
        ref = _reference_masks(tiny, image, [p for ps in per_caption for p in ps])
        for ps, g in zip(per_caption, groundings):
            assert g.phrases == ps and g.categories == [""] * len(ps)
            for p, m in zip(ps, g.masks):
                assert (m is None) == (ref[p] is None), p
                if m is not None:
                    assert m.shape == (image.height, image.width) and np.array_equal(m, ref[p]), p
        assert groundings[0].stats["boxes"] > 0 and all(g.stats["boxes"] == 0 for g in groundings[1:])
    assert np.array_equal(got[0][0].masks[1], got[0][1].masks[0])  # "kite" and "Kite": one slot, one mask


def test_long_prompt_becomes_several_detector_passes(tiny):
    from tcompose.masks import grounding_dino, segment
    from tcompose.masks.grounded_sam import GroundedSam

    det = grounding_dino.Detector.load(str(tiny["gd_short"]))  # 12 text tokens
    seg = segment.Segmenter.load(str(tiny["sam_hq"]))
    images = _images(tiny["scenes"], 1)
    inputs = {"detector": grounding_dino.preprocess(det.image_processor, images),
              "segmenter": segment.preprocess(seg.image_processor, images)}
    phrases = ["table", "red kite", "cup", "ball", "box", "purple", "wooden table",
               "a very long phrase with too many words to fit"]
    assert len(det.prompts(phrases).prompts) == 2
    (g,), = GroundedSam(det, seg).ground_phrases(inputs, [(48, 48)], [["c"]], [[phrases]])
    assert g.masks[-1] is None and g.stats["phrases_not_prompted"] == 1
    ref = _reference_masks(tiny, images[0], phrases[:-1], gd="gd_short")
    for p, m in zip(phrases, g.masks[:-1]):
        assert (m is None) == (ref[p] is None) and (m is None or np.array_equal(m, ref[p])), p
    assert g.stats["phrases_no_box"] == sum(ref[p] is None for p in phrases[:-1])


# --------------------------------------------------------------------------------------------------------------
# The stage: run() and the CLI


def _cfg(tiny, out, **kw):
    base = dict(source="grounded-sam", detector=str(tiny["gd"]), segmenter=str(tiny["sam_hq"]), workers=0,
                batch_size=2, shard_size=3, captions="all")
    return MasksConfig(tiny["scenes"], out, **{**base, **kw})


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    cfg = _cfg(tiny, tmp_path_factory.mktemp("ref") / "masks")
    return cfg, run(cfg, progress=False)


def test_end_to_end_schema_phrases_union_and_counts(tiny, reference_run, tmp_path):
    import datasets

    from tcompose.data.coco import CocoDataset
    from tcompose.data.nouns import noun_phrases

    cfg, manifest = reference_run
    for f in shard_files(cfg.output):
        assert pq.read_schema(f).remove_metadata() == schema_for("masks").remove_metadata()
    ds = datasets.load_dataset("parquet", data_dir=str(cfg.output), cache_dir=str(tmp_path / "hf"))["train"]
    rows = list(iter_rows(cfg.output))
    assert len(ds) == len(rows) == manifest["num_rows"] > 0
    coco = CocoDataset(tiny["scenes"], instances=False)
    assert [r["image_id"] for r in rows] == sorted(r["image_id"] for r in rows)
    nulls = 0
    for r in rows:
        image = coco[r["image_id"]]
        assert r["source"] == "grounded-sam" and r["caption"] in image.captions
        assert r["phrases"] == noun_phrases(r["caption"]) and r["categories"] == [""] * len(r["phrases"])
        for m in r["masks"]:
            nulls += m is None
            assert m is None or decode_mask(m).shape == (image.height, image.width)
    s = manifest["stats"]
    assert set(s) == set(STATS_KEYS) | set(SOURCES["grounded-sam"].stats)
    assert s["images"] == 8 and s["images_skipped_unreadable"] == 1 and s["rows"] == len(rows)
    assert s["captions"] == sum(len(coco[i].captions) for i in coco.ids if i != 8)
    assert s["phrases"] == sum(len(r["phrases"]) for r in rows) and s["masks_empty"] == nulls
    assert s["boxes"] > 0 and s["phrases_no_box"] + s["phrases_not_prompted"] <= nulls
    (bad,) = [sk for sk in manifest["skipped"] if sk["caption"] is None]
    assert bad["image_id"] == 8 and bad["reason"].startswith("image does not decode")
    assert s["captions_no_match"] == len(manifest["skipped"]) - 1
    # image 1's rows, against transformers' own pipeline on the union of its captions' phrases (one prompt)
    image = Image.open(tiny["scenes"] / "train2017" / "000000000001.jpg").convert("RGB")
    mine = [r for r in rows if r["image_id"] == 1]
    ref = _reference_masks(tiny, image, list(dict.fromkeys(p for r in mine for p in r["phrases"])))
    for r in mine:
        for p, m in zip(r["phrases"], r["masks"]):
            assert (m is None) == (ref[p] is None or not ref[p].any())
            assert m is None or np.array_equal(decode_mask(m), ref[p])
    config = manifest["config"]
    assert config["detector"] == str(tiny["gd"]) and config["box_threshold"] == 0.25 and config["dtype"] == "float32"


def test_strict_thresholds_keep_phrases_without_boxes(tiny, reference_run, tmp_path):
    from tcompose.masks.stage import summary_line

    manifest = run(_cfg(tiny, tmp_path / "strict", box_threshold=0.99, text_threshold=0.9999), progress=False)
    s, ref = manifest["stats"], reference_run[1]["stats"]
    assert s["rows"] == ref["rows"] and s["phrases"] == ref["phrases"]  # phrases without a box keep their rows
    assert s["boxes"] < ref["boxes"] and s["phrases_no_box"] > ref["phrases_no_box"]
    assert s["masks_empty"] == sum(m is None for r in iter_rows(tmp_path / "strict") for m in r["masks"])
    line = summary_line(manifest, tmp_path / "strict", manifest["throughput"])
    assert f"{s['phrases'] - s['masks_empty']} with a mask" in line and "without a box" in line and "images/s" in line


def test_resume_after_a_kill_gives_the_same_rows(tiny, reference_run, tmp_path, shard_writes):
    cfg, reference = reference_run
    expected = list(iter_rows(cfg.output))

    shard_writes.kill_after_first()
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(tiny, out, workers=2), progress=False)  # worker processes feed the batches
    assert [p.name for p in shard_files(out)] == ["train-00000.parquet"] and not (out / MANIFEST).exists()

    written = shard_writes.record()
    manifest = run(_cfg(tiny, out, workers=2), progress=False)
    assert written == [1, 2] and list(iter_rows(out)) == expected
    assert manifest["stats"] == reference["stats"] and manifest["skipped"] == reference["skipped"]
    with pytest.raises(DatasetError, match="other settings"):  # boxes depend on the batch's padding
        run(_cfg(tiny, out, batch_size=3), progress=False)


def test_clip_best_with_sam(tiny, tmp_path):
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    from tcompose.data.coco import CocoDataset

    cfg = _cfg(tiny, tmp_path / "clip", captions="clip-best", clip_model=str(tiny["clip"]), segmenter=str(tiny["sam"]))
    manifest = run(cfg, progress=False)
    model = CLIPModel.from_pretrained(tiny["clip"]).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(tiny["clip"]),
                         tokenizer=AutoTokenizer.from_pretrained(tiny["clip"]))
    coco = CocoDataset(tiny["scenes"], instances=False)
    chosen = {}
    for i in coco.ids[:-1]:  # the last image does not decode
        image = Image.open(coco.image_path(coco[i])).convert("RGB")
        with torch.no_grad():
            logits = model(**proc(text=list(coco[i].captions), images=image, padding=True, return_tensors="pt"))
        chosen[i] = coco[i].captions[int(logits.logits_per_image[0].argmax())]
    assert len(set(chosen.values())) > 1 and any(coco[i].captions[0] != c for i, c in chosen.items())
    rows = list(iter_rows(cfg.output))
    no_match = {s["image_id"]: s["caption"] for s in manifest["skipped"] if s["caption"]}
    assert {r["image_id"]: r["caption"] for r in rows} | no_match == chosen
    assert manifest["stats"]["captions"] == 7 and manifest["config"]["clip_model"] == str(tiny["clip"])


def test_cli_image_ids_dtype_note_and_errors(tiny, tmp_path):
    from typer.testing import CliRunner

    from tcompose.cli import app

    ids = tmp_path / "ids.txt"
    ids.write_text("5\n# a comment\n\n2\n")
    common = [str(tiny["scenes"]), "--detector", str(tiny["gd"]), "--segmenter", str(tiny["sam_hq"]), "--workers", "0"]
    res = CliRunner().invoke(app, ["masks", *common, "-o", str(tmp_path / "o"), "--image-ids", str(ids),
                                   "--dtype", "fp16", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    assert "running in fp32 instead" in res.output and "images/s" in res.output
    manifest = json.loads((tmp_path / "o" / MANIFEST).read_text())
    assert manifest["config"]["dtype"] == "float32" and manifest["config"]["image_ids"].startswith("2:")
    assert manifest["stats"]["images"] == 2 and {r["image_id"] for r in iter_rows(tmp_path / "o")} <= {2, 5}
    for text, message in (("2\n999\n", "999"), ("2\nseven\n", "is not an image id")):
        ids.write_text(text)
        res = CliRunner().invoke(app, ["masks", *common, "-o", str(tmp_path / "bad"), "--image-ids", str(ids)])
        assert res.exit_code == 2 and message in res.output, res.output
    res = CliRunner().invoke(app, ["masks", *common, "-o", str(tmp_path / "bad"), "--detector", str(tiny["sam"])])
    assert res.exit_code == 2 and "not a GroundingDINO checkpoint" in res.output, res.output
    assert not (tmp_path / "bad" / MANIFEST).exists()


def test_bad_settings_are_clear(tiny, tmp_path):
    from tcompose.masks.grounding_dino import Detector
    from tcompose.masks.segment import Segmenter
    from tcompose.models.loading import ModelFolderError

    out = tmp_path / "o"
    for kw, message in ((dict(nouns="magic"), "--nouns must be"), (dict(dtype="fp8"), "--dtype must be"),
                        (dict(text_threshold=1.5), "--text-threshold must be"), (dict(captions="best"), "--captions")):
        with pytest.raises(ValueError, match=message):
            run(_cfg(tiny, out, **kw), progress=False)
    with pytest.raises(ValueError, match="neither SAM-HQ nor SAM"):
        Segmenter.load(str(tiny["gd"]))
    with pytest.raises(ModelFolderError, match="detector folder not found"):
        Detector.load(str(tmp_path / "missing"))
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1 forbids downloading"):
        Detector.load("IDEA-Research/grounding-dino-tiny")


def test_segmenter_box_chunks_and_images_without_boxes(tiny):
    from tcompose.masks import segment

    seg = segment.Segmenter.load(str(tiny["sam_hq"]))
    images = _images(tiny["scenes"], 2)
    inputs = segment.preprocess(seg.image_processor, images)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 30.0], [5.0, 5.0, 47.0, 47.0], [10.0, 2.0, 12.0, 40.0]] * 3)
    whole = seg.segment(inputs, [torch.zeros((0, 4)), boxes])
    seg.boxes_per_call = 4
    chunked = seg.segment(inputs, [torch.zeros((0, 4)), boxes])
    assert whole[0] is None and chunked[0] is None  # no box: no encoder pass, no masks
    assert whole[1].shape == (9, 48, 48) and torch.equal(whole[1], chunked[1])


@pytest.mark.slow
def test_train_unet_reads_a_grounded_sam_dataset(tiny, reference_run, tmp_path):
    """The stages compose: grounded-sam rows (empty categories, null masks for phrases without a box) train."""
    import json

    from tcompose.testing.tiny_sd import write_tiny_pipeline
    from tcompose.train.config import TrainUnetConfig
    from tcompose.train.loop import run as train

    cfg, _ = reference_run
    captions = [a["caption"] for a in json.loads((tiny["scenes"] / "annotations" / "captions_train2017.json").read_text())["annotations"]]
    base = write_tiny_pipeline(tmp_path / "base", corpus=captions, seed=0)
    summary = train(TrainUnetConfig(data=cfg.output, output=tmp_path / "run", model=str(base), resolution=32, batch_size=2,
                                    grad_accum=1, max_steps=2, lr=1e-4, num_workers=0, checkpoint_every=0,
                                    eval_fraction=0.0, progress=False, log_every=1))
    assert summary["steps"] == 2 and summary["data"]["words_supervised"] > 0
    assert all(v == v for v in summary["final_losses"].values())  # no NaN
