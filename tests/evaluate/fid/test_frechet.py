"""FID maths: frechet_distance against an independent float64 computation (eigendecompositions, no sqrtm), its
eps fallback and error cases, a 1-D hand case; RunningStats against np.mean / np.cov, merging, files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import linalg

from tcompose.evaluate.fid import frechet
from tcompose.evaluate.fid.frechet import RunningStats, fid_from_features, frechet_distance


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr(sqrtm(s1 s2)) for PSD s1, s2 without sqrtm: s1 s2 is similar to the PSD r s2 r (r = s1^1/2), so the
    trace is the sum of the square roots of that matrix's eigenvalues."""
    w, v = linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = linalg.eigvalsh(r @ s2 @ r)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def _reference(x: np.ndarray, y: np.ndarray, eps: float = 0.0) -> float:
    mu1, mu2 = x.mean(0), y.mean(0)
    s1 = np.cov(x, rowvar=False) + eps * np.eye(x.shape[1])
    s2 = np.cov(y, rowvar=False) + eps * np.eye(x.shape[1])
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2))


def _pytorch_fid_rule(x: np.ndarray, y: np.ndarray, eps: float = 1e-6) -> float:
    """scipy's sqrtm of the product; on a non-finite result, again with ``eps`` on both diagonals."""
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(root).all():
        root = linalg.sqrtm((s1 + eps * np.eye(len(s1))) @ (s2 + eps * np.eye(len(s1))))
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


def _features(seed: int, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift + rng.normal(size=d)


@pytest.mark.parametrize("d,n1,n2", [(1, 50, 80), (4, 30, 41), (16, 200, 150), (64, 500, 300)])
def test_frechet_distance_equals_independent_computation(d, n1, n2):
    x, y = _features(d, n1, d), _features(d + 1, n2, d, shift=0.3)
    got = fid_from_features(x, y)
    want = _reference(x, y)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
    mu_cov = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert frechet_distance(*mu_cov) == got


@pytest.mark.parametrize("n,d", [(10, 64), (30, 32)])
def test_near_singular_covariances_give_a_finite_value(n, d):
    x, y = _features(n, n, d), _features(n + 1, n + 3, d, shift=0.1)  # n < d: rank-deficient covariances
    if n > d // 2:
        x[:, 0] = x[:, 1]  # a duplicated feature: singular even with more rows
    got = fid_from_features(x, y)
    assert np.isfinite(got)
    assert got == pytest.approx(_pytorch_fid_rule(x, y), rel=1e-12)
    # sqrtm of a singular product is accurate to ~sqrt(machine eps) on its zero eigenvalues: close, not equal
    assert got == pytest.approx(_reference(x, y), rel=1e-5)


def test_eps_offset_is_added_when_the_square_root_is_not_finite(monkeypatch):
    x, y = _features(0, 12, 20), _features(1, 15, 20)
    real = frechet._sqrtm
    calls = []

    def flaky(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real(a)

    monkeypatch.setattr(frechet, "_sqrtm", flaky)
    with pytest.warns(RuntimeWarning, match="adding 0.001 to the diagonal"):
        got = fid_from_features(x, y, eps=1e-3)
    assert len(calls) == 2
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    np.testing.assert_allclose(calls[1], (s1 + 1e-3 * np.eye(20)) @ (s2 + 1e-3 * np.eye(20)), rtol=1e-12)
    assert got == pytest.approx(_reference(x, y, eps=1e-3) - 2 * 20 * 1e-3, rel=1e-6)  # traces stay un-offset


def test_significant_imaginary_part_raises_small_one_is_dropped(monkeypatch):
    mu, s = np.zeros(3), np.eye(3)
    monkeypatch.setattr(frechet, "_sqrtm", lambda a: np.eye(3) + 0.1j * np.eye(3))
    with pytest.raises(ValueError, match="imaginary part"):
        frechet_distance(mu, s, mu, s)
    monkeypatch.setattr(frechet, "_sqrtm", lambda a: np.eye(3) + 1e-5j * np.eye(3))
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n,d", [(100, 8), (500, 32)])
def test_identical_sets_give_zero(n, d):
    x = _features(n, n, d)
    assert abs(fid_from_features(x, x.copy())) < 1e-6


def test_one_dimensional_gaussians_by_hand():
    # FID of N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(5.0, abs=1e-12)
    assert frechet_distance(np.array(-2.0), np.array(0.25), np.array(0.5), np.array(1.0)) == pytest.approx(6.5)
    # independent axes add up
    got = frechet_distance([1.0, -2.0], np.diag([4.0, 0.25]), [3.0, 0.5], np.diag([9.0, 1.0]))
    assert got == pytest.approx(5.0 + 6.5, abs=1e-12)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="means must be vectors of one length"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"covariances must be \[3, 3\]"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="4 against 3 feature dimensions"):
        fid_from_features(np.zeros((5, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="features"):
        fid_from_features(np.zeros(5), np.zeros((5, 3)))


def test_fewer_than_two_samples_is_an_error():
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        fid_from_features(np.zeros((1, 3)), np.zeros((5, 3)))
    stats = RunningStats().add(np.ones((1, 3)))
    assert stats.n == 1 and np.array_equal(stats.mean, np.ones(3))
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        stats.cov
    with pytest.raises(ValueError, match="no features added"):
        RunningStats().mean


# ---------------------------------------------------------------------------------------------- RunningStats


def _chunks(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    out, start = [], 0
    for s in sizes:
        out.append(x[start:start + s])
        start += s
    assert start == len(x)
    return out


def test_running_stats_equal_numpy_with_uneven_chunks():
    x = _features(3, 200, 24, shift=1000.0)  # a large mean: the centred update keeps full precision
    stats = RunningStats()
    for c in _chunks(x, [1, 7, 0, 33, 100, 59]):
        stats.add(c)
    assert stats.n == 200 and stats.dims == 24
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    assert stats.cov.dtype == np.float64


def test_running_stats_accept_float32_tensors_in_float64():
    import torch

    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))  # float32
    stats = RunningStats(6).add(x[:20]).add(x[20:])
    ref = x.double().numpy()
    np.testing.assert_allclose(stats.cov, np.cov(ref, rowvar=False), rtol=1e-12, atol=1e-14)


def test_merge_equals_one_pass():
    x = _features(4, 301, 12)
    one = RunningStats().add(x)
    parts = [RunningStats().add(c) for c in _chunks(x, [100, 1, 150, 50])]
    merged = RunningStats()
    for p in parts:
        merged.merge(p)
    merged.merge(RunningStats())  # an empty shard changes nothing
    assert merged.n == one.n
    np.testing.assert_allclose(merged.mean, one.mean, rtol=1e-13)
    np.testing.assert_allclose(merged.cov, one.cov, rtol=1e-11, atol=1e-14)
    with pytest.raises(ValueError, match="dimensions"):
        merged.merge(RunningStats().add(np.zeros((3, 5))))
    with pytest.raises(ValueError, match="5 dimensions, these statistics 12"):
        merged.add(np.zeros((3, 5)))


def test_save_load_round_trip(tmp_path):
    x = _features(5, 80, 10)
    stats = RunningStats().add(x[:50])
    path = stats.save(tmp_path / "ref" / "stats.npz", metadata={"network": "tiny", "images": "coco val2017"})
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == ["stats.npz"]  # no temporary left
    back, meta = RunningStats.load(path)
    assert meta == {"network": "tiny", "images": "coco val2017"} and back.metadata == meta and back.n == 50
    np.testing.assert_array_equal(back.mean, stats.mean)
    np.testing.assert_array_equal(back.cov, stats.cov)
    with np.load(path, allow_pickle=False) as z:  # a plain npz: mu, sigma, n, metadata (JSON)
        assert sorted(z.files) == ["metadata", "mu", "n", "sigma"]
        assert json.loads(str(z["metadata"]))["network"] == "tiny"
    back.add(x[50:])  # a loaded file keeps accumulating
    np.testing.assert_allclose(back.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-14)
    assert RunningStats(metadata={"a": 1}).add(x).save(tmp_path / "m.npz") and \
        RunningStats.load(tmp_path / "m.npz")[1] == {"a": 1}
    with pytest.raises(FileNotFoundError):
        RunningStats.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a statistics file"):
        RunningStats.load(tmp_path / "other.npz")
