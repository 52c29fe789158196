"""Several shard sets in one pretraining stream (`data.sets: [{manifest_dir, weight}]`).

Each set keeps its own stream (its own manifest, statistics, shuffle and epochs: `LockstepBatches`);
batch b comes from set k drawn with probability weight_k / Σ weights by a generator seeded with
(train.seed, b), the same on every rank. The resume state is the number of draws plus each set's
(epoch, batches consumed), kept in the checkpoint's TrainState.sets, so a resumed run continues with
exactly the batches an uninterrupted one would have drawn.

Checked before any work (one line naming the setting, exit 2): every set's manifest has the same
schema_version and the same build stats_cutoff, and each set can serve the objective (a masking
objective needs H in every set; 'supervised' is refused for several sets: their energy zeros differ).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from data_shards.manifest import load_manifest
from pretrain.pretext import SELF_SUPERVISED

MIX_SEED_TAG = 7_919          # separates the set draws from every other use of train.seed


@dataclasses.dataclass(frozen=True)
class ShardSet:
    manifest_dir: str
    weight: float
    manifest: dict


def load_sets(cfg) -> list[ShardSet]:
    """The configured sets (or the single data.manifest_dir) with their manifests, checked for compatibility."""
    entries = cfg.data.sets or [{"manifest_dir": cfg.data.manifest_dir, "weight": 1.0}]
    sets = [ShardSet(str(e["manifest_dir"]), float(e.get("weight", 1.0)), load_manifest(e["manifest_dir"]))
            for e in entries]
    if len(sets) > 1:
        check_compatible(sets)
        if cfg.objective.task.needs_labels:
            raise ValueError(f"data.sets: objective.kind {cfg.objective.kind!r} mixes energies of several sets, "
                             f"whose energy zeros differ; use a self-supervised kind {list(SELF_SUPERVISED)}")
    return sets


def _stats_cutoff(manifest: dict):
    return (manifest.get("build") or {}).get("stats_cutoff", (manifest.get("structure") or {}).get("cutoff"))


def check_compatible(sets: list[ShardSet]) -> None:
    first = sets[0]
    for i, s in enumerate(sets[1:], start=1):
        for name, get in (("schema_version", lambda m: m.get("schema_version")), ("stats_cutoff", _stats_cutoff)):
            a, b = get(first.manifest), get(s.manifest)
            if a != b:
                raise ValueError(f"data.sets[{i}].manifest_dir {s.manifest_dir}: manifest {name} {b!r} differs from "
                                 f"data.sets[0]'s ({first.manifest_dir}) {a!r}; rebuild the shards with the same "
                                 f"maskpot version and --stats-cutoff")


def check_objective_per_set(cfg, sets: list[ShardSet], check) -> None:
    """`check(cfg, manifest)` (pretrain.loop.check_objective_fits_data) for every set, naming the set."""
    for s in sets:
        one = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest_dir=s.manifest_dir, sets=[]))
        check(one, s.manifest)


def sets_sha256(sets: list[ShardSet]) -> str:
    """One set: its manifest.json's sha256 (as before); several: sha256 over theirs and the weights."""
    hashes = [hashlib.sha256((Path(s.manifest_dir) / "manifest.json").read_bytes()).hexdigest() for s in sets]
    if len(sets) == 1:
        return hashes[0]
    blob = ";".join(f"{h}:{s.weight!r}" for h, s in zip(hashes, sets))
    return hashlib.sha256(blob.encode()).hexdigest()


class MixedBatches:
    """`LockstepBatches`-like: one batch per `next()` from the set drawn for that batch."""

    def __init__(self, streams: list, weights: list[float], seed: int, draws: int = 0):
        self.streams, self.draws, self.seed = streams, draws, seed
        total = float(sum(weights))
        self.p = np.array([w / total for w in weights])
        self.counts = [0] * len(streams)

    def choice(self, draw: int) -> int:
        return int(np.random.default_rng([MIX_SEED_TAG, self.seed, draw]).choice(len(self.p), p=self.p))

    def next(self):
        k = self.choice(self.draws)
        batch = self.streams[k].next()
        self.draws += 1
        self.counts[k] += 1
        return batch

    def position(self) -> tuple[int, int]:
        return 0, self.draws

    def sets_state(self) -> list[list[int]]:
        return [list(s.position()) for s in self.streams]

    def close(self) -> None:
        for s in self.streams:
            s.close()


def make_batches(cfg, sets: list[ShardSet], rank: int, world_size: int, state, lockstep_cls, make_stream):
    """LockstepBatches over the one set, or MixedBatches over several, positioned at `state`."""
    if len(sets) == 1:
        return lockstep_cls(make_stream(cfg, cfg.data.train_split, rank, world_size),
                            state.epoch, state.batches_in_epoch)
    positions = state.sets or [[0, 0]] * len(sets)
    if len(positions) != len(sets):
        raise ValueError(f"data.sets: the checkpoint holds stream positions of {len(positions)} sets, the config "
                         f"names {len(sets)}")
    streams = []
    for k, s in enumerate(sets):
        one = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest_dir=s.manifest_dir, sets=[]))
        stream = make_stream(one, cfg.data.train_split, rank, world_size, seed=cfg.train.seed + k)
        streams.append(lockstep_cls(stream, *positions[k]))
    return MixedBatches(streams, [s.weight for s in sets], cfg.train.seed, state.batches_in_epoch)
