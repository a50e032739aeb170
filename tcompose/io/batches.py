"""The data order of the trainers (train-unet, train-clip): resumable and sharded over processes.

Micro-step ``m`` takes global batch ``m`` of a seeded permutation per epoch, and process ``rank`` its slice of
it, so a run resumed at micro-step ``m`` sees exactly the batches an uninterrupted run would, whatever the
number of processes (as long as the global micro-batch stays the same).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import UserError


@dataclass(eq=False, repr=False)  # compared and shown as an object: rows may be a million ids
class MicroBatches:
    """Batch sampler: this process's ``(row, example number)`` keys for each micro-step from ``start`` on.

    Micro-step ``m`` takes global batch ``m`` of epoch ``m // batches_per_epoch`` (the last incomplete batch
    of an epoch is dropped); process ``rank`` takes its ``per_process`` slice of it.
    """

    rows: list[int]
    per_process: int
    world_size: int
    rank: int
    seed: int
    start: int = 0
    stop: int | None = None
    global_batch: int = field(init=False)  # per_process x world_size
    per_epoch: int = field(init=False)  # global batches per epoch

    def __post_init__(self) -> None:
        self.global_batch = self.per_process * self.world_size
        if len(self.rows) < self.global_batch:
            raise UserError(
                f"{len(self.rows)} training examples cannot fill one batch of {self.global_batch} "
                f"(--batch-size x processes); lower --batch-size or add data"
            )
        self.per_epoch = len(self.rows) // self.global_batch

    def keys(self, micro_step: int) -> list[tuple[int, int]]:
        epoch, j = divmod(micro_step, self.per_epoch)
        perm = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + epoch))
        first = j * self.global_batch + self.rank * self.per_process
        return [(self.rows[perm[first + i]], micro_step * self.global_batch + self.rank * self.per_process + i) for i in range(self.per_process)]

    def __iter__(self):
        m = self.start
        while self.stop is None or m < self.stop:
            yield self.keys(m)
            m += 1

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("an open-ended MicroBatches has no length")
        return self.stop - self.start
