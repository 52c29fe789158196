"""Batches of a stream, epoch after epoch, with the position (epoch, batches taken in it) a resume seeks to.

One class for every loop: finetuning draws alone (`EpochBatches(stream)`), pretraining in lockstep
(`agree` = an all-ranks AND, so an epoch ends for every rank when any rank runs dry and no rank waits in a
collective the others never reach). A stream deals the same batches in the same epoch, so resuming means
skipping the batches already taken.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _alone(has_batch: bool) -> bool:
    return has_batch


class EpochBatches:
    def __init__(self, stream, epoch: int = 0, skip: int = 0, agree: Callable[[bool], bool] = _alone,
                 empty: str = "the stream yielded no batch"):
        """`stream`: has `set_epoch(n)` and iterates batches; `empty`: the error when an epoch has none."""
        self.stream, self.agree, self.empty = stream, agree, empty
        self.epoch, self.consumed = epoch, skip
        self.iterator: Any = None          # started on the first batch (or by a seek)
        if skip:
            self.seek(epoch, skip)

    def seek(self, epoch: int, consumed: int) -> None:
        """Continue at `consumed` batches into `epoch` (every rank skips the same number: no collective)."""
        self.epoch = epoch
        self._start()
        for _ in range(consumed):
            next(self.iterator)
        self.consumed = consumed

    def _start(self) -> None:
        self.stream.set_epoch(self.epoch)
        self.iterator, self.consumed = iter(self.stream), 0

    def position(self) -> tuple[int, int]:
        return self.epoch, self.consumed

    def next(self):
        if self.iterator is None:
            self._start()
        for _ in range(2):   # the rest of this epoch, else the first batch of the next
            batch = next(self.iterator, None)
            if self.agree(batch is not None):
                self.consumed += 1
                return batch
            self.epoch += 1
            self._start()
        raise RuntimeError(self.empty)

    def __iter__(self):
        return self

    def __next__(self):
        return self.next()

    def close(self) -> None:
        self.iterator = None
