"""Which raw samples each slot of a stream reads, in which order (see data_shards.stream for the rules).

A slot is rank × DataLoader worker (rank-major). `plan_work` cuts a manifest split into `ShardWork`;
`raw_slot_samples` deals it to one slot of a fresh epoch (whole shards, or every n-th sample when shards are
fewer than slots), `layout_slot_samples` re-deals a resumed epoch's remainder after a layout change. Shards are
opened here, their sha256 checked when `verify` asks for it (`ShardChecksumError`).
"""
from __future__ import annotations

import hashlib
import io
import itertools
import logging
import random
import warnings
from dataclasses import dataclass
from typing import Iterator

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_shards import integrity
from data_shards.manifest import MANIFEST_DIR, SPLITS, open_location, shard_entries, shard_url
from data_shards.stream_state import Layout

log = logging.getLogger(__name__)
VERIFY_MODES = ("off", "skip", "fatal")


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
    url, position = "", 0
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
