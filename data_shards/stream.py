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
"""
from __future__ import annotations

import hashlib
import io
import itertools
import logging
import math
import random
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch_geometric.data import Batch
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_shards import equal_batches, integrity
from data_shards import keys as K
from data_shards.batching import batch_by_budget
from data_shards.graph import collate, sample_to_data
from data_shards.manifest import (
    MANIFEST_DIR,
    SPLITS,
    load_stream_manifest,
    open_location,
    shard_entries,
    shard_url,
)
from data_shards.sample import decode_sample
from data_shards.stream_state import STATE_VERSION, Layout, merge_stream_states
from data_shards.transport import NumpyBatch

__all__ = ["Layout", "STATE_VERSION", "ShardChecksumError", "ShardStream", "StreamConfig", "merge_stream_states",
           "plan_work"]

Transform = Callable[[dict, int], dict]
VERIFY_MODES = ("off", "skip", "fatal")
log = logging.getLogger(__name__)


class ShardChecksumError(ValueError):
    """A shard's bytes do not match the manifest's sha256 (verify="fatal")."""


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
    max_atoms: int | None = None
    verify: str = "off"
    equal_batches: bool = False
    integrity: str = integrity.DEFAULT_POLICY   # per-sample checksums: fatal | skip | off (data_shards.integrity)

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
        if self.max_atoms is not None and self.max_atoms < 1:
            raise ValueError(f"max_atoms must be >= 1 (atoms per batch) or None (no budget), got {self.max_atoms}")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"unknown verify mode {self.verify!r}; valid modes: {list(VERIFY_MODES)}")
        integrity.policy(self.integrity)

    @property
    def workers_per_rank(self) -> int:
        return max(self.num_workers, 1)

    @property
    def n_slots(self) -> int:
        return self.world_size * self.workers_per_rank


@dataclass(frozen=True)
class ShardWork:
    path: str     # local path or URL (http(s)://…, pipe:…)
    offset: int   # index in the split (manifest order) of the shard's first sample
    take: int     # samples of this shard in use (fewer than it holds when `limit` cuts into it)
    name: str = ""
    sha256: str = ""
    atoms: int = 0
    samples: int = 0


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
        work.append(ShardWork(shard_url(manifest[MANIFEST_DIR], e["name"]), offset, take, e["name"],
                              e.get("sha256", ""), int(e.get("atoms", 0)), int(e["samples"])))
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


def _open_shards(shards: Iterator[dict], by_url: dict[str, ShardWork], verify: str) -> Iterator[dict]:
    """{"url"} → {"url", "stream"}. With verify on, the whole shard is read and hashed before any of its
    samples are yielded (one shard in memory per worker), so a corrupted shard never leaks samples."""
    for item in shards:
        url = item["url"]
        if verify == "off":
            stream = open_location(url)
            try:
                yield {"url": url, "stream": stream}
            finally:
                stream.close()
            continue
        with open_location(url) as f:
            data = f.read()
        w = by_url[url]
        digest = hashlib.sha256(data).hexdigest()
        if digest == w.sha256:
            yield {"url": url, "stream": io.BytesIO(data)}
            continue
        message = (f"shard {w.name} ({url}): sha256 {digest[:16]}… does not match the manifest's "
                   f"{w.sha256[:16]}… ({len(data)} bytes read)")
        if verify == "fatal":
            raise ShardChecksumError(message)
        warnings.warn(message + "; shard skipped", RuntimeWarning, stacklevel=2)
        log.warning("%s; shard skipped", message)


def _select(samples: Iterator[dict], mine: list[ShardWork], whole: bool, n_slots: int,
            slot: int) -> Iterator[dict]:
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
        if whole or index % n_slots == slot:
            yield sample


def raw_slot_samples(work: list[ShardWork], cfg: StreamConfig, epoch: int, slot: int) -> Iterator[dict]:
    """Undecoded samples of one slot of a fresh epoch, in the order that slot yields them."""
    mine, whole = _slot_assignment(work, cfg, slot)
    if not mine:
        return iter(())
    rng = random.Random(f"{cfg.seed}:{epoch}:{slot}")
    stages = []
    if cfg.shuffle_buffer:
        mine = list(mine)
        rng.shuffle(mine)
        stages.append(wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=rng))
    by_url = {w.path: w for w in mine}
    return iter(wds.DataPipeline(
        wds.SimpleShardList([w.path for w in mine]),
        lambda shards: _open_shards(shards, by_url, cfg.verify),
        lambda streams: tar_file_expander(streams, handler=integrity.shard_read_error),
        integrity.checked_members, group_by_keys,
        lambda samples: _select(samples, mine, whole, cfg.n_slots, slot),
        *stages,
    ))


def layout_slot_samples(work: list[ShardWork], cfg: StreamConfig, epoch: int, layout: Layout,
                        slot: int) -> Iterator[dict]:
    """Raw samples of `slot` under `layout`: a fresh deal, or a re-deal of the parent layout's remainder."""
    if layout.parent is None:
        fresh = StreamConfig(**{**cfg.__dict__, "rank": 0, "world_size": layout.world_size,
                                "num_workers": layout.num_workers})
        return raw_slot_samples(work, fresh, epoch, slot)
    remainder = itertools.chain.from_iterable(
        itertools.islice(layout_slot_samples(work, cfg, epoch, layout.parent, old), done, None)
        for old, done in enumerate(layout.parent_consumed))
    return itertools.islice(remainder, slot, None, layout.n_slots)


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
        self._layout, self._offsets = self._fresh_layout, {}   # layout of this epoch, samples skipped per slot
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
