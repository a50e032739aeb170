"""Tools around the stages: `demo` (offline CPU demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import _friendly, _split, app


@app.command()
@_friendly
def demo(
    output: Path = typer.Option(Path("demo-output"), "--output", "-o", help="Where the demo writes its data and runs."),
    steps: int = typer.Option(150, help="Optimizer steps of each training run."),
    images: int = typer.Option(96, help="Synthetic scenes to generate."),
    seed: int = typer.Option(0, help="Seed of the scenes and of both runs."),
) -> None:
    """Offline CPU demo: synthetic scenes -> masks -> train a tiny model with the losses off and on -> scores."""
    from ..demo import DemoConfig, run

    run(DemoConfig(output=output, steps=steps, images=images, seed=seed))
