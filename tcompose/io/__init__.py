"""How stages read and write: the dataset formats (schemas, sharded atomic resumable writing, reading), the
trainers' checkpoints and data order, and what every sharded stage does around its rows.

- :mod:`.datasets`: a dataset is a folder of ``train-*.parquet`` shards plus ``manifest.json``;
  ``ShardedWriter``, ``RowReader``, the masks and crops schemas, mask PNG encoding;
- :mod:`.stages`: progress bar, refusing a folder written with other settings, stale temporary files, waiting
  for the other processes' shards;
- :mod:`.checkpoints`: training state as safetensors + JSON (no pickle), ``--resume latest``;
- :mod:`.batches`: ``MicroBatches``, the resumable, process-sharded data order of both trainers;
- :mod:`.runs`: what both trainers do around their loop (run folders, resume checks and restoring, non-finite
  losses, Ctrl-C);
- :mod:`.trainer`: what both trainers train under and report to (their Accelerator, ``--report-to`` trackers,
  ``--optimizer``, progress bar, peak memory);
- :mod:`.hub`: ``--push-to-hub`` of both trainers (checked before any work, the upload when training ends) and
  what their model cards share;
- :mod:`.preemption`: SIGTERM, SIGUSR1 and Ctrl-C in a trainer: agreed by every process at a step boundary,
  that step checkpointed, exit code 128 + the signal;
- :mod:`.errors`: ``UserError`` and its kinds (refused input, one line in the CLI) and ``system_error``; it
  imports nothing, and every area may raise them;
- :mod:`.exports`: ``lazy_exports``, the lazy re-exports of this package's and ``tcompose.models``' names;
- :mod:`.files`: written files get the umask's permissions (safetensors writes 0600); folders are written under a
  temporary name and renamed into place.

Names are re-exported lazily (``from tcompose.io import ShardedWriter``): the CLI imports :mod:`.errors`, which
must not pull in torch or pyarrow through this package.
"""

from __future__ import annotations

from .exports import lazy_exports

_EXPORTS = {
    "batches": ("MicroBatches",),
    "checkpoints": ("list_checkpoints", "load_checkpoint", "resolve_resume", "save_checkpoint"),
    "datasets": ("COLUMNS", "MANIFEST", "DatasetError", "RowReader", "ShardedWriter", "decode_mask", "encode_mask",
                 "image_struct", "iter_rows", "load_manifest", "read_table", "schema_for", "shard_files",
                 "write_json_atomic"),
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
