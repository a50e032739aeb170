"""The settings of the masks stage (``tcompose masks``) and the device and precision its models run in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models.defaults import CAPTION_CLIP, GROUNDING_DINO, SEGMENTER
from ..models.loading import torch_dtype


@dataclass
class MasksConfig:
    """Settings of ``tcompose masks`` (the CLI's default ``--source`` is grounded-sam; this class keeps
    coco-gt, which needs no models, as the library default)."""

    coco_dir: Path
    """COCO-format folder: ``annotations/captions_{split}.json`` (+ ``instances_{split}.json`` for coco-gt) and
    the images in ``{split}/``; or any captioned image set (:mod:`tcompose.data.captioned`: an imagefolder with
    metadata.jsonl / metadata.csv, a folder of Parquet or Arrow files, a cached hub dataset id)."""
    output: Path
    """Dataset folder to write (Parquet shards + manifest.json); rerunning into it resumes."""
    split: str = "train2017"
    """Which annotation files and image folder to read (``val2017`` for the 5k validation images)."""
    source: str = "coco-gt"
    """Where masks come from: ``coco-gt`` (COCO's instance masks) or ``grounded-sam`` (GroundingDINO + SAM).
    The command line defaults to ``grounded-sam`` (the paper's masks); the library to ``coco-gt``, which loads
    no model, so that code building a config (the demo, tests) never downloads by accident."""
    captions: str = "first"
    """``first``: one row per image, its first caption; ``all``: one row per caption; ``clip-best``: one row
    per image, for the caption ``clip_model`` scores highest (what TokenCompose did)."""
    limit: int | None = None
    """Only the first N images in image-id order, after ``image_ids`` (None: all)."""
    image_ids: Path | None = None
    """A text file with one image id per line (``#`` comments and blank lines ignored): only those images."""
    shard_size: int = 1000
    """Images per Parquet shard; the unit of resuming and of splitting work between processes."""
    include_crowd: bool = True
    """coco-gt: use COCO crowd regions (``iscrowd=1``: a crowd of people, a pile of bananas) in a category's
    mask. On by default: a caption's "people" or "bananas" refers to the crowd too, and leaving it out would
    teach the model that part of the phrase's region is background. Off: crowd-only categories are absent."""
    detector: str = GROUNDING_DINO
    """grounded-sam: GroundingDINO checkpoint, hub id or local folder."""
    detector_revision: str | None = None
    segmenter: str = SEGMENTER
    """grounded-sam: SAM-HQ (``model_type`` sam_hq) or SAM (sam) checkpoint, hub id or local folder."""
    segmenter_revision: str | None = None
    box_threshold: float = 0.25
    """grounded-sam: keep a box when its highest token probability exceeds this."""
    text_threshold: float = 0.25
    """grounded-sam: map a kept box to a phrase only when that phrase's best token probability exceeds this."""
    nouns: str = "vocab"
    """grounded-sam: noun phrases by the bundled vocabulary (``vocab``) or spaCy's parser (``spacy``)."""
    clip_model: str = CAPTION_CLIP
    """``--captions clip-best``: the CLIP model that scores captions (OpenAI ViT-L/14@336px, as the original)."""
    clip_revision: str | None = None
    batch_size: int = 8
    """Images per model batch (grounded-sam: part of the settings, see the module docstring)."""
    dtype: str = "fp32"
    """Model precision: fp32, fp16 or bf16 (fp16 on CPU runs in fp32). Part of the settings: it moves masks."""
    workers: int = 4
    """DataLoader worker processes that read, decode and preprocess images (0: in the main process), and as
    many threads encoding PNGs; coco-gt always works in the main process. Performance only."""
    image_column: str = "image"
    """A Parquet dataset as ``coco_dir``: the column holding the image (bytes, ``{bytes, path}`` or a path)."""
    caption_column: str = "text"
    """An imagefolder or Parquet dataset as ``coco_dir``: the column holding the caption (or list of captions)."""
    device: str | None = None
    """Where the models run; None: cuda if available, else cpu (the CLI passes accelerate's device)."""

    def __post_init__(self):
        self.coco_dir = Path(self.coco_dir)
        self.output = Path(self.output)
        self.image_ids = Path(self.image_ids) if self.image_ids is not None else None


def resolve_device(device: str | None):
    """``device``, or cuda when available, else cpu."""
    import torch

    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_dtype(cfg: MasksConfig) -> tuple[Any, str | None]:
    """(torch dtype, note) the models run in: ``cfg.dtype`` on ``cfg.device`` (fp16 on CPU: fp32 + a note)."""
    return torch_dtype(cfg.dtype, resolve_device(cfg.device))
