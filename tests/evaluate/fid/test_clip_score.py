"""CLIP score: ClipScorer on a tiny random CLIP on disk equals a direct float64 computation with transformers'
CLIPModel, CLIPImageProcessor and tokenizer (100 * max(cos, 0)), negative cosines included; batching, input
kinds and long captions change nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tcompose.evaluate.fid.clip_score import ClipScorer
from tcompose.testing.tiny_vision import write_tiny_clip

CAPTIONS = ["a red cat on a sofa", "two dogs in the park", "a photo of a kite", "a blue cup and a book",
            "an orange car next to a tree", "a man riding a horse on the beach"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=3, corpus=CAPTIONS)
    return path, ClipScorer.load(str(path), device="cpu", dtype="fp32")


def _images(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(40, 56), (32, 32), (77, 31), (50, 50), (24, 90), (64, 48)]
    return [rng.integers(0, 256, (*shapes[i % len(shapes)], 3), dtype=np.uint8) for i in range(n)]


def _cosines_float64(path, images, captions) -> np.ndarray:
    """cos(image i, caption j) for all pairs, transformers' own pieces, the model in float64."""
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(path).double().eval()
    proc = CLIPImageProcessorPil.from_pretrained(path)
    tok = CLIPTokenizer.from_pretrained(path)
    pixels = torch.as_tensor(np.asarray(proc(images=[Image.fromarray(im) for im in images],
                                             return_tensors="np")["pixel_values"]))
    enc = tok(captions, padding=True, truncation=True, max_length=model.config.text_config.max_position_embeddings,
              return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels.double())
        txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img @ txt.T).numpy()


def test_scores_equal_a_float64_transformers_computation(clip):
    path, scorer = clip
    images = _images(0, 6)
    long_caption = " ".join(["a very long caption about a cat and a dog"] * 12)  # > 77 tokens: truncated
    captions = CAPTIONS[:5] + [long_caption]
    cos = _cosines_float64(path, images, captions)
    assert (cos < -0.01).sum() >= 3 and (cos > 0.01).sum() >= 3  # both signs among the pairs (seed 3: a mix)
    # every (image, caption) pair, as N pairs: image i with caption j
    ii, jj = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    got = scorer.score([images[i] for i in ii.ravel()], [captions[j] for j in jj.ravel()])
    want = 100.0 * np.maximum(cos[ii.ravel(), jj.ravel()], 0.0)
    assert got.dtype == np.float64 and got.shape == (36,)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)  # float32 model against float64
    negative = cos.ravel() < -0.01
    assert negative.any() and (got[negative] == 0.0).all()
    assert (got[cos.ravel() > 0.01] > 0).all()


def test_batches_and_input_kinds_change_nothing(clip):
    _, scorer = clip
    images = _images(1, 5)
    captions = CAPTIONS[:5]
    whole = scorer.score(images, captions)
    np.testing.assert_allclose(scorer.score(images, captions, batch_size=2), whole, rtol=0, atol=1e-4)
    pil = [Image.fromarray(im) for im in images]
    np.testing.assert_array_equal(scorer.score(pil, captions), whole)
    assert scorer.score([], []).shape == (0,)


def test_errors_are_clear(clip, tmp_path):
    _, scorer = clip
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        scorer.score(_images(2, 2), ["a cat"])
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        scorer.score([np.zeros((8, 8), dtype=np.uint8)], ["a cat"])
    with pytest.raises(ValueError, match="dtype"):
        ClipScorer.load(str(clip[0]), dtype="fp8")
    with pytest.raises(ValueError, match="folder not found"):
        ClipScorer.load(str(tmp_path / "no-such-model"))
