"""The Fréchet distance between two Gaussians fitted to feature sets (FID), and streaming feature statistics.

    stats = RunningStats()
    for batch in batches:
        stats.add(net.features(batch).cpu().numpy())        # [n, 2048], never all kept
    stats.save("coco-val2017.npz", metadata={"network": "inception-2015-12-05", "images": "coco val2017 10k"})
    ref, meta = RunningStats.load("coco-val2017.npz")      # the statistics and their metadata (a dict)
    fid = frechet_distance(stats.mean, stats.cov, ref.mean, ref.cov)

:func:`frechet_distance` is pytorch-fid's ``calculate_frechet_distance`` (the formula of Heusel et al. 2017 as
every FID implementation computes it): ``||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2))`` with
``scipy.linalg.sqrtm``; when that square root is not finite, ``eps * I`` is added to both covariances; an
imaginary part on the diagonal above 1e-3 is an error, a smaller one is dropped.

:class:`RunningStats` keeps, in float64, the count, the mean and the sum of outer products of the deviations
from the mean, updated batch by batch with Chan et al.'s pairwise formula (the same formula merges two
partial results, e.g. from shards or processes). That equals ``np.mean`` / ``np.cov(X, rowvar=False)`` of
all rows (to float64 rounding) without the cancellation of ``sum(x x^T) - n mu mu^T`` when the mean is large
against the spread. Statistics files are ``.npz`` (``mu``, ``sigma``, ``n``, a JSON ``metadata`` string), read
without pickle.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ...io.errors import MissingPathError, UserError


class RunningStats:
    """Count, mean and covariance of feature rows ``[n, D]`` added in any number of batches (float64)."""

    def __init__(self, dims: int | None = None, metadata: dict[str, Any] | None = None):
        self.dims = dims
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._n = 0
        self._mean = np.zeros(dims, dtype=np.float64) if dims is not None else None
        self._m2 = np.zeros((dims, dims), dtype=np.float64) if dims is not None else None  # sum of centred outers

    # ------------------------------------------------------------------------------------------- accumulation

    def _check(self, x: np.ndarray, what: str) -> None:
        if x.ndim != 2:
            raise ValueError(f"{what}: expected features [n, D], got shape {x.shape}")
        if self.dims is not None and x.shape[1] != self.dims:
            raise ValueError(f"{what}: features have {x.shape[1]} dimensions, these statistics {self.dims}")

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if self._n == 0:
            self.dims = int(mean_b.shape[0])
            self._n, self._mean, self._m2 = n_b, mean_b.copy(), m2_b.copy()
            return
        n = self._n + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self._n * n_b / n)
        self._n = n

    def add(self, features: Any) -> "RunningStats":
        """Add feature rows (``[n, D]``, any float array or tensor; converted to float64)."""
        if hasattr(features, "detach"):  # a torch tensor
            features = features.detach().cpu().numpy()
        x = np.asarray(features, dtype=np.float64)
        self._check(x, "RunningStats.add")
        if len(x) == 0:
            return self
        if not np.isfinite(x).all():
            raise ValueError("RunningStats.add: features contain NaN or inf")
        mean_b = x.mean(axis=0)
        c = x - mean_b
        self._combine(len(x), mean_b, c.T @ c)
        return self

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Add another accumulator's rows (as if they had been added here); returns self."""
        if other._n == 0:
            return self
        if self.dims is not None and other.dims != self.dims:
            raise ValueError(f"RunningStats.merge: {other.dims} dimensions against {self.dims}")
        self._combine(other._n, other._mean, other._m2)
        return self

    # -------------------------------------------------------------------------------------------------- results

    @property
    def n(self) -> int:
        return self._n

    @property
    def mean(self) -> np.ndarray:
        """float64 ``[D]``."""
        if self._n == 0:
            raise ValueError("RunningStats: no features added yet")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by n - 1, as ``np.cov``), float64 ``[D, D]``."""
        _need_two(self._n, "RunningStats")
        return self._m2 / (self._n - 1)

    # ------------------------------------------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``mu``, ``sigma``, ``n`` and ``metadata`` (JSON; default: :attr:`metadata`) to ``path`` (.npz),
        atomically: a temporary file beside it, then a rename."""
        path = Path(path)
        meta = self.metadata if metadata is None else metadata
        text = json.dumps(meta, sort_keys=True)  # fails here, before any file, if not JSON-serialisable
        mu, sigma = self.mean, self.cov
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, mu=mu, sigma=sigma, n=np.int64(self._n), metadata=np.array(text))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple["RunningStats", dict[str, Any]]:
        """``(stats, metadata)`` from a file written by :meth:`save`; the stats can take more features or merge,
        and keep the metadata as :attr:`metadata` too."""
        path = Path(path)
        if not path.is_file():
            raise MissingPathError(f"{path}: no such statistics file")
        try:
            with np.load(path, allow_pickle=False) as z:
                mu, sigma, n = z["mu"], z["sigma"], int(z["n"])
                meta = json.loads(str(z["metadata"])) if "metadata" in z.files else {}
        except (KeyError, ValueError, OSError) as err:
            raise UserError(f"{path}: not a statistics file with mu, sigma and n ({err})") from None
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or n < 2:
            raise UserError(f"{path}: inconsistent statistics (mu {mu.shape}, sigma {sigma.shape}, n {n})")
        stats = cls(int(mu.shape[0]), meta)
        stats._n, stats._mean, stats._m2 = n, mu.astype(np.float64), sigma.astype(np.float64) * (n - 1)
        return stats, meta

    def __repr__(self) -> str:
        return f"RunningStats(n={self._n}, dims={self.dims})"


def _need_two(n: int, what: str) -> None:
    if n < 2:
        raise ValueError(f"{what}: a covariance needs at least 2 samples, got {n}")


def _sqrtm(a: np.ndarray) -> np.ndarray:
    from scipy import linalg

    with warnings.catch_warnings():  # singular products warn; the finiteness check below is what decides
        warnings.simplefilter("ignore")
        return linalg.sqrtm(a)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2): pytorch-fid's ``calculate_frechet_distance``."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: means must be vectors of one length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: covariances must be [{d}, {d}] to match the means, got {s1.shape} and "
                         f"{s2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"frechet_distance: sqrtm(sigma1 sigma2) is not finite; adding {eps} to the diagonal of "
                      "both covariances", RuntimeWarning, stacklevel=2)
        offset = np.eye(d) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: sqrtm(sigma1 sigma2) has a significant imaginary part "
                             f"(max {np.abs(covmean.imag).max():.3g}); are the covariances valid?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_from_features(a: Any, b: Any, eps: float = 1e-6) -> float:
    """FID between two feature sets ``[n1, D]`` and ``[n2, D]`` (``np.mean`` / ``np.cov`` of each, float64)."""
    xs = []
    for name, x in (("a", a), ("b", b)):
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"fid_from_features: {name} must be features [n, D], got shape {x.shape}")
        _need_two(len(x), f"fid_from_features: {name}")
        xs.append(x)
    if xs[0].shape[1] != xs[1].shape[1]:
        raise ValueError(f"fid_from_features: {xs[0].shape[1]} against {xs[1].shape[1]} feature dimensions")
    return frechet_distance(xs[0].mean(0), np.cov(xs[0], rowvar=False), xs[1].mean(0), np.cov(xs[1], rowvar=False),
                            eps)
