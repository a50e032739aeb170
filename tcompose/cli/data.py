"""Data stages: `masks` (caption nouns -> masks) and `crops` (object crops for CLIP)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..io.errors import UserError
from ..models import defaults
from ._app import _friendly, _split, app, process_state, run_sharded


def _from_other_source(coco_dir: Optional[Path], other: Optional[Path], flag: str, coco_what: str) -> bool:
    """Whether the rows come from ``other`` (``flag``) instead of COCO_DIR (``coco_what``); exactly one of the two
    is needed."""
    if other is None:
        if coco_dir is None:
            raise UserError(f"missing COCO_DIR ({coco_what}), or {flag}")
        return False
    if coco_dir is not None:
        raise UserError(f"pass either COCO_DIR or {flag}, not both")
    return True


@app.command()
@_friendly
def masks(
    coco_dir: Optional[Path] = typer.Argument(None, help="COCO-format folder (annotations/captions_SPLIT.json, + instances_SPLIT.json for coco-gt, and SPLIT/*.jpg), or a captioned image set: an imagefolder (metadata.jsonl / metadata.csv with file_name and a caption column), a folder of Parquet or Arrow files, or a hub dataset id in the local cache."),
    output: Path = typer.Option(..., "--output", "-o", help="Dataset folder to write (Parquet shards + manifest.json)."),
    image_column: str = typer.Option("image", help="Parquet / Arrow / hub input: the column holding the image (bytes, {bytes, path} or a path)."),
    caption_column: str = typer.Option("text", help="Imagefolder, Parquet or Arrow input: the column holding the caption(s) (text; caption where a set has no text)."),
    source: str = typer.Option("grounded-sam", help="Where masks come from: grounded-sam (GroundingDINO boxes -> SAM masks for the caption's noun phrases) or coco-gt (COCO's own instance masks)."),
    split: str = typer.Option("train2017", help="COCO split name (train2017, val2017, ...); for a captioned set split into train / test files or folders, the split to read (there: train by default)."),
    captions: str = typer.Option("first", help="first: one row per image; all: one row per caption; clip-best: one row per image, for the caption CLIP scores highest."),
    image_ids: Optional[Path] = typer.Option(None, "--image-ids", help="Only the image ids listed in this file (one per line)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N images (by image id)."),
    shard_size: int = typer.Option(1000, help="Images per Parquet shard (the unit of resuming and of splitting work between processes)."),
    detector: str = typer.Option(defaults.GROUNDING_DINO, help="grounded-sam: GroundingDINO hub id or local folder."),
    detector_revision: Optional[str] = typer.Option(None, help="grounded-sam: revision of a hub --detector."),
    segmenter: str = typer.Option(defaults.SEGMENTER, help="grounded-sam: SAM-HQ or SAM hub id or local folder (e.g. facebook/sam-vit-huge)."),
    segmenter_revision: Optional[str] = typer.Option(None, help="grounded-sam: revision of a hub --segmenter."),
    box_threshold: float = typer.Option(0.25, help="grounded-sam: keep a box whose best token probability exceeds this."),
    text_threshold: float = typer.Option(0.25, help="grounded-sam: map a box to the phrase whose best token probability exceeds this."),
    nouns: str = typer.Option("vocab", help="grounded-sam: noun phrases by the bundled vocabulary (vocab) or spaCy (spacy)."),
    clip_model: str = typer.Option(defaults.CAPTION_CLIP, help="--captions clip-best: CLIP hub id or local folder."),
    clip_revision: Optional[str] = typer.Option(None, help="--captions clip-best: revision of a hub --clip-model."),
    batch_size: int = typer.Option(8, help="Images per model batch on each GPU (grounded-sam: part of the settings; a resumed run must use the same)."),
    dtype: str = typer.Option("fp32", help="Model precision: fp32, fp16 or bf16 (fp16 on CPU runs in fp32)."),
    workers: int = typer.Option(4, help="Worker processes per GPU that decode and preprocess images, and threads that encode masks (0: none)."),
    include_crowd: bool = typer.Option(True, help="coco-gt: union COCO crowd regions into a category's mask (\"people\" covers the crowd too)."),
    from_tokencompose: Optional[Path] = typer.Option(None, "--from-tokencompose", help="Instead of COCO_DIR: import the original TokenCompose data from its metadata.jsonl."),
    images: Optional[Path] = typer.Option(None, help="--from-tokencompose: folder of the images (default: the metadata's folder)."),
    seg_root: Optional[Path] = typer.Option(None, help="--from-tokencompose: folder holding seg/<id>/mask_*.png (or coco_gsam_seg itself)."),
) -> None:
    """Caption nouns -> per-noun segmentation masks: the training data of train-unet. Resumable; multi-GPU with accelerate launch."""
    if _from_other_source(coco_dir, from_tokencompose, "--from-tokencompose METADATA_JSONL", "a COCO-format folder"):
        from ..masks.import_tokencompose import ImportConfig
        from ..masks.import_tokencompose import run as run_import

        cfg = ImportConfig(metadata=from_tokencompose, output=output, images=images, seg_root=seg_root, limit=limit,
                           shard_size=shard_size)
        run_sharded(run_import, cfg)
        return
    if images is not None or seg_root is not None:
        raise UserError("--images and --seg-root go with --from-tokencompose")
    from ..masks.config import MasksConfig
    from ..masks.stage import run

    state = process_state()
    cfg = MasksConfig(
        coco_dir=coco_dir, output=output, split=split, source=source, captions=captions, image_ids=image_ids,
        limit=limit, shard_size=shard_size, include_crowd=include_crowd, detector=detector,
        detector_revision=detector_revision, segmenter=segmenter, segmenter_revision=segmenter_revision,
        box_threshold=box_threshold, text_threshold=text_threshold, nouns=nouns, clip_model=clip_model,
        clip_revision=clip_revision, batch_size=batch_size, dtype=dtype, workers=workers, device=str(state.device),
        image_column=image_column, caption_column=caption_column,
    )
    run_sharded(run, cfg, state)


@app.command()
@_friendly
def crops(
    coco_dir: Optional[Path] = typer.Argument(None, help="COCO-format folder: annotations/instances_SPLIT.json and SPLIT/*.jpg."),
    output: Path = typer.Option(..., "--output", "-o", help="Dataset folder to write (Parquet shards + manifest.json)."),
    from_masks: Optional[Path] = typer.Option(None, "--from-masks", help="Instead of COCO_DIR: one crop per masked phrase of this masks dataset (the grounded-SAM recipe)."),
    split: str = typer.Option("train2017", help="COCO split name (train2017, val2017, ...)."),
    min_area: float = typer.Option(1024.0, help="Smallest object kept: its annotation's area (mask pixels), default 32x32."),
    margin: float = typer.Option(0.1, help="Context around the box: each side grows by this fraction of the box."),
    square: bool = typer.Option(True, help="Square crops around the box centre (CLIP's input is square)."),
    size: int = typer.Option(224, help="Output side in pixels (the longer side with --no-square)."),
    template: str = typer.Option("a photo of a {category}", help="Text of each crop; {category} is the category name."),
    masked: bool = typer.Option(False, help="Grey out the pixels outside the instance mask."),
    include_crowd: bool = typer.Option(False, help="Also crop COCO crowd regions (iscrowd=1)."),
    categories: str = typer.Option("", help="Only these category names, comma-separated (default: all)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N images (by image id)."),
    shard_size: int = typer.Option(1000, help="Images per Parquet shard (the unit of resuming)."),
    workers: Optional[int] = typer.Option(None, help="Worker processes (default: one per CPU core); rows do not depend on it."),
) -> None:
    """Object crops labelled "a photo of a {category}": from COCO instances, or --from-masks a masks dataset's masked phrases. The data of train-clip; resumable."""
    if _from_other_source(coco_dir, from_masks, "--from-masks MASKS_DIR",
                          "a COCO-format folder with instance annotations"):
        if include_crowd or categories or split != "train2017":
            raise UserError("--split, --categories and --include-crowd choose COCO annotations; they do not apply "
                            "to --from-masks")
        from ..crops.from_masks import MaskCropsConfig
        from ..crops.from_masks import run as run_from_masks

        cfg = MaskCropsConfig(masks=from_masks, output=output, min_area=min_area, margin=margin, square=square,
                              size=size, template=template, masked=masked, limit=limit, shard_size=shard_size,
                              workers=workers)
        run_sharded(run_from_masks, cfg)
        return
    from ..crops.stage import CropsConfig, run

    cfg = CropsConfig(coco_dir=coco_dir, output=output, split=split, min_area=min_area, margin=margin, square=square,
                      size=size, template=template, masked=masked, include_crowd=include_crowd,
                      categories=_split(categories), limit=limit, shard_size=shard_size, workers=workers)
    run_sharded(run, cfg)
