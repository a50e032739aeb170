"""Test scaffolding shared by several modules (imported as ``helpers``: tests/ is on sys.path through conftest.py).

- :func:`make_training_setup` and :func:`tiny_train_config`: synthetic scenes -> a masks dataset -> tiny random
  pipelines, and a seconds-long train-unet config on them (the train tests, the multi-process test).
- :class:`ShardWrites` (the ``shard_writes`` fixture): "a kill after the first shard" for the resume tests of
  the stages that write parquet shards (masks, import-tokencompose, grounded-sam, crops).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

RES = 32  # training resolution of the train tests: 16x16 latents, attention maps of 16x16 and 8x8

#: The settings every tiny train-unet run of the tests shares; a module passes what it does differently.
TINY_TRAIN = dict(resolution=RES, batch_size=2, grad_accum=1, max_steps=4, lr=1e-3, lambda_token=1.0, gamma_pixel=0.1,
                  num_workers=0, checkpoint_every=0, eval_fraction=0.2, eval_max_examples=2, eval_timesteps=(500,),
                  progress=False, log_every=1)


def make_training_setup(root: Path, *, n_images: int, seed: int, size: int = 64, captions: str = "all",
                        corpus_extra: Sequence[str] = (), models: dict[str, dict] | None = None) -> dict:
    """``make_scenes`` -> ``masks --source coco-gt`` -> one tiny random pipeline per entry of ``models`` (folder
    name -> extra ``write_tiny_pipeline`` arguments; default one SD pipeline, ``base``), its tokenizer learnt
    from the scenes' captions (+ ``corpus_extra``). Returns ``{"root", "scenes", "masks", "captions", NAME: folder}``."""
    from tcompose.data.synthetic import make_scenes
    from tcompose.masks.config import MasksConfig
    from tcompose.masks.stage import run as make_masks
    from tcompose.testing.tiny_sd import write_tiny_pipeline

    scenes = make_scenes(root / "scenes", n_images=n_images, size=size, seed=seed)
    make_masks(MasksConfig(coco_dir=scenes, output=root / "masks", split="train2017", captions=captions), progress=False)
    annotations = json.loads((scenes / "annotations" / "captions_train2017.json").read_text())["annotations"]
    texts = [a["caption"] for a in annotations]
    out = {"root": root, "scenes": scenes, "masks": root / "masks", "captions": texts}
    for name, kw in (models or {"base": {}}).items():
        out[name] = write_tiny_pipeline(root / name, corpus=texts + list(corpus_extra), **({"seed": 0} | kw))
    return out


def tiny_train_config(setup: dict, output: Path, model: str = "base", **kw):
    """A :class:`TrainUnetConfig` on ``setup``'s masks and ``model`` (a pipeline of ``setup`` by name, or any model
    path): :data:`TINY_TRAIN` updated by ``kw``."""
    from tcompose.train.config import TrainUnetConfig

    return TrainUnetConfig(**({"data": setup["masks"], "output": output, "model": str(setup.get(model, model))}
                              | TINY_TRAIN | kw))


class ShardWrites:
    """Patches ``ShardedWriter.write_shard`` for a resume test; each patch returns the list of shard indices it
    lets through (the same list object, cleared when a patch is set)."""

    def __init__(self, monkeypatch):
        from tcompose.io.datasets import ShardedWriter

        self._monkeypatch, self._cls, self.real = monkeypatch, ShardedWriter, ShardedWriter.write_shard
        self.written: list[int] = []

    def kill_after_first(self) -> list[int]:
        """The first shard is written; the next write raises ``KeyboardInterrupt``, as a kill there would."""
        real, written = self.real, self.written
        written.clear()

        def write_then_die(writer, shard, *args):
            if written:
                raise KeyboardInterrupt("killed")
            written.append(shard.index)
            return real(writer, shard, *args)

        self._monkeypatch.setattr(self._cls, "write_shard", write_then_die)
        return written

    def record(self) -> list[int]:
        """Every shard is written, its index recorded."""
        real, written = self.real, self.written
        written.clear()

        def write_and_record(writer, shard, *args):
            written.append(shard.index)
            return real(writer, shard, *args)

        self._monkeypatch.setattr(self._cls, "write_shard", write_and_record)
        return written

    def restore(self) -> None:
        """The real ``write_shard`` again."""
        self._monkeypatch.setattr(self._cls, "write_shard", self.real)
