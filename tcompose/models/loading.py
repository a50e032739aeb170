"""Loading transformers vision models (detector, segmenter, CLIP) from a hub id or a local folder, offline-friendly.

``pretrained(loader, name, revision)`` calls ``loader(name, revision=...)`` for a hub id and ``loader(folder)``
for a local folder (a path that looks local but is missing is a one-line error); a hub failure becomes one
line that says how to get the model (``HF_HUB_OFFLINE=1`` needs a warm cache). ``torch_dtype(name, device)``
maps ``--dtype fp32|fp16|bf16`` to a torch dtype: fp16 on CPU falls back to fp32 (CPU kernels for half
precision are missing or slow) and says so in the returned note.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, TypeVar

import torch

from .models import ModelFolderError, _local_path, _offline

T = TypeVar("T")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def _hint(name: str, what: str) -> Iterator[None]:
    """A hub loading error becomes one line: what failed, and how to get the model (offline or not)."""
    try:
        yield
    except (OSError, ValueError) as err:
        if isinstance(err, ModelFolderError):
            raise
        if _offline(None):
            hint = (f"the {what} {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                    f"downloading it: fetch it once with network (`huggingface-cli download {name}`), point HF_HOME "
                    "at a warm cache, or pass a local folder written by save_pretrained")
        else:
            hint = (f"could not load the {what} {name!r} from the Hugging Face Hub: check the id, the revision "
                    "and the network, or pass a local folder written by save_pretrained")
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise (OSError if isinstance(err, OSError) else ValueError)(f"{hint} ({first})") from err


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-file progress bars and no info/warning chatter from transformers while loading."""
    from transformers.utils import logging as tf_logging

    bars = tf_logging.is_progress_bar_enabled()
    level = tf_logging.get_verbosity()
    tf_logging.disable_progress_bar()
    tf_logging.set_verbosity_error()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()


def pretrained(loader: Callable[..., T], name: str, revision: str | None = None, what: str = "model",
               **kwargs: Any) -> T:
    """``loader`` (a ``from_pretrained``) applied to a local folder or a hub id at ``revision``."""
    try:
        local = _local_path(name)
    except ModelFolderError:
        raise ModelFolderError(f"{name}: {what} folder not found; pass an existing local folder (written by "
                               "save_pretrained) or a hub id") from None
    with quiet_transformers():
        if local is not None:
            return loader(str(local), **kwargs)
        with _hint(str(name), what):
            return loader(str(name), revision=revision, **kwargs)


def model_type(name: str, revision: str | None = None, what: str = "model") -> str:
    """The ``model_type`` of a checkpoint's config.json (local folder or hub id)."""
    from transformers import AutoConfig

    return pretrained(AutoConfig.from_pretrained, name, revision, what).model_type


def torch_dtype(name: str, device: torch.device | str) -> tuple[torch.dtype, str | None]:
    """(dtype, note): ``--dtype`` as a torch dtype on ``device``; fp16 on CPU becomes fp32 with a note."""
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "fp16" and torch.device(device).type == "cpu":
        return torch.float32, "--dtype fp16 on CPU: running in fp32 instead (no fast half-precision CPU kernels)"
    return DTYPES[name], None
