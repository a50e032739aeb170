"""The FID Inception network against torch-fidelity 0.4.0's FeatureExtractorInceptionV3 (same random state dict,
random BN statistics), TF1's resize formula, loading the weights file (weights_only, strict), the download's
sha256 check (urlopen served from memory), TinyFeatureNet.

torch-fidelity is a test-only reference, installed with ``pip install --no-deps`` (its dependencies would pull
torchvision); its package ``__init__`` imports torchvision, so its four standalone files are loaded by path under
a stub ``torch_fidelity`` package instead of importing it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import math
import os
import sys
import types

import numpy as np
import pytest
import torch

from tcompose.evaluate.fid import inception
from tcompose.evaluate.fid.inception import (WEIGHTS_FILE, FidInceptionV3, TinyFeatureNet, download_weights,
                                             load_inception, tf1_bilinear_matrix, weights_path)

TF_FILES = ("defaults", "deprecations", "helpers", "feature_extractor_base", "interpolate_compat_tensorflow",
            "feature_extractor_inceptionv3")


@pytest.fixture(scope="module")
def torch_fidelity():
    """torch-fidelity's modules by path, under a stub package; sys.modules is restored afterwards."""
    try:
        dist = importlib.metadata.distribution("torch-fidelity")
    except importlib.metadata.PackageNotFoundError:
        msg = "torch-fidelity is not installed: `.venv/bin/pip install --no-deps torch-fidelity==0.4.0` (make install)"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(msg)
        pytest.skip(msg)
    saved = {k: v for k, v in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = [str(dist.locate_file("torch_fidelity"))]
    sys.modules["torch_fidelity"] = pkg
    mods = {}
    try:
        for name in TF_FILES:
            spec = importlib.util.spec_from_file_location(f"torch_fidelity.{name}",
                                                          dist.locate_file(f"torch_fidelity/{name}.py"))
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
            setattr(pkg, name, mod)
            mods[name] = mod
        yield mods
    finally:
        for k in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def random_inception(seed: int = 0) -> FidInceptionV3:
    """He-initialised convolutions and random BN affine and running statistics, so that every layer matters and
    activations keep a useful scale through the 94 convolutions."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FidInceptionV3()
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2 / m.weight[0].numel()))
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, torch.nn.Linear):
                m.weight.data.normal_(0, 0.02)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    net = random_inception()
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return net, path


def _images(seed: int, shapes) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8) for n, h, w in shapes]


# -------------------------------------------------------------------------------------------------- TF1 resize


def _tf1_resize_loop(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TensorFlow 1.x resize_bilinear (align_corners=False) transcribed pixel by pixel: float32 coordinates
    (scale = in / out, src = dst * scale, lower = (int) src, upper = min(lower + 1, in - 1)), float64 blend."""
    h, w = img.shape
    sy, sx = np.float32(h) / np.float32(out_h), np.float32(w) / np.float32(out_w)
    out = np.zeros((out_h, out_w))
    for y in range(out_h):
        in_y = np.float32(y) * sy
        top = int(in_y)
        bottom = min(top + 1, h - 1)
        y_lerp = float(in_y - np.float32(top))
        for x in range(out_w):
            in_x = np.float32(x) * sx
            left = int(in_x)
            right = min(left + 1, w - 1)
            x_lerp = float(in_x - np.float32(left))
            top_v = img[top, left] + (img[top, right] - img[top, left]) * x_lerp
            bottom_v = img[bottom, left] + (img[bottom, right] - img[bottom, left]) * x_lerp
            out[y, x] = top_v + (bottom_v - top_v) * y_lerp
    return out


@pytest.mark.parametrize("h,w,out_h,out_w", [(5, 7, 3, 11), (13, 4, 29, 9), (1, 6, 4, 6), (299, 17, 7, 17)])
def test_tf1_bilinear_matrix_equals_tensorflows_formula(h, w, out_h, out_w):
    img = np.random.default_rng(h * w).integers(0, 256, (h, w)).astype(np.float64)
    mh, mw = tf1_bilinear_matrix(h, out_h), tf1_bilinear_matrix(w, out_w)
    assert mh.dtype == torch.float64 and mh.shape == (out_h, h)
    got = (mh @ torch.from_numpy(img) @ mw.T).numpy()
    np.testing.assert_allclose(got, _tf1_resize_loop(img, out_h, out_w), rtol=0, atol=1e-10)
    np.testing.assert_allclose(mh.sum(1).numpy(), 1.0, atol=1e-15)  # rows are convex weights
    if (h, out_h) == (299, 7):
        assert torch.equal(tf1_bilinear_matrix(17, 17), torch.eye(17, dtype=torch.float64))


def test_resize_equals_torch_fidelitys_tf1_interpolation(torch_fidelity):
    interp = torch_fidelity["interpolate_compat_tensorflow"].interpolate_bilinear_2d_like_tensorflow1x
    for img in _images(1, [(2, 64, 80), (1, 512, 512), (1, 17, 400)]):
        want = interp(img.float(), size=(299, 299), align_corners=False, method="slow").double()
        h, w = img.shape[-2:]
        got = tf1_bilinear_matrix(h, 299) @ img.double() @ tf1_bilinear_matrix(w, 299).T
        assert (got - want).abs().max().item() < 1e-4  # torch-fidelity blends in float32: a few ulps of 255


# -------------------------------------------------------------------------------------- against torch-fidelity


@pytest.fixture(scope="module")
def reference(torch_fidelity, nets):
    _, path = nets
    cls = torch_fidelity["feature_extractor_inceptionv3"].FeatureExtractorInceptionV3
    return cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))


def test_module_and_parameter_names_equal_torch_fidelitys(reference, nets):
    net, _ = nets
    ours, theirs = net.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    FidInceptionV3().load_state_dict(theirs, strict=True)


def test_features_equal_torch_fidelity_float32(reference, nets):
    """torch-fidelity's float32 path is TF1's arithmetic (its resize is bit-exact to TF on the CPU); ours adds
    only float rounding: a float64 resize and (x - 128) / 128 in float64 before the cast."""
    net, _ = nets
    worst = 0.0
    for img in _images(2, [(2, 64, 80), (1, 512, 512), (1, 299, 299)]):
        got = net.features(img)
        want = reference(img)[0].double()
        assert got.dtype == torch.float64 and got.shape == (len(img), 2048)
        worst = max(worst, (got - want).abs().max().item())
        assert want.std().item() > 0.1  # features that vary: the comparison means something
    assert worst < 2e-5, worst  # features of size ~10 (measured: ~3e-6)


def test_network_equals_torch_fidelity_float64(reference, nets):
    """At 299 x 299 both resizes are the identity, so this compares the networks alone, in float64.
    torch-fidelity rounds its output to float32: agreement to that rounding (within one float32 ulp)."""
    net, _ = nets
    net64 = random_inception().double()
    ref64 = reference.double()
    ref64.feature_extractor_internal_dtype = torch.float64  # 0.4.0's text_to_dtype maps "float64" to float32
    try:
        img = _images(3, [(1, 299, 299)])[0]
        got = net64.features(img)
        want = ref64(img)[0]
        assert want.dtype == torch.float32
        torch.testing.assert_close(got, want.double(), rtol=2 ** -23, atol=0)
        assert not torch.equal(got, want.double())  # ours stayed float64
    finally:
        reference.float()
        reference.feature_extractor_internal_dtype = torch.float32


# ---------------------------------------------------------------------------------------------- weights files


def test_load_inception_reads_a_torch_save_state_dict_strictly(nets, tmp_path):
    net, path = nets
    img = _images(4, [(1, 40, 50)])[0]
    want = net.features(img)
    loaded = load_inception(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded.features(img), want, rtol=0, atol=0)
    # the published file's layout: a plain dict of tensors without BN's num_batches_tracked
    plain = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(plain, tmp_path / "plain.pth")
    torch.testing.assert_close(load_inception(tmp_path / "plain.pth").features(img), want, rtol=0, atol=0)


def test_load_inception_refuses_other_files(nets, tmp_path):
    _, path = nets
    torch.save(TinyFeatureNet().state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match="not the FID Inception weights"):
        load_inception(tmp_path / "tiny.pth")
    state = torch.load(path, weights_only=True)
    state["fc.weight"] = state["fc.weight"][:10]
    torch.save(state, tmp_path / "shapes.pth")
    with pytest.raises(ValueError, match="not the FID Inception weights.*fc.weight"):
        load_inception(tmp_path / "shapes.pth")
    torch.save({"weights": types.SimpleNamespace(a=1)}, tmp_path / "pickled.pth")  # needs unpickling: refused
    with pytest.raises(ValueError, match="not a readable state dict of tensors"):
        load_inception(tmp_path / "pickled.pth")


def test_missing_weights_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TCOMPOSE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="tcompose download fid") as err:
        load_inception()
    assert str(tmp_path / "cache" / "fid" / WEIGHTS_FILE) in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="tcompose download fid"):
        load_inception(tmp_path / "elsewhere.pth")


def test_weights_path_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("TCOMPOSE_CACHE", str(tmp_path / "c"))
    assert weights_path() == tmp_path / "c" / "fid" / "weights-inception-2015-12-05-6726825d.pth"
    monkeypatch.delenv("TCOMPOSE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights_path() == tmp_path / "home" / ".cache" / "tcompose" / "fid" / WEIGHTS_FILE
    assert weights_path(tmp_path / "x") == tmp_path / "x" / WEIGHTS_FILE
    assert inception.WEIGHTS_SHA256_PREFIX == "6726825d"


def _serve(monkeypatch, payload: bytes, calls: list) -> None:
    def urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(inception.urllib.request, "urlopen", urlopen)


def test_download_refuses_a_file_whose_sha256_prefix_differs(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls: list = []
    payload = b"not the inception weights"
    assert not hashlib.sha256(payload).hexdigest().startswith("6726825d")
    _serve(monkeypatch, payload, calls)
    with pytest.raises(ValueError, match="does not start with 6726825d"):
        download_weights(tmp_path, progress=False)
    assert calls == [inception.WEIGHTS_URL] and list(tmp_path.iterdir()) == []  # nothing kept, no temporary


def test_download_writes_checks_and_then_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    payload = b"pretend weights" * 1000
    monkeypatch.setattr(inception, "WEIGHTS_SHA256_PREFIX", hashlib.sha256(payload).hexdigest()[:8])
    calls: list = []
    _serve(monkeypatch, payload, calls)
    path = download_weights(tmp_path, progress=True)
    assert path == tmp_path / WEIGHTS_FILE and path.read_bytes() == payload and len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == [WEIGHTS_FILE]
    assert download_weights(tmp_path, progress=False) == path and len(calls) == 1  # present and valid
    path.write_bytes(b"corrupt")  # present but wrong: fetched again
    assert download_weights(tmp_path, progress=False).read_bytes() == payload and len(calls) == 2
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: the valid cache is enough, a missing file is an error
    assert download_weights(tmp_path, progress=False) == path and len(calls) == 2
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1.*tcompose download fid"):
        download_weights(tmp_path / "empty", progress=False)
    assert len(calls) == 2


# -------------------------------------------------------------------------------------------- TinyFeatureNet


def test_tiny_feature_net_is_deterministic_and_shaped():
    imgs = _images(5, [(3, 40, 56)])[0]
    state = torch.random.get_rng_state()
    a, b = TinyFeatureNet(seed=1), TinyFeatureNet(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    fa = a.features(imgs)
    assert fa.dtype == torch.float64 and fa.shape == (3, 16) and a.dims == 16
    assert torch.equal(fa, b.features(imgs)) and a.identity == b.identity != TinyFeatureNet(seed=2).identity
    assert not torch.allclose(fa, TinyFeatureNet(seed=2).features(imgs))
    assert fa.std(0).min().item() > 0  # features differ between images
    assert TinyFeatureNet(dims=7).features(_images(6, [(2, 300, 17)])[0]).shape == (2, 7)
    assert torch.equal(TinyFeatureNet(seed=1).features(imgs[1:2]), fa[1:2])  # bit-identical in any batch
    with pytest.raises(ValueError, match=r"uint8 images \[N, 3, H, W\]"):
        a.features(imgs.float())
    with pytest.raises(ValueError, match=r"uint8 images \[N, 3, H, W\]"):
        a.features(imgs[:, :1])
