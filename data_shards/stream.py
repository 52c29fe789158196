"""WebDataset pipeline over one split of a manifest → batched radius graphs (torch_geometric `Batch`).

Work is divided into slots = rank × DataLoader worker (rank-major). With at least as many shards as
slots, whole shards are dealt out (rank first, then worker); with fewer, every slot reads every shard
and keeps sample i when i mod n_slots == its slot. Either way each sample of the split (or of its first
`limit` samples, in manifest order) is seen exactly once per epoch across all ranks and workers.
Decoding, the transform, the neighbour list and batching all run inside the worker.

Each slot's sample order is a pure function of (manifest, seed, epoch, slot), so a stream resumes
mid-epoch by replaying its slots' raw (undecoded) samples and skipping the ones already handed out.
Resume rule when the layout (world_size × num_workers) changes: the old slots' unseen samples, taken
old slot by old slot in slot order, each in its own order, form the remainder; new slot s takes the
remainder's items i with i mod new_n_slots == s. Nothing is materialised: every new slot re-reads the
shards of the resumed epoch once. Later epochs use the new layout from the start.

The deal of raw samples to slots is data_shards.stream_slots; this module decodes, batches and counts them.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch_geometric.data import Batch

from data_shards import equal_batches, integrity
from data_shards import keys as K
from data_shards.batching import batch_by_budget
from data_shards.graph import collate, sample_to_data
from data_shards.manifest import load_stream_manifest
from data_shards.sample import decode_sample
from data_shards.stream_slots import (
    ShardChecksumError,
    StreamConfig,
    layout_slot_samples,
    plan_work,
    slot_sample_count,
)
from data_shards.stream_state import STATE_VERSION, Layout, merge_stream_states
from data_shards.transport import NumpyBatch

__all__ = ["Layout", "STATE_VERSION", "ShardChecksumError", "ShardStream", "StreamConfig", "merge_stream_states",
           "plan_work"]

Transform = Callable[[dict, int], dict]


class _SlotDataset(IterableDataset):
    """One epoch of one rank; yields (slot, Batch). Inside a DataLoader worker it serves that worker's slot."""

    def __init__(self, work, cfg: StreamConfig, epoch: int, transform: Transform | None, dtype: torch.dtype,
                 layout: Layout, skip: dict[int, int]):
        super().__init__()
        self.work, self.cfg, self.epoch, self.transform, self.dtype = work, cfg, epoch, transform, dtype
        self.layout, self.skip = layout, skip

    def _checked(self, raw: Iterator[dict]) -> Iterator[dict]:
        """Samples passing their checksum; skipped ones ride on the next batch (`integrity_skipped`)."""
        for sample in raw:
            if integrity.check_sample(sample, self.cfg.integrity):
                yield sample
            else:
                self.skipped += 1

    def _to_graph(self, raw: dict):
        sample = decode_sample(raw)
        if self.transform is not None:
            sample = self.transform(sample, self.epoch)
        data = sample_to_data(sample, self.cfg.cutoff, self.dtype)
        data[K.SAMPLE_KEY] = sample[K.SAMPLE_KEY]
        data[K.SOURCE] = sample[K.SOURCE]
        data[K.FRAME_INDEX] = torch.tensor([sample[K.FRAME_INDEX]], dtype=torch.long)
        return data

    def __iter__(self) -> Iterator[tuple[int, Batch]]:
        info = get_worker_info()
        slot = self.cfg.rank * self.cfg.workers_per_rank + (info.id if info is not None else 0)
        raw = layout_slot_samples(self.work, self.cfg, self.epoch, self.layout, slot)
        raw = itertools.islice(raw, self.skip.get(slot, 0), None)
        self.skipped = 0
        groups = batch_by_budget(map(self._to_graph, self._checked(raw)), self.cfg.batch_size, self.cfg.max_atoms,
                                 self.cfg.drop_last)
        if info is None:
            return ((slot, self._counted(collate(g))) for g in groups)
        return ((slot, NumpyBatch(self._counted(collate(g)))) for g in groups)   # cheap to send to the main process

    def _counted(self, batch: Batch) -> Batch:
        batch.integrity_skipped, self.skipped = self.skipped, 0
        return batch


def _pass_through(batch):
    return batch


def _unwrap(pairs):
    for slot, packed in pairs:
        yield slot, packed.batch


class ShardStream:
    """Iterable of torch_geometric `Batch`es over one split; call `set_epoch` before each epoch.

    Batches carry the keys.* arrays plus `.batch`, and the non-tensor lists `batch.key` (SAMPLE_KEY) and
    `batch.source` (SOURCE), and `batch.frame_index` (FRAME_INDEX, a tensor).

    `manifest_dir`: a folder, a manifest file or an http(s) URL; `base_url` overrides where shards are read
    (http(s) prefix, folder, or a template such as `pipe:cat /data/{name}`). `max_atoms` also closes a batch
    before its atom total would exceed the budget. `verify` ("off" | "skip" | "fatal") checks each shard's
    sha256 before its samples are used; `integrity_policy` (fatal | skip | off, default $MASKPOT_INTEGRITY or
    fatal) checks every sample's checksum (data_shards.integrity). `state_dict()` / `load_state_dict()` resume
    mid-epoch exactly. `equal_batches` ends every rank's epoch at the same batch count (data_shards.equal_batches):
    in lockstep through `agree` (a collective "true on every rank?", e.g. pretrain.distributed.agree) when given.
    """

    def __init__(self, manifest_dir, split: str, batch_size: int, cutoff: float, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, shuffle_buffer: int = 0, seed: int = 0,
                 transform: Transform | None = None, dtype: torch.dtype = torch.float32,
                 limit: int | None = None, drop_last: bool = False, max_atoms: int | None = None,
                 verify: str = "off", base_url: str | None = None, equal_batches: bool = False,
                 agree: Callable[[bool], bool] | None = None,
                 integrity_policy: str | None = None):
        self.cfg = StreamConfig(split, batch_size, cutoff, rank, world_size, num_workers, shuffle_buffer, seed,
                                limit, drop_last, max_atoms, verify, equal_batches, integrity.policy(integrity_policy))
        self.integrity_skipped = 0   # samples left out by integrity="skip" (bad checksum), over this stream's life
        self.manifest = load_stream_manifest(manifest_dir, base_url)
        self.work = plan_work(self.manifest, split, limit)
        self.transform, self.dtype, self.epoch, self.agree = transform, dtype, 0, agree
        self._fresh_layout = Layout(world_size, num_workers)
        self._layout = self._fresh_layout                       # layout of this epoch
        self._offsets: dict[int, int] = {}                       # samples skipped per slot
        self._consumed: dict[int, int] = {}                      # handed out per slot by the current iteration

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning; a loaded state for this same epoch is kept (resume)."""
        if int(epoch) != self.epoch:
            self._layout, self._offsets = self._fresh_layout, {}
        self.epoch = int(epoch)
        self._consumed = {}

    def _rank_slots(self) -> range:
        first = self.cfg.rank * self.cfg.workers_per_rank
        return range(first, first + self.cfg.workers_per_rank)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per full epoch (before drop_last)."""
        return sum(slot_sample_count(self.work, self.cfg, s) for s in self._rank_slots())

    @property
    def num_batches(self) -> int:
        """Batches this rank yields per full epoch (each worker batches its own samples)."""
        return self.batches_per_rank()[self.cfg.rank]

    @property
    def batch_counts_exact(self) -> bool:
        """False when max_atoms is set and structures differ in size: batch counts are then upper bounds."""
        if self.cfg.max_atoms is None:
            return True
        per_sample = {w.atoms / w.samples for w in self.work if w.samples}
        return len(per_sample) <= 1 and all(float(a).is_integer() for a in per_sample)

    def _graphs_per_batch(self) -> int:
        if self.cfg.max_atoms is None or not self.batch_counts_exact or not self.work:
            return self.cfg.batch_size
        natoms = int(self.work[0].atoms // self.work[0].samples)
        return max(1, min(self.cfg.batch_size, self.cfg.max_atoms // max(natoms, 1)))

    def batches_per_rank(self) -> list[int]:
        """Batches every rank yields per full epoch, from the manifest alone (no communication): ranks can
        differ when whole shards are dealt out, so a DDP loop should stop each epoch at min() of this list.
        With max_atoms and mixed structure sizes the counts are upper bounds (one batch per structure)."""
        if self.batch_counts_exact:
            rounding, size = (math.floor if self.cfg.drop_last else math.ceil), self._graphs_per_batch()
            per_slot = [rounding(slot_sample_count(self.work, self.cfg, s) / size) for s in range(self.cfg.n_slots)]
        else:
            per_slot = [slot_sample_count(self.work, self.cfg, s) for s in range(self.cfg.n_slots)]
        w = self.cfg.workers_per_rank
        return [sum(per_slot[r * w:(r + 1) * w]) for r in range(self.cfg.world_size)]

    def state_dict(self) -> dict:
        """Json-able position of this rank in the current epoch: samples handed out per slot
        (slot = rank × workers + worker) since the epoch's start, plus what fixes the epoch's order."""
        consumed = {s: self._offsets.get(s, 0) + self._consumed.get(s, 0) for s in self._rank_slots()}
        return {"version": STATE_VERSION, "split": self.cfg.split, "epoch": self.epoch, "seed": self.cfg.seed,
                "shuffle_buffer": self.cfg.shuffle_buffer, "limit": self.cfg.limit,
                **self._layout.to_json(consumed)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` at the next iteration: with the same layout each slot skips what it handed
        out; with another world size / worker count (pass `merge_stream_states` of all ranks) the unseen
        remainder is re-dealt over the new slots (rule in the module docstring)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')!r} is not supported "
                             f"(expected {STATE_VERSION})")
        for name in ("split", "seed", "shuffle_buffer", "limit"):
            if state[name] != getattr(self.cfg, name):
                raise ValueError(f"stream state has {name}={state[name]!r} but this stream has "
                                 f"{getattr(self.cfg, name)!r}; the sample order would differ")
        layout, consumed = Layout.from_json(state)
        self.epoch, self._consumed = int(state["epoch"]), {}
        if (layout.world_size, layout.num_workers) == (self.cfg.world_size, self.cfg.num_workers):
            missing = [s for s in self._rank_slots() if s not in consumed]
            if missing:
                raise ValueError(f"stream state lacks slot(s) {missing} of rank {self.cfg.rank}: load the state "
                                 f"saved by this rank, or merge_stream_states of all ranks")
            self._layout, self._offsets = layout, {s: consumed[s] for s in self._rank_slots()}
            return
        if sorted(consumed) != list(range(layout.n_slots)):
            raise ValueError(f"the world size or worker count changed ({layout.world_size}×{layout.num_workers} → "
                             f"{self.cfg.world_size}×{self.cfg.num_workers}): load merge_stream_states of all "
                             f"ranks' states, this one covers slots {sorted(consumed)} only")
        self._layout = Layout(self.cfg.world_size, self.cfg.num_workers, layout,
                              tuple(consumed[s] for s in range(layout.n_slots)))
        self._offsets = {}

    def __iter__(self) -> Iterator[Batch]:
        self._consumed = {}
        dataset = _SlotDataset(self.work, self.cfg, self.epoch, self.transform, self.dtype, self._layout,
                               dict(self._offsets))
        if self.cfg.num_workers == 0:
            pairs = iter(dataset)
        else:
            pairs = _unwrap(DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers,
                                       collate_fn=_pass_through, persistent_workers=False))
        if not self.cfg.equal_batches or self.cfg.world_size == 1:
            return self._count(pairs)
        if self.agree is not None:
            return self._count(equal_batches.lockstep(pairs, self.agree))
        return self._count(equal_batches.at_most(pairs, self._remaining_batches(), self.batch_counts_exact))

    def _remaining_batches(self) -> list[int]:
        """Without a process group: every rank's batches left in this epoch, the same on all ranks (they all
        stopped at the same count); a resumed epoch has handed out ceil(offset / batch) per slot already."""
        if self._layout.n_slots != self.cfg.n_slots:
            raise ValueError("equal_batches across a change of world size or workers needs the lockstep: "
                             "launch with torchrun and pass agree=pretrain.distributed.agree")
        size = self._graphs_per_batch()
        done = sum(math.ceil(self._offsets.get(s, 0) / size) for s in self._rank_slots())
        return [max(0, n - done) for n in (min(self.batches_per_rank()),)]

    def _count(self, pairs: Iterator[tuple[int, Batch]]) -> Iterator[Batch]:
        for slot, batch in pairs:
            skipped = int(getattr(batch, "integrity_skipped", 0))
            self.integrity_skipped += skipped
            self._consumed[slot] = self._consumed.get(slot, 0) + batch.num_graphs + skipped
            yield batch
