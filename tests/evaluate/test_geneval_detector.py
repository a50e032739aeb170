"""GenEval's colour crop against a hand-made mask, the CLIP zero-shot colour classifier's arithmetic, and the
Mask2Former detector's pieces (label names, input size, mask boxes, the config check) with tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tcompose.data.categories import COCO_80
from tcompose.evaluate.geneval.colors import TEMPLATES, ColorClassifier, color_prompts, object_crop
from tcompose.evaluate.geneval.detector import Mask2FormerDetector, geneval_label, mask_boxes
from tcompose.evaluate.geneval.rules import COLORS
from tcompose.io.errors import UserError


def test_crop_composites_the_mask_on_grey_and_cuts_the_box():
    image = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)  # 5 rows, 6 columns
    mask = np.zeros((5, 6), dtype=bool)
    mask[1, 1] = mask[2, 2] = mask[2, 3] = True
    crop = np.asarray(object_crop(image, [1, 1, 4, 3], mask))
    assert crop.shape == (2, 3, 3)  # rows 1..2, columns 1..3
    grey = [153, 153, 153]
    expected = np.array([[image[1, 1], grey, grey], [grey, image[2, 2], image[2, 3]]], dtype=np.uint8)
    np.testing.assert_array_equal(crop, expected)
    # PIL rounds a fractional box, as GenEval's crop of mmdet's float boxes does
    np.testing.assert_array_equal(np.asarray(object_crop(image, [0.6, 0.6, 3.6, 2.6], mask)), crop)
    np.testing.assert_array_equal(np.asarray(object_crop(image, [0, 0, 6, 5], None)), image)  # no mask: as is
    with pytest.raises(ValueError, match="mask of shape"):
        object_crop(image, [0, 0, 2, 2], np.ones((4, 4), dtype=bool))


def test_color_prompts_are_genevals_three_templates():
    texts = color_prompts("wine glass")
    assert len(texts) == 10 and texts[0] == ["a photo of a red wine glass", "a photo of a red-colored wine glass",
                                             "a photo of a red object"]
    assert len(TEMPLATES) == 3 and texts[-1][0] == "a photo of a white wine glass"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tcompose.testing.tiny_vision import write_tiny_clip

    corpus = [t for name in ("car", "wine glass") for texts in color_prompts(name) for t in texts]
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", corpus=corpus)


def test_classifier_is_clip_benchmarks_zero_shot(tiny_clip):
    clf = ColorClassifier.load(str(tiny_clip))
    weights = clf.classifier("car")
    assert weights.shape[1] == len(COLORS)
    with torch.no_grad():  # by hand: normalise each template's embedding, average, normalise
        enc = clf.tokenizer(color_prompts("car")[3], padding=True, return_tensors="pt")
        emb = clf.model.get_text_features(**enc)
        emb = torch.nn.functional.normalize(getattr(emb, "pooler_output", emb), dim=-1).mean(0)
    torch.testing.assert_close(weights[:, 3], emb / emb.norm())
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    masks = [rng.random((40, 48)) > 0.5, np.ones((40, 48), dtype=bool)]
    got = clf.classify(image, [([2, 3, 30, 20], masks[0]), ([0, 0, 48, 40], masks[1])], "car")
    assert all(c in COLORS for c in got) and len(got) == 2
    with torch.no_grad():
        crops = [object_crop(image, [2, 3, 30, 20], masks[0]), object_crop(image, [0, 0, 48, 40], masks[1])]
        feats = clf.model.get_image_features(pixel_values=clf.processor(images=crops, return_tensors="pt")["pixel_values"])
        feats = torch.nn.functional.normalize(getattr(feats, "pooler_output", feats), dim=-1)
    assert got == [COLORS[i] for i in (feats @ weights).argmax(1).tolist()]


def test_labels_sizes_and_boxes():
    assert geneval_label("dining_table") == "dining table" and geneval_label("mouse") == "computer mouse"
    assert geneval_label("remote") == "tv remote" and geneval_label("tv") == "tv" and geneval_label("sky") is None
    det = Mask2FormerDetector.__new__(Mask2FormerDetector)
    det.size = 800
    assert det.resized_shape(512, 512) == (800, 800) and det.resized_shape(512, 768) == (800, 1200)
    assert det.resized_shape(1000, 2000) == (667, 1333)  # the long side capped at 1333
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0, 1:4, 2:5] = True
    masks[1, 5, 7] = True
    np.testing.assert_array_equal(mask_boxes(masks).numpy(), [[2, 1, 5, 4], [7, 5, 8, 6], [0, 0, 0, 0]])


def test_detector_check_and_detect(tmp_path, tiny_clip):
    from tcompose.testing.tiny_detectors import write_tiny_mask2former

    good = write_tiny_mask2former(tmp_path / "m2f")
    Mask2FormerDetector.check(str(good))
    with pytest.raises(UserError, match="labels name 79 of GenEval's 80 objects"):
        Mask2FormerDetector.check(str(write_tiny_mask2former(tmp_path / "bad", labels=["x", *COCO_80[1:]])))
    with pytest.raises(UserError, match="no readable model config"):
        Mask2FormerDetector.check(str(tmp_path))
    cls = Mask2FormerDetector.configured(64, str(tiny_clip))
    det = cls.load(str(good), device="cpu", dtype="fp32")
    image = np.random.default_rng(1).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    everything = det.detect([image], [["car"]], threshold=0.0)[0]
    assert len(everything.labels) == 100 and set(everything.labels) <= set(det.labels)  # mmdet's 100 per image
    assert all(0 <= x0 <= x1 <= 48 and 0 <= y0 <= y1 <= 32 for x0, y0, x1, y1 in everything.boxes)
    assert [c is not None for c in everything.colors] == [lab == "car" for lab in everything.labels]
    cut = sorted(everything.scores)[-5]
    some = det.detect([image], [["car"]], threshold=cut)[0]
    assert sorted(some.scores) == sorted(s for s in everything.scores if s > cut)


def test_loading_the_colour_clip_shows_no_transformers_bar(tiny_clip, capfd):
    capfd.readouterr()
    ColorClassifier.load(str(tiny_clip))
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err
