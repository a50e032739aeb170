"""The FID feature network: Inception v3 with TensorFlow's 2015-12-05 weights, its 2048-d pool features.

Runbook::

    download_weights()                           # once, with network (what `tcompose download fid` does)
    net = load_inception(device="cuda")          # offline from then on: reads the cached file only
    feats = net.features(images)                 # uint8 [N, 3, H, W], any H, W -> float64 [N, 2048]

These are the features behind every published FID since Heusel et al. (the ``pool_3`` layer of the TF graph
``inception-2015-12-05``); torch-fidelity, clean-fid and pytorch-fid all ship the same converted weights. The
three libraries import torchvision at package import, which breaks transformers on this project's CPU torch,
so the network is written here. Module and parameter names equal torch-fidelity's
``FeatureExtractorInceptionV3``, so its published file (:data:`WEIGHTS_URL`) loads with ``strict=True``;
``tests/evaluate/fid/test_inception.py`` checks the features against torch-fidelity's own class.

What makes it the TF network rather than torchvision's Inception v3:

- the input is resized to 299 x 299 the way TensorFlow 1.x's ``resize_bilinear`` (align_corners=False) does it:
  source coordinate ``dst * in / out`` in float32, no half-pixel shift, no anti-aliasing
  (:func:`tf1_bilinear_matrix`; one matrix per axis, so a batch is two matmuls), then ``(x - 128) / 128``;
- batch norm eps 1e-3; the 3 x 3 average pools of the mixed blocks do not count padded zeros (TF's SAME);
- the last mixed block (``Mixed_7c``) pools its side branch with a max pool, not an average pool;
- the classifier ``fc`` has 1008 outputs (kept only so the file loads strictly; FID uses the pool features).

The network runs in float32 with TF32 off (``load_inception(dtype=torch.float64)`` for an exact check); the
resize runs in float64. :class:`TinyFeatureNet` has the same interface, random and small, for tests.

The weights file is a plain state dict read with ``torch.load(weights_only=True)``: tensors only, no pickled
objects. Its name carries the first 8 hex digits of its sha256 (torch.hub's convention), checked on download.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...io.errors import MissingPathError, UnavailableError, UserError
from ...io.datasets import file_sha256

WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[1]
#: torch.hub's naming: the suffix after the last "-" is the start of the file's sha256.
WEIGHTS_SHA256_PREFIX = WEIGHTS_FILE.rsplit("-", 1)[1].split(".")[0]
INPUT_SIZE = 299
FEATURE_DIMS = 2048


# ------------------------------------------------------------------------------------------- TF1 bilinear resize


def tf1_bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """float64 ``[n_out, n_in]``: TensorFlow 1.x ``resize_bilinear(align_corners=False)`` along one axis.

    TF1 (``image_resizer_state.h``, ``resize_bilinear_op.cc``) computes, in float32: ``scale = in / out``,
    ``src = dst * scale``, ``lower = floor(src)``, ``upper = min(lower + 1, in - 1)``, ``lerp = src - lower``;
    output ``dst`` is ``(1 - lerp) * x[lower] + lerp * x[upper]``. The weights are those float32 numbers, held
    in float64, so that applying the matrix adds only float64 rounding."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"resize sizes must be positive, got {n_in} -> {n_out}")
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.arange(n_out, dtype=np.float32) * scale
    lower = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    upper = np.minimum(lower + 1, n_in - 1)
    lerp = (src - lower.astype(np.float32)).astype(np.float64)
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, lower), 1.0 - lerp)
    np.add.at(m, (rows, upper), lerp)
    return torch.from_numpy(m)


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
            or images.shape[1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected uint8 images [N, 3, H, W] (RGB, 0..255), got {got}")
    return images


class _Resizer:
    """TF1 bilinear resize of uint8 ``[N, 3, H, W]`` to ``[N, 3, size, size]`` float64, matrices cached per
    (input size, device). Not a module: nothing here belongs in a state dict."""

    def __init__(self, size: int):
        self.size = size
        self._cache: dict[tuple[int, str], torch.Tensor] = {}

    def _matrix(self, n: int, device: torch.device) -> torch.Tensor:
        key = (n, str(device))
        if key not in self._cache:
            self._cache[key] = tf1_bilinear_matrix(n, self.size).to(device)
        return self._cache[key]

    def __call__(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        x = images.to(device).to(torch.float64)
        h, w = x.shape[-2:]
        return self._matrix(h, device) @ x @ self._matrix(w, device).T


@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """TF32 off for convolutions and matmuls inside the block (cuDNN convolutions default to TF32 on Ampere and
    later, which keeps 10 mantissa bits of each input); the previous settings come back on exit."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = conv
        torch.set_float32_matmul_precision(mm)


# ------------------------------------------------------------------------------------------------------ network


class _ConvBN(nn.Module):
    """TF Inception's unit: convolution without bias, batch norm (eps 1e-3), ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    """TF's 3 x 3 stride-1 SAME average pool: border windows average only the pixels they cover."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _row(c_in: int, c_out: int, k: int) -> _ConvBN:  # 1 x k
    return _ConvBN(c_in, c_out, (1, k), padding=(0, k // 2))


def _col(c_in: int, c_out: int, k: int) -> _ConvBN:  # k x 1
    return _ConvBN(c_in, c_out, (k, 1), padding=(k // 2, 0))


class _Mixed35(nn.Module):
    """35 x 35 block (Mixed_5b/c/d): 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 64, 1)
        self.branch5x5_1 = _ConvBN(c_in, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_same(x))], 1)


class _Reduce35(nn.Module):
    """35 -> 17 (Mixed_6a): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool 3x3/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = _ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class _Mixed17(nn.Module):
    """17 x 17 block (Mixed_6b..e), factorised 7 x 7 convolutions with ``c7`` inner channels."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 192, 1)
        self.branch7x7_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7_2 = _row(c7, c7, 7)
        self.branch7x7_3 = _col(c7, 192, 7)
        self.branch7x7dbl_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = _col(c7, c7, 7)
        self.branch7x7dbl_3 = _row(c7, c7, 7)
        self.branch7x7dbl_4 = _col(c7, c7, 7)
        self.branch7x7dbl_5 = _row(c7, 192, 7)
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_same(x))], 1)


class _Reduce17(nn.Module):
    """17 -> 8 (Mixed_7a): 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool 3x3/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(c_in, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = _row(192, 192, 7)
        self.branch7x7x3_3 = _col(192, 192, 7)
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class _Mixed8(nn.Module):
    """8 x 8 block (Mixed_7b with an average pool, Mixed_7c with TF's max pool), split 1x3 / 3x1 branches."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(c_in, 320, 1)
        self.branch3x3_1 = _ConvBN(c_in, 384, 1)
        self.branch3x3_2a = _row(384, 384, 3)
        self.branch3x3_2b = _col(384, 384, 3)
        self.branch3x3dbl_1 = _ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _row(384, 384, 3)
        self.branch3x3dbl_3b = _col(384, 384, 3)
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_same(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FidInceptionV3(nn.Module):
    """TF-2015 Inception v3 up to its 2048-d pool (plus the 1008-way ``fc``, unused, so the weights load
    strictly). ``forward`` takes normalised ``[N, 3, 299, 299]`` input in the module's dtype; :meth:`features`
    takes uint8 images of any size. Build it with :func:`load_inception`; a bare instance is randomly
    initialised."""

    dims = FEATURE_DIMS

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(3, stride=2)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.MaxPool_2 = nn.MaxPool2d(3, stride=2)
        self.Mixed_5b = _Mixed35(192, 32)
        self.Mixed_5c = _Mixed35(256, 64)
        self.Mixed_5d = _Mixed35(288, 64)
        self.Mixed_6a = _Reduce35(288)
        self.Mixed_6b = _Mixed17(768, 128)
        self.Mixed_6c = _Mixed17(768, 160)
        self.Mixed_6d = _Mixed17(768, 160)
        self.Mixed_6e = _Mixed17(768, 192)
        self.Mixed_7a = _Reduce17(768)
        self.Mixed_7b = _Mixed8(1280, max_pool=False)
        self.Mixed_7c = _Mixed8(2048, max_pool=True)
        self.AvgPool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(FEATURE_DIMS, 1008)
        self._resize = _Resizer(INPUT_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``[N, 3, 299, 299]`` -> pool features ``[N, 2048]`` (in the module's dtype)."""
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"):
            x = getattr(self, name)(x)
        return torch.flatten(x, 1)

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` (RGB, any size, any device) -> float64 ``[N, 2048]`` on the module's device:
        TF1 bilinear resize to 299 x 299 (float64), ``(x - 128) / 128``, the network in its dtype."""
        _check_images(images)
        p = self.fc.weight
        x = (self._resize(images, p.device) - 128.0) / 128.0
        with _full_float32():
            return self(x.to(p.dtype)).to(torch.float64)


# -------------------------------------------------------------------------------------------------- tiny network


class TinyFeatureNet(nn.Module):
    """A small random feature network with :class:`FidInceptionV3`'s interface, for tests: TF1 resize to
    ``size`` x ``size``, two strided 3 x 3 convolutions with ReLU, global average pool, a linear map to
    ``dims``. Weights are drawn from ``seed`` (the global RNG is untouched). It runs in float64, one image at a
    time, so an image's features are bit-identical whatever the batch it comes in."""

    def __init__(self, dims: int = 16, seed: int = 0, size: int = 32, width: int = 16):
        super().__init__()
        self.dims = dims
        self.identity = f"tiny-feature-net:dims={dims},seed={seed},size={size},width={width}"  # a cache key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
            self.proj = nn.Linear(2 * width, dims)
        self._resize = _Resizer(size)
        self.double().eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.proj(x.mean(dim=(2, 3)))

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` -> float64 ``[N, dims]``."""
        _check_images(images)
        p = self.proj.weight
        x = (self._resize(images, p.device) - 128.0) / 128.0
        return torch.cat([self(x[i:i + 1].to(p.dtype)) for i in range(len(x))]).to(torch.float64)


# ------------------------------------------------------------------------------------------------------ weights


def default_cache_dir() -> Path:
    """``$TCOMPOSE_CACHE/fid`` when TCOMPOSE_CACHE is set, else ``~/.cache/tcompose/fid``."""
    root = os.environ.get("TCOMPOSE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "tcompose") / "fid"


def weights_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the Inception weights file is kept: ``cache_dir`` (default :func:`default_cache_dir`) / its name."""
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / WEIGHTS_FILE


def _fix_hint() -> str:
    return (f"run `tcompose download fid` once with network (it fetches {WEIGHTS_URL}), or download that file "
            "yourself and pass its path")


def download_weights(cache_dir: str | os.PathLike | None = None, progress: bool = True,
                     url: str = WEIGHTS_URL, timeout_s: float = 60.0) -> Path:
    """The cached Inception weights (:func:`weights_path`), downloaded first unless a valid copy is there.

    The download streams to a temporary name beside the target; a file whose sha256 does not start with
    :data:`WEIGHTS_SHA256_PREFIX` is deleted and refused; a good one is renamed into place. Offline
    (``HF_HUB_OFFLINE=1``) only the cache is read."""
    from ...models.loading import offline

    path = weights_path(cache_dir)
    if path.is_file():
        if file_sha256(path).startswith(WEIGHTS_SHA256_PREFIX):
            return path
        if offline():
            raise UserError(f"{path}: the cached FID Inception weights have the wrong sha256 (expected a digest "
                            f"starting {WEIGHTS_SHA256_PREFIX}); delete the file and {_fix_hint()}")
    elif offline():
        raise MissingPathError(f"{path}: FID Inception weights not in the cache and HF_HUB_OFFLINE=1 forbids "
                               f"fetching them: {_fix_hint()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) if getattr(resp, "headers", None) else 0
            with _bar(progress, total, path.name) as advance:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
                    advance(len(block))
    except (urllib.error.URLError, OSError) as err:
        tmp.unlink(missing_ok=True)
        raise UnavailableError(f"could not fetch {url} ({err}): check the network, or download the file "
                               "yourself and pass its path") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    digest = h.hexdigest()
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        tmp.unlink(missing_ok=True)
        raise UserError(f"{url}: sha256 {digest} does not start with {WEIGHTS_SHA256_PREFIX} (the prefix in its "
                        "name); refused, nothing cached")
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def _bar(show: bool, total: int, name: str) -> Iterator:
    if not show:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(TextColumn(f"downloading {name}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  transient=True) as bar:
        task = bar.add_task("download", total=total or None)
        yield lambda n: bar.advance(task, n)


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> FidInceptionV3:
    """:class:`FidInceptionV3` with the TF-2015 weights from ``path`` (default: the cached file), in eval mode,
    without gradients, on ``device`` in ``dtype``. Reads tensors only (``weights_only=True``); strict load."""
    path = Path(path).expanduser() if path is not None else weights_path()
    if not path.is_file():
        raise MissingPathError(f"{path}: FID Inception weights not found; {_fix_hint()}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (unreadable, or holds more than tensors: one line naming the file)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable state dict of tensors ({first}); {_fix_hint()}") from err
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict; {_fix_hint()}")
    net = FidInceptionV3()
    # The published file is a plain dict without BatchNorm's num_batches_tracked: torch fills those in on load.
    want = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - set(net.state_dict()))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise UserError(f"{path}: not the FID Inception weights ({len(missing)} missing and {len(unexpected)} "
                        f"unexpected keys, e.g. {example!r}); {_fix_hint()}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))
        raise UserError(f"{path}: not the FID Inception weights ({first}); {_fix_hint()}") from None
    return net.to(device, dtype).eval().requires_grad_(False)
