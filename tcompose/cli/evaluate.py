"""Evaluation: `generate` (images from prompts), `multigen` (the MultiGen benchmark), `attnviz` (attention maps)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import _friendly, _split, app

