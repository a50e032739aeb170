"""``--push-to-hub`` of both trainers: the run's output (train-unet's pipeline or LoRA adapters, train-clip's CLIP
and text tower), with its model card, uploaded to the Hugging Face Hub when training ends. Whether it can happen (online, a token) is checked before anything trains; an upload
that fails at the end leaves every local file in place and says how to upload them again."""

from __future__ import annotations

from pathlib import Path

from ..io.errors import UserError

#: What stays local: resumable checkpoints and the latent and text caches are neither a model nor small.
CACHES = ("checkpoints", "latent_cache", "text_cache")
IGNORED = [f"{folder}/{glob}" for folder in CACHES for glob in ("*", "**")]


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
