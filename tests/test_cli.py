"""The command line as a user meets it: help readable at 80 columns, no noise from libraries tcompose avoids."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

COMMANDS = ["masks", "crops", "train-unet", "train-clip", "generate", "multigen", "visor", "geneval", "fid", "latency", "table",
            "attnviz", "download", "bench", "demo"]


def _help(*args: str, columns: int = 80) -> str:
    env = os.environ | {"COLUMNS": str(columns), "TERM": "dumb"}
    out = subprocess.run([sys.executable, "-m", "tcompose", *args, "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_80_columns_and_names_every_option_whole(command):
    from tcompose.cli import app
    from typer.main import get_command

    text = _help(command)
    assert all(len(line) <= 80 for line in text.splitlines()), max(text.splitlines(), key=len)
    assert "…" not in text
    click_command = get_command(app).commands[command]
    for param in click_command.params:
        for flag in param.opts:
            if flag.startswith("--"):
                assert flag in text, f"{command}: {flag} is not shown whole in --help"


def test_the_top_level_help_lists_every_command():
    text = _help()
    assert all(c in text for c in COMMANDS)


def test_no_torchvision_notice_when_models_load(tmp_path):
    """transformers says once per image processor that it falls back because torchvision is missing; tcompose
    silences exactly that message (and nothing else on that logger)."""
    code = (
        "import logging, tcompose\n"
        "from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline\n"
        "from transformers import CLIPImageProcessor, SiglipImageProcessor\n"
        "logging.getLogger('transformers.utils.import_utils').warning('another notice stays visible')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torchvision" not in out.stderr and "another notice stays visible" in out.stderr, out.stderr
