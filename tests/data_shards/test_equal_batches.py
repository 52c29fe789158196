"""`ShardStream(equal_batches=True)`: every rank yields the same number of batches per epoch, whatever
the shard count or structure sizes (no rank left waiting in a DDP collective)."""
from __future__ import annotations

import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from data_shards.stream import ShardStream
from pretrain.distributed import agree
from tests.helpers.net import free_port

CUTOFF = 3.0


def _counts(shard_dir, world_size, **kw) -> list[int]:
    return [sum(1 for _ in ShardStream(shard_dir, "train", 3, CUTOFF, rank=r, world_size=world_size, **kw))
            for r in range(world_size)]


def test_without_a_process_group_every_rank_stops_at_the_manifest_minimum(uniform_shards):
    # 20 frames in 7 shards of ≤ 3 over 2 ranks: shards are dealt whole (11 and 9 samples)
    assert len(set(_counts(uniform_shards, 2))) > 1
    equal = _counts(uniform_shards, 2, equal_batches=True)
    stream = ShardStream(uniform_shards, "train", 3, CUTOFF, rank=0, world_size=2)
    assert equal == [min(stream.batches_per_rank())] * 2


def test_resumed_epoch_keeps_the_ranks_equal(uniform_shards):
    full = _counts(uniform_shards, 2, equal_batches=True)[0]
    states, left = [], []
    for rank in range(2):
        s = ShardStream(uniform_shards, "train", 3, CUTOFF, rank=rank, world_size=2, equal_batches=True)
        it = iter(s)
        next(it)
        states.append(s.state_dict())
    for rank in range(2):
        s = ShardStream(uniform_shards, "train", 3, CUTOFF, rank=rank, world_size=2, equal_batches=True)
        s.load_state_dict(states[rank])
        left.append(sum(1 for _ in s))
    assert left == [full - 1, full - 1]


def test_mixed_sizes_need_a_process_group(mixed_shards):
    stream = ShardStream(mixed_shards, "train", 5, CUTOFF, rank=0, world_size=2, max_atoms=40, equal_batches=True)
    with pytest.raises(ValueError, match="initialise the process group"):
        list(stream)


def _rank_main(rank: int, world_size: int, port: int, shard_dir: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        counts = {}
        for equal in (False, True):
            stream = ShardStream(shard_dir, "train", 5, CUTOFF, rank=rank, world_size=world_size,
                                 max_atoms=40, shuffle_buffer=4, equal_batches=equal, agree=agree)
            counts[equal] = sum(1 for _ in stream)
            if equal:
                dist.barrier()   # would hang, not pass, if a rank were still inside the lockstep
        results[rank] = counts
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_lockstep_over_a_real_gloo_group_with_an_atom_budget(mixed_shards):
    port = free_port()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(2, port, str(mixed_shards), results), nprocs=2, join=True)
        counts = dict(results)
    plain = [counts[r][False] for r in range(2)]
    equal = [counts[r][True] for r in range(2)]
    assert plain[0] != plain[1]                    # 9 shards of mixed sizes: the ranks differ
    assert equal[0] == equal[1] == min(plain)
