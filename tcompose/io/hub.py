"""``--push-to-hub`` of both trainers: the run's output (train-unet's pipeline or LoRA adapters, train-clip's CLIP
and text tower), with its model card, uploaded to the Hugging Face Hub when training ends. Whether it can happen
(online, a token) is checked before anything trains; an upload that fails at the end leaves every local file in
place and says how to upload them again.

What both trainers' model cards (OUT/README.md: tcompose.train.card, tcompose.clip.card) share lives here too: the
training section (:func:`training_section`) and writing the card
(:func:`write_card`)."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

#: What stays local: resumable checkpoints and the latent and text caches are neither a model nor small.
CACHES = ("checkpoints", "latent_cache", "text_cache")
IGNORED = [f"{folder}/{glob}" for folder in CACHES for glob in ("*", "**")]
CARD = "README.md"


def training_section(command: str | None, recipe: list[tuple[str, str]]) -> list[str]:
    """A model card's "## Training" lines: the command that trained the model, then its recipe as a table."""
    return ["## Training", "", "```bash", command or "(trained through the Python API)", "```", "",
            "| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in recipe)]


def write_card(out: Path, text: str) -> Path:
    """``text`` (YAML front matter and Markdown body) as OUT/README.md, through huggingface_hub's ModelCard: written
    whole (a temporary file renamed) with the umask's mode."""
    from huggingface_hub import ModelCard

    from .files import match_umask

    path = Path(out) / CARD
    tmp = path.with_name(f".{CARD}.tmp")
    ModelCard(text).save(tmp)
    tmp.replace(path)
    match_umask(path)
    return path


def hub_repo_id(output: str | Path, hub_model_id: str | None) -> str:
    """``--hub-model-id``, or (as diffusers does) the name of the output folder."""
    return hub_model_id or Path(output).resolve().name


def check_push(push_to_hub: bool, hub_model_id: str | None) -> None:
    """Before any work: a ``--push-to-hub`` that cannot upload (offline, no token) is refused in one line."""
    if not push_to_hub:
        if hub_model_id:
            raise UserError("--hub-model-id goes with --push-to-hub")
        return
    from huggingface_hub import get_token, is_offline_mode

    if is_offline_mode():
        raise UserError("--push-to-hub: the Hugging Face Hub is offline here (HF_HUB_OFFLINE is set); unset it, or "
                        "train without --push-to-hub and upload OUT later with huggingface-cli upload")
    if get_token() is None:
        raise UserError("--push-to-hub needs a Hugging Face token: run `huggingface-cli login` or set HF_TOKEN, "
                        "or train without --push-to-hub and upload OUT later with huggingface-cli upload")
    return None


def push_run(out: Path, repo_id: str, log, endpoint: str | None = None, stage: str = "train-unet") -> str:
    """Create ``repo_id`` (if need be) and upload ``out`` but its checkpoints and caches; the commit's URL.
    A failure is a UserError that says the local run is complete and how to upload it by hand."""
    from huggingface_hub import HfApi

    try:
        api = HfApi(endpoint=endpoint)
        repo = api.create_repo(repo_id, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=str(out), ignore_patterns=IGNORED,
                                   commit_message=f"tcompose {stage}")
    except Exception as e:  # network, permissions, a taken name: nothing local is touched
        raise UserError(f"--push-to-hub: uploading {out} to {repo_id} failed ({type(e).__name__}: {e}); the run is "
                        f"complete in {out}: upload it with `huggingface-cli upload {repo_id} {out} "
                        f"--exclude {' '.join(repr(f + '/*') for f in CACHES)}`") from None
    url = getattr(commit, "commit_url", None) or str(commit)
    log(f"pushed {out} to the Hub: {url}")
    return url
