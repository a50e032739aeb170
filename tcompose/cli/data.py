"""Data stages: `masks` (caption nouns -> masks) and `crops` (object crops for CLIP)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import _friendly, _split, app


@app.command()
@_friendly
def masks(
    coco_dir: Path = typer.Argument(..., help="COCO-format folder: annotations/{captions,instances}_SPLIT.json and SPLIT/*.jpg."),
    output: Path = typer.Option(..., "--output", "-o", help="Dataset folder to write (Parquet shards + manifest.json)."),
    source: str = typer.Option("coco-gt", help="Where masks come from: coco-gt (COCO's own instance masks)."),
    split: str = typer.Option("train2017", help="COCO split name (train2017, val2017, ...)."),
    captions: str = typer.Option("first", help="first: one row per image; all: one row per caption."),
    limit: Optional[int] = typer.Option(None, help="Only the first N images (by image id)."),
    shard_size: int = typer.Option(1000, help="Images per Parquet shard (the unit of resuming)."),
    include_crowd: bool = typer.Option(True, help="Union COCO crowd regions into a category's mask (\"people\" covers the crowd too)."),
) -> None:
    """Caption nouns -> per-noun segmentation masks: the training data of train-unet. Resumable."""
    from accelerate import PartialState

    from ..masks import MasksConfig, run

    state = PartialState()
    cfg = MasksConfig(coco_dir=coco_dir, output=output, split=split, source=source, captions=captions,
                      limit=limit, shard_size=shard_size, include_crowd=include_crowd)
    run(cfg, rank=state.process_index, world_size=state.num_processes, progress=state.is_main_process)
