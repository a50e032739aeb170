"""OWLv2 detection plumbing: preprocessing and detections equal transformers' processor + post-processing,
labels map back to category names, batching and padded queries change nothing. Tiny random OWLv2 on disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi

from tcompose.evaluate.detect import Detections, Owlv2Detector, postprocess, query_text, resample_matrix
from tcompose.testing.tiny_detectors import write_tiny_owlv2


@pytest.fixture(scope="module")
def owl(tmp_path_factory):
    path = write_tiny_owlv2(tmp_path_factory.mktemp("owl") / "tiny-owlv2", seed=0)
    return path, Owlv2Detector.load(str(path), device="cpu", dtype="fp32")


def _images(seed: int, shapes) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


def assert_equals_transformers(ours: list[Detections], images, names, processor, image_processor, model) -> None:
    """Our detections (threshold 0.01) equal transformers' processor + model + post-processing, image by image."""
    for image, image_names, got in zip(images, names, ours):
        inputs = processor(text=[[query_text(n) for n in image_names]], images=image, return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs)
        ref = image_processor.post_process_object_detection(out, threshold=0.01,
                                                            target_sizes=torch.tensor([image.size[::-1]]))[0]
        assert len(got.labels) > 0
        assert got.labels == [image_names[i] for i in ref["labels"].tolist()]
        np.testing.assert_allclose(got.scores, ref["scores"].numpy(), atol=2e-6)
        np.testing.assert_allclose(np.array(got.boxes), ref["boxes"].numpy(), atol=5e-3)  # pixels
        assert all(s > 0.01 for s in got.scores)


@pytest.mark.parametrize("n_in,n_out", [(50, 96), (300, 128), (512, 1008), (97, 64)])
def test_resample_matrix_is_scipys_filter_then_zoom(n_in, n_out):
    x = np.random.default_rng(n_in).random((n_in, n_in))
    sigma = max(0.0, (n_in / n_out - 1) / 2)
    filtered = ndi.gaussian_filter(x, sigma, mode="mirror") if sigma > 0 else x
    ref = ndi.zoom(filtered, n_out / n_in, order=1, mode="mirror", grid_mode=True)
    m = resample_matrix(n_in, n_out).numpy()
    assert ref.shape == (n_out, n_out)
    np.testing.assert_allclose(m @ x @ m.T, ref, atol=1e-12)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)  # rows are convex weights


def test_preprocess_equals_transformers_processor(owl):
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

    _, det = owl
    # square (upscaled), wide and tall (padded to a square), larger than the model (Gaussian + downscale)
    images = _images(1, [(40, 40), (48, 80), (90, 30), (150, 150)])
    ref = Owlv2ImageProcessorPil(size={"height": 64, "width": 64})(images=images, return_tensors="pt")
    ours = det.preprocess(images)
    assert ours.shape == (4, 3, 64, 64) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref["pixel_values"], atol=2e-5, rtol=0)


def test_detections_equal_transformers_pipeline(owl):
    from transformers import AutoTokenizer, Owlv2ForObjectDetection, Owlv2Processor
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

    path, det = owl
    images = _images(2, [(64, 64), (48, 80), (100, 100)])
    names = [["cat", "dog", "wine glass"], ["book", "cup", "kite", "mouse", "surfboard"], ["person"]]
    ours = det.detect(images, names, threshold=0.01)

    image_processor = Owlv2ImageProcessorPil(size={"height": 64, "width": 64})
    processor = Owlv2Processor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(path))
    model = Owlv2ForObjectDetection.from_pretrained(path).eval()
    assert_equals_transformers(ours, images, names, processor, image_processor, model)
    assert set(ours[2].labels) == {"person"}  # one query: every box is labelled with it


def test_batching_and_padded_queries_change_nothing(owl):
    _, det = owl
    images = _images(3, [(64, 64), (32, 48), (64, 64)])
    names = [["person"], ["book", "cup", "kite", "mouse", "surfboard"], ["cat", "dog"]]
    batched = det.detect(images, names, threshold=0.05)
    for image, image_names, got in zip(images, names, batched):
        alone = det.detect([image], [image_names], threshold=0.05)[0]
        assert got.labels == alone.labels
        np.testing.assert_allclose(got.scores, alone.scores, atol=1e-5)
        np.testing.assert_allclose(np.array(got.boxes).reshape(-1, 4), np.array(alone.boxes).reshape(-1, 4), atol=1e-3)
    assert det.detect([], [], threshold=0.1) == []
    with pytest.raises(ValueError, match="2 images but 1 query lists"):
        det.detect(images[:2], names[:1])


def test_postprocess_best_query_strict_threshold_and_pixel_boxes():
    # one image of 100 x 50 (h x w): padded to 100 x 100; 3 boxes, 2 queries
    logits = torch.tensor([[[2.0, -1.0], [-3.0, 0.5], [0.0, -5.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.1, 0.1, 0.2], [0.9, 0.9, 0.2, 0.2]]])
    got = postprocess(logits, boxes, [(100, 50)], [["cat", "dog"]], threshold=0.5)[0]
    # box 0: cat (sigmoid 2), box 1: dog (sigmoid 0.5); box 2: sigmoid(0) = 0.5 is not > 0.5
    assert got.labels == ["cat", "dog"]
    np.testing.assert_allclose(got.scores, [1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(-0.5))], rtol=1e-6)
    np.testing.assert_allclose(got.boxes, [[40, 30, 60, 70], [20, 0, 30, 20]], atol=1e-4)
    none = postprocess(logits, boxes, [(100, 50)], [["cat", "dog"]], threshold=0.99)[0]
    assert none == Detections()


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="folder not found"):
        Owlv2Detector.load(str(tmp_path / "no-such-owl"), device="cpu")
    with pytest.raises(ValueError, match="unknown detector dtype"):
        Owlv2Detector.load(str(tmp_path), device="cpu", dtype="fp8")


# ------------------------------------------------------------------------------------------- OWL-ViT (VISOR)


@pytest.fixture(scope="module")
def owlvit(tmp_path_factory):
    from tcompose.evaluate.detect import OwlVitDetector
    from tcompose.testing.tiny_detectors import write_tiny_owlvit

    path = write_tiny_owlvit(tmp_path_factory.mktemp("owlvit") / "tiny-owlvit", seed=0)
    return path, OwlVitDetector.load(str(path), device="cpu", dtype="fp32")


def test_owlvit_detections_equal_transformers_pipeline(owlvit):
    from transformers import AutoTokenizer, OwlViTForObjectDetection, OwlViTProcessor
    from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil

    path, det = owlvit
    images = _images(4, [(64, 64), (48, 80), (100, 70)])  # not padded: wide and tall images are stretched
    names = [["cat", "dog"], ["book", "cup"], ["person", "kite"]]
    image_processor = OwlViTImageProcessorPil.from_pretrained(path)
    ref_pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(det.preprocess(images), ref_pixels, atol=2e-5, rtol=0)
    ours = det.detect(images, names, threshold=0.01)
    processor = OwlViTProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(path))
    model = OwlViTForObjectDetection.from_pretrained(path).eval()
    assert_equals_transformers(ours, images, names, processor, image_processor, model)


def test_owlvit_boxes_scale_by_width_and_height():
    logits = torch.tensor([[[2.0, -1.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4]]])
    got = postprocess(logits, boxes, [(100, 50)], [["cat", "dog"]], threshold=0.5, square=False)[0]
    np.testing.assert_allclose(got.boxes, [[20, 30, 30, 70]], atol=1e-4)  # x by 50 px, y by 100 px


def test_each_detector_refuses_the_other_kind(owl, owlvit):
    from tcompose.evaluate.detect import OwlVitDetector

    with pytest.raises(ValueError, match="model_type 'owlv2' is not an OWL-ViT detector"):
        OwlVitDetector.check(str(owl[0]))
    with pytest.raises(ValueError, match="model_type 'owlvit' is not an OWLv2 detector"):
        Owlv2Detector.check(str(owlvit[0]))
