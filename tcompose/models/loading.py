"""Loading models from a hub id or a local folder, offline-friendly: what every model loader shares.

``local_path(name)`` tells a local folder from a hub id (a path that looks local but is missing is a
``ModelFolderError``); ``hub_hint`` attaches a one-line hint to a hub loading error; ``offline()`` reads
``HF_HUB_OFFLINE``; ``no_hf_progress_bars`` / ``quiet_transformers`` keep transformers' own bars and chatter
out of a stage's output.

For the transformers vision models (detector, segmenter, CLIP):
``pretrained(loader, name, revision)`` calls ``loader(name, revision=...)`` for a hub id and ``loader(folder)``
for a local folder (a path that looks local but is missing is a one-line error); a hub failure becomes one
line that says how to get the model (``HF_HUB_OFFLINE=1`` needs a warm cache). ``torch_dtype(name, device)``
maps ``--dtype fp32|fp16|bf16`` to a torch dtype: fp16 on CPU falls back to fp32 (CPU kernels for half
precision are missing or slow) and says so in the returned note.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch

from ..io.errors import UnavailableError, UserError, system_error

T = TypeVar("T")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelFolderError(UserError):
    """A model path that is not a usable folder (missing, or without the expected subfolders/files)."""


def tf_dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers >= 4.56 names the argument ``dtype``; older versions ``torch_dtype``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def local_path(name: str | os.PathLike) -> Path | None:
    """The local folder ``name`` names, None for a hub id; ModelFolderError for a local path that is absent."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelFolderError(
                f"{path} is a file; pass a model folder or a hub id such as CompVis/stable-diffusion-v1-4"
            )
        return path
    text = str(name)
    parts = text.replace("\\", "/").split("/")
    local_like = (
        isinstance(name, Path) or text.startswith((".", "/", "~")) or "\\" in text or len(parts) > 2
        or (len(parts) == 2 and Path(parts[0]).is_dir())
    )
    if local_like:
        raise ModelFolderError(
            f"{path}: model folder not found. Pass an existing local folder (e.g. one written by "
            "`StableDiffusionPipeline.save_pretrained` or `tcompose train-unet`) or a hub id such as "
            "CompVis/stable-diffusion-v1-4."
        )
    return None


def offline(local_files_only: bool | None = None) -> bool:
    """Whether hub downloads are off: ``local_files_only``, or ``HF_HUB_OFFLINE`` set to 1/true/yes/on."""
    if local_files_only:
        return True
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def _hub_errors(local_files_only: bool | None, offline_hint: str, online_hint: str,
                convert: Callable[[Exception, str, str], None]) -> Iterator[None]:
    """A hub loading error (``OSError``, ``ValueError``; not a :class:`UserError`, which says what to fix already)
    goes to ``convert(err, hint, first line of err)``, the hint for offline mode or for the network; unless
    ``convert`` raises another error, ``err`` is re-raised."""
    try:
        yield
    except (OSError, ValueError) as err:
        if isinstance(err, UserError):  # ModelFolderError & co: already says what to fix
            raise
        hint = offline_hint if offline(local_files_only) else online_hint
        convert(err, hint, str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        raise


def _attach_hint(err: Exception, hint: str, first: str) -> None:
    err.add_note(hint)
    if isinstance(err, OSError) and not system_error(err):  # the hub's "no such id / not cached"
        user = UnavailableError(f"{first} ({hint})")
        user.add_note(hint)
        raise user from err


@contextlib.contextmanager
def hub_hint(model_id: str, local_files_only: bool | None) -> Iterator[None]:
    """A hub loading error with a one-line hint attached; the hub's own ``OSError`` (no such id, not cached
    offline) is re-raised as :class:`~tcompose.io.errors.UnavailableError` (the user's to fix), others unchanged."""
    with _hub_errors(
        local_files_only,
        offline_hint=(f"hint: {model_id!r} is not in the local Hugging Face cache and offline mode (HF_HUB_OFFLINE=1 / "
                      f"local_files_only) forbids downloading it: fetch it once with network (`tcompose download "
                      f"{model_id}`), point HF_HOME at a warm cache, or pass a local diffusers folder."),
        online_hint=(f"hint: could not load {model_id!r} from the Hugging Face Hub: check the id and --revision and "
                     "the network, or pass a local diffusers folder."),
        convert=_attach_hint,
    ):
        yield


@contextlib.contextmanager
def quiet_logger(logger_name: str) -> Iterator[None]:
    """Drop a logger's records below ERROR. A filter, not setLevel: transformers reads its logger's level."""
    import logging

    log = logging.getLogger(logger_name)
    drop = lambda record: record.levelno >= logging.ERROR  # noqa: E731
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


@contextlib.contextmanager
def no_hf_progress_bars() -> Iterator[None]:
    """Turn off transformers' per-model progress bars ("Loading weights", "Writing model shards") inside the
    block: one bar per component is noise next to a stage's own progress bar."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def raised_by_loader(err: BaseException) -> bool:
    """Whether ``err`` was raised inside transformers, diffusers or huggingface_hub (about the model being loaded),
    not by tcompose's own code: only those become the user's one-line errors."""
    tb = err.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    where = last.tb_frame.f_code.co_filename.replace("\\", "/") if last is not None else ""
    return any(f"/{lib}/" in where for lib in ("transformers", "diffusers", "huggingface_hub", "safetensors"))


def _one_line(err: Exception, hint: str, first: str) -> None:
    if isinstance(err, OSError) and system_error(err):  # a full disk, an I/O error: the system's
        return
    if not isinstance(err, OSError) and not raised_by_loader(err):  # a ValueError of tcompose's own: a bug
        return
    raise (UnavailableError if isinstance(err, OSError) else UserError)(f"{hint} ({first})") from err


@contextlib.contextmanager
def folder_hint(folder: str | os.PathLike, what: str = "model") -> Iterator[None]:
    """Loading from a local folder the user named: an ``OSError`` of the loaders (a weight file missing, weights
    only as ``.bin``, an unreadable config) becomes :class:`ModelFolderError` naming the folder; a system error
    (full disk, I/O) and tcompose's own errors pass unchanged."""
    try:
        yield
    except OSError as err:
        if isinstance(err, UserError) or system_error(err) or not raised_by_loader(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFolderError(
            f"{folder}: cannot load the {what} from it ({first}); pass a complete folder written by save_pretrained "
            "(tcompose reads safetensors weights only: re-save .bin weights with safe_serialization=True)") from err


@contextlib.contextmanager
def _hint(name: str, what: str) -> Iterator[None]:
    """A hub loading error becomes one line: what failed, and how to get the model (offline or not)."""
    with _hub_errors(
        None,
        offline_hint=(f"the {what} {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                      f"downloading it: fetch it once with network (`huggingface-cli download {name}`), point HF_HOME "
                      "at a warm cache, or pass a local folder written by save_pretrained"),
        online_hint=(f"could not load the {what} {name!r} from the Hugging Face Hub: check the id, the revision "
                     "and the network, or pass a local folder written by save_pretrained"),
        convert=_one_line,
    ):
        yield


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
        local = local_path(name)
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
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "fp16" and torch.device(device).type == "cpu":
        return torch.float32, "--dtype fp16 on CPU: running in fp32 instead (no fast half-precision CPU kernels)"
    return DTYPES[name], None


def model_license(model: str, revision: str | None = None) -> str | None:
    """The ``license`` of a model's card (README.md): a local folder's, or the Hub's (only its cache when offline);
    None where there is none to read. The trainers' model cards name it as their base model's."""
    from huggingface_hub import ModelCard, hf_hub_download

    try:
        local = local_path(model)
        if local is not None:
            readme = local / "README.md"
            return ModelCard.load(readme).data.license if readme.is_file() else None
        path = hf_hub_download(str(model), "README.md", revision=revision, local_files_only=offline())
        return ModelCard.load(path).data.license
    except Exception:  # noqa: BLE001  (no card, no network: the licence is then "other", and said so)
        return None
