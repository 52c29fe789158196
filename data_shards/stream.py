"""WebDataset pipeline over one split of a manifest → batched radius graphs (torch_geometric `Batch`).

Work is divided into slots = rank × DataLoader worker (rank-major). With at least as many shards as
slots, whole shards are dealt out (rank first, then worker); with fewer, every slot reads every shard
and keeps sample i when i mod n_slots == its slot. Either way each sample of the split (or of its first
`limit` samples, in manifest order) is seen exactly once per epoch across all ranks and workers.
Decoding, the transform, the neighbour list and batching all run inside the worker.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch_geometric.data import Batch

from data_shards import keys as K
from data_shards.graph import collate, sample_to_data
from data_shards.manifest import MANIFEST_DIR, SPLITS, load_manifest, shard_entries
from data_shards.sample import decode_sample

Transform = Callable[[dict, int], dict]


@dataclass(frozen=True)
class StreamConfig:
    split: str
    batch_size: int
    cutoff: float
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    shuffle_buffer: int = 0
    seed: int = 0
    limit: int | None = None
    drop_last: bool = False

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; valid splits: {list(SPLITS)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (structures per batch), got {self.batch_size}")
        if not self.cutoff > 0:
            raise ValueError(f"cutoff must be > 0 Å, got {self.cutoff}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank} world_size={self.world_size}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError(f"num_workers and shuffle_buffer must be >= 0, got {self.num_workers}, "
                             f"{self.shuffle_buffer}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0 samples or None (the whole split), got {self.limit}")

    @property
    def workers_per_rank(self) -> int:
        return max(self.num_workers, 1)

    @property
    def n_slots(self) -> int:
        return self.world_size * self.workers_per_rank


@dataclass(frozen=True)
class ShardWork:
    path: str
    offset: int   # index in the split (manifest order) of the shard's first sample
    take: int     # samples of this shard in use (fewer than it holds when `limit` cuts into it)


def plan_work(manifest: dict, split: str, limit: int | None) -> list[ShardWork]:
    """The split's shards in manifest order, cut after the first `limit` samples."""
    entries = shard_entries(manifest, split)
    total = sum(e["samples"] for e in entries)
    if limit is not None and limit > total:
        raise ValueError(f"limit {limit} exceeds the {total} samples of split {split!r} in "
                         f"{manifest[MANIFEST_DIR]}")
    budget = total if limit is None else limit
    work, offset = [], 0
    for e in entries:
        take = min(e["samples"], budget - offset)
        if take <= 0:
            break
        work.append(ShardWork(str(Path(manifest[MANIFEST_DIR]) / e["name"]), offset, take))
        offset += take
    return work


def _slot_assignment(work: list[ShardWork], cfg: StreamConfig, slot: int) -> tuple[list[ShardWork], bool]:
    """(shards this slot reads, whether it keeps every sample of them) for slot = rank * workers + worker."""
    if len(work) >= cfg.n_slots:
        rank, worker = divmod(slot, cfg.workers_per_rank)
        return work[rank::cfg.world_size][worker::cfg.workers_per_rank], True
    return work, False


def slot_sample_count(work: list[ShardWork], cfg: StreamConfig, slot: int) -> int:
    mine, whole = _slot_assignment(work, cfg, slot)
    if whole:
        return sum(w.take for w in mine)
    total = sum(w.take for w in work)
    return len(range(slot, total, cfg.n_slots))


class _SlotDataset(IterableDataset):
    """One epoch of one rank; inside a DataLoader worker it serves that worker's slot only."""

    def __init__(self, work: list[ShardWork], cfg: StreamConfig, epoch: int, transform: Transform | None,
                 dtype: torch.dtype):
        super().__init__()
        self.work, self.cfg, self.epoch, self.transform, self.dtype = work, cfg, epoch, transform, dtype

    def _select(self, samples: Iterator[dict], mine: list[ShardWork], whole: bool, slot: int) -> Iterator[dict]:
        """Keep the first `take` samples of each shard and, when sharing shards, every n_slots-th sample."""
        by_url = {w.path: w for w in mine}
        url, position = None, 0
        for sample in samples:
            if sample["__url__"] != url:
                url, position = sample["__url__"], 0
            w = by_url[url]
            index, position = w.offset + position, position + 1
            if position > w.take:
                continue
            if whole or index % self.cfg.n_slots == slot:
                yield sample

    def _to_graph(self, raw: dict):
        sample = decode_sample(raw)
        if self.transform is not None:
            sample = self.transform(sample, self.epoch)
        data = sample_to_data(sample, self.cfg.cutoff, self.dtype)
        data[K.SAMPLE_KEY] = sample[K.SAMPLE_KEY]
        data[K.SOURCE] = sample[K.SOURCE]
        data[K.FRAME_INDEX] = torch.tensor([sample[K.FRAME_INDEX]], dtype=torch.long)
        return data

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        slot = self.cfg.rank * self.cfg.workers_per_rank + (info.id if info is not None else 0)
        mine, whole = _slot_assignment(self.work, self.cfg, slot)
        if not mine:
            return iter(())
        rng = random.Random(f"{self.cfg.seed}:{self.epoch}:{slot}")
        stages = []
        if self.cfg.shuffle_buffer:
            mine = list(mine)
            rng.shuffle(mine)
            stages.append(wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng))
        pipeline = wds.DataPipeline(
            wds.SimpleShardList([w.path for w in mine]),
            wds.tarfile_to_samples(),
            lambda samples: self._select(samples, mine, whole, slot),
            *stages,
            wds.map(self._to_graph),
            wds.batched(self.cfg.batch_size, collation_fn=collate, partial=not self.cfg.drop_last),
        )
        return iter(pipeline)


def _pass_through(batch):
    return batch


class ShardStream:
    """Iterable of torch_geometric `Batch`es over one split; call `set_epoch` before each epoch.

    Batches carry the keys.* arrays plus `.batch`, and the non-tensor lists `batch.key` (SAMPLE_KEY) and
    `batch.source` (SOURCE), and `batch.frame_index` (FRAME_INDEX, a tensor).
    """

    def __init__(self, manifest_dir, split: str, batch_size: int, cutoff: float, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, shuffle_buffer: int = 0, seed: int = 0,
                 transform: Transform | None = None, dtype: torch.dtype = torch.float32,
                 limit: int | None = None, drop_last: bool = False):
        self.cfg = StreamConfig(split, batch_size, cutoff, rank, world_size, num_workers, shuffle_buffer, seed,
                                limit, drop_last)
        self.manifest = load_manifest(manifest_dir)
        self.work = plan_work(self.manifest, split, limit)
        self.transform, self.dtype, self.epoch = transform, dtype, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rank_slots(self) -> range:
        first = self.cfg.rank * self.cfg.workers_per_rank
        return range(first, first + self.cfg.workers_per_rank)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (before drop_last)."""
        return sum(slot_sample_count(self.work, self.cfg, s) for s in self._rank_slots())

    @property
    def num_batches(self) -> int:
        """Batches this rank yields per epoch (each worker batches its own samples)."""
        return self.batches_per_rank()[self.cfg.rank]

    def batches_per_rank(self) -> list[int]:
        """Batches every rank yields per epoch, from the manifest alone (no communication): ranks can differ
        when whole shards are dealt out, so a DDP loop should stop each epoch at min() of this list."""
        rounding = math.floor if self.cfg.drop_last else math.ceil
        per_slot = [rounding(slot_sample_count(self.work, self.cfg, s) / self.cfg.batch_size)
                    for s in range(self.cfg.n_slots)]
        w = self.cfg.workers_per_rank
        return [sum(per_slot[r * w:(r + 1) * w]) for r in range(self.cfg.world_size)]

    def __iter__(self) -> Iterator[Batch]:
        dataset = _SlotDataset(self.work, self.cfg, self.epoch, self.transform, self.dtype)
        if self.cfg.num_workers == 0:
            return iter(dataset)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers,
                            collate_fn=_pass_through, persistent_workers=False)
        return iter(loader)
