"""Equal batch counts on every rank, so that no DDP rank waits in a collective that others never enter.

Ranks can hold different numbers of samples (whole shards are dealt out; atom budgets make batch counts
depend on structure sizes; a corrupt shard may be skipped). `ShardStream(equal_batches=True)` therefore
ends every rank's epoch at the same batch count:

- in a torch.distributed job (the process group initialised): lockstep, one all-reduce (MIN of "I have
  a batch") per batch; the epoch ends for all ranks when the first runs dry. Robust to anything that
  changes a rank's count at run time (skipped shards included);
- without a process group: at the minimum of `batches_per_rank()` computed from the manifest, which
  needs exact counts (no atom budget over structures of mixed sizes).

Samples after the cut are not lost: the next epoch deals a new order, and `state_dict()` counts only
the batches handed out.
"""
from __future__ import annotations

import itertools
from typing import Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def process_group_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def lockstep(batches: Iterator[T]) -> Iterator[T]:
    """Yield while every rank of the process group has a batch (one MIN all-reduce per batch)."""
    flag = torch.zeros(1)
    for batch in itertools.chain(batches, [None]):
        flag.fill_(0.0 if batch is None else 1.0)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if batch is None or flag.item() == 0.0:
            return
        yield batch


def at_most(batches: Iterator[T], counts: list[int], exact: bool) -> Iterator[T]:
    """The first min(counts) batches: every rank stops at the same count without communicating."""
    if not exact:
        raise ValueError("equal_batches without a torch.distributed process group needs exact batch counts: "
                         "with max_atoms and structures of mixed sizes they are only known at run time; "
                         "initialise the process group (torchrun) or drop max_atoms")
    return itertools.islice(batches, min(counts))
