"""Equal batch counts on every rank, so that no DDP rank waits in a collective that others never enter.

Ranks can hold different numbers of samples (whole shards are dealt out; atom budgets make batch counts
depend on structure sizes; a corrupt shard may be skipped). `ShardStream(equal_batches=True)` therefore
ends every rank's epoch at the same batch count:

- in a torch.distributed job, given `agree` (a collective "true on every rank?", in practice
  `pretrain.distributed.agree`, which owns the communication and its device): lockstep, one agreement
  ("I have a batch") per batch; the epoch ends for all ranks when the first runs dry. Robust to anything
  that changes a rank's count at run time (skipped shards included);
- without it: at the minimum of `batches_per_rank()` computed from the manifest, which
  needs exact counts (no atom budget over structures of mixed sizes).

Samples after the cut are not lost: the next epoch deals a new order, and `state_dict()` counts only
the batches handed out.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


def lockstep(batches: Iterator[T], agree: Callable[[bool], bool]) -> Iterator[T]:
    """Yield while every rank has a batch (`agree(flag)`: true on every rank iff true on all; one per batch)."""
    for batch in itertools.chain(batches, [None]):
        if not agree(batch is not None) or batch is None:
            return
        yield batch


def at_most(batches: Iterator[T], counts: list[int], exact: bool) -> Iterator[T]:
    """The first min(counts) batches: every rank stops at the same count without communicating."""
    if not exact:
        raise ValueError("equal_batches without the lockstep (agree=) needs exact batch counts: "
                         "with max_atoms and structures of mixed sizes they are only known at run time; "
                         "initialise the process group (torchrun), pass agree=pretrain.distributed.agree, "
                         "or drop max_atoms")
    return itertools.islice(batches, min(counts))
