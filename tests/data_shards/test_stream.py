"""ShardStream: exactly-once delivery over ranks × workers, graphs, shuffling, transform, limit, drop_last."""
from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from data_shards import keys as K
from data_shards.build import build_shards
from data_shards.graph import neighbour_list
from data_shards.manifest import load_manifest, shard_paths
from data_shards.sample import decode_sample
from data_shards.stream import ShardStream
from tests.helpers.water_systems import water_atoms

CUTOFF = 3.0
N_FRAMES = 30


def split_samples(shard_dir: Path, split: str = "train") -> list[dict]:
    """Decoded samples of a split in manifest order, read straight from the tars."""
    out = []
    for path in shard_paths(load_manifest(shard_dir), split):
        members: dict[str, dict] = {}
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
        out += [decode_sample(s) for s in members.values()]
    return out


@pytest.fixture(scope="module")
def xyz(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("frames") / "water.xyz"
    ase.io.write(path, water_atoms(N_FRAMES, seed=11), format="extxyz")
    return str(path)


@pytest.fixture(scope="module")
def many_shards(xyz, tmp_path_factory) -> Path:
    """30 frames, all train, 3 per shard: 10 shards (more than 2 ranks × 2 workers)."""
    out = tmp_path_factory.mktemp("many")
    build_shards([f"train={xyz}"], out, shard_size=3, use_ray=False, progress=False)
    return out


@pytest.fixture(scope="module")
def few_shards(xyz, tmp_path_factory) -> Path:
    """30 frames in 2 shards: fewer shards than slots, so samples are dealt by index."""
    out = tmp_path_factory.mktemp("few")
    build_shards([f"train={xyz}"], out, shard_size=16, use_ray=False, progress=False)
    return out


def epoch_keys(shard_dir, world_size=1, num_workers=0, epoch=0, **kw) -> list[list[str]]:
    """Keys per rank, in the order each rank's stream yields them."""
    per_rank = []
    for rank in range(world_size):
        stream = ShardStream(shard_dir, "train", 4, CUTOFF, rank=rank, world_size=world_size,
                             num_workers=num_workers, **kw)
        stream.set_epoch(epoch)
        keys = []
        for batch in stream:
            assert isinstance(batch, Batch) and len(batch.key) == batch.num_graphs
            keys += batch.key
        assert len(keys) == stream.num_samples
        per_rank.append(keys)
    return per_rank


@pytest.mark.parametrize("layout", ["many_shards", "few_shards"])
@pytest.mark.parametrize("world_size,num_workers", [(2, 2), (1, 0), (3, 1)])
def test_every_sample_exactly_once_per_epoch(request, layout, world_size, num_workers):
    shard_dir = request.getfixturevalue(layout)
    per_rank = epoch_keys(shard_dir, world_size, num_workers, shuffle_buffer=8, seed=3)
    expected = Counter(s[K.SAMPLE_KEY] for s in split_samples(shard_dir))
    assert len(expected) == N_FRAMES
    assert Counter(k for keys in per_rank for k in keys) == expected
    assert all(keys for keys in per_rank)


def test_limit_uses_first_samples_in_manifest_order(many_shards, few_shards):
    for shard_dir in (many_shards, few_shards):
        first = [s[K.SAMPLE_KEY] for s in split_samples(shard_dir)][:7]
        per_rank = epoch_keys(shard_dir, 2, 2, limit=7, shuffle_buffer=4)
        assert sorted(k for keys in per_rank for k in keys) == sorted(first)
    with pytest.raises(ValueError, match="limit 31 exceeds the 30 samples"):
        ShardStream(many_shards, "train", 4, CUTOFF, limit=31)


def test_batches_hold_correct_radius_graphs(many_shards):
    by_key = {s[K.SAMPLE_KEY]: s for s in split_samples(many_shards)}
    graphs = 0
    for batch in ShardStream(many_shards, "train", 4, CUTOFF, num_workers=2):
        assert batch[K.POSITIONS].dtype == torch.float32 and batch[K.ENERGY].dtype == torch.float64
        src, dst = batch.edge_index
        assert torch.equal(batch.batch[src], batch.batch[dst])
        for g, key in enumerate(batch.key):
            sample = by_key[key]
            atoms = (batch.batch == g).nonzero().flatten()
            np.testing.assert_array_equal(batch[K.POSITIONS][atoms].numpy(), sample[K.POSITIONS])
            np.testing.assert_array_equal(batch[K.SPECIES][atoms].numpy(), sample[K.SPECIES])
            assert batch[K.ENERGY][g].item() == sample[K.ENERGY]
            edges, shifts = neighbour_list(sample[K.POSITIONS], sample[K.CELL], sample[K.PBC], CUTOFF)
            in_graph = batch.batch[src] == g
            assert int(in_graph.sum()) == edges.shape[1] > 0
            local = batch.edge_index[:, in_graph] - atoms[0]
            pos = batch[K.POSITIONS].double()
            r = pos[batch.edge_index[1, in_graph]] - pos[batch.edge_index[0, in_graph]] \
                + batch[K.SHIFT_VECTORS][in_graph].double()
            assert r.norm(dim=1).max() < CUTOFF
            assert sorted(map(tuple, local.T.tolist())) == sorted(map(tuple, edges.T.tolist()))
            graphs += 1
    assert graphs == N_FRAMES


def test_shuffle_is_reproducible_per_epoch_and_changes_between_epochs(many_shards):
    kw = dict(world_size=2, num_workers=2, shuffle_buffer=8, seed=5)
    epoch0 = epoch_keys(many_shards, epoch=0, **kw)
    assert epoch_keys(many_shards, epoch=0, **kw) == epoch0
    epoch1 = epoch_keys(many_shards, epoch=1, **kw)
    assert epoch1 != epoch0
    assert [sorted(k) for k in epoch1] == [sorted(k) for k in epoch0]  # same shards per rank, new order
    assert epoch_keys(many_shards, epoch=0, **{**kw, "seed": 6}) != epoch0
    unshuffled = epoch_keys(many_shards, world_size=1)
    assert unshuffled[0] == [s[K.SAMPLE_KEY] for s in split_samples(many_shards)]


class DropLastWater:
    """Deletes the last molecule and tags every atom with the epoch: runs before the graph is built."""

    def __call__(self, sample: dict, epoch: int) -> dict:
        out = dict(sample)
        for field in (K.SPECIES, K.POSITIONS, K.FORCES):
            out[field] = sample[field][:-3]
        out[K.NOISE_TARGET] = np.full((len(out[K.SPECIES]), 3), float(epoch), dtype=np.float32)
        return out


def test_transform_runs_on_each_sample_before_graph_building(many_shards):
    by_key = {s[K.SAMPLE_KEY]: s for s in split_samples(many_shards)}
    stream = ShardStream(many_shards, "train", 5, CUTOFF, num_workers=2, transform=DropLastWater())
    stream.set_epoch(7)
    seen = 0
    for batch in stream:
        assert torch.all(batch[K.NOISE_TARGET] == 7.0)
        for g, key in enumerate(batch.key):
            sample = by_key[key]
            assert int(batch[K.NATOMS][g]) == len(sample[K.SPECIES]) - 3
            edges, _ = neighbour_list(sample[K.POSITIONS][:-3], sample[K.CELL], sample[K.PBC], CUTOFF)
            assert int((batch.batch[batch.edge_index[0]] == g).sum()) == edges.shape[1]
            seen += 1
    assert seen == N_FRAMES


def test_drop_last_and_batch_counts(many_shards):
    for drop_last in (False, True):
        stream = ShardStream(many_shards, "train", 4, CUTOFF, num_workers=2, drop_last=drop_last)
        sizes = [b.num_graphs for b in stream]
        assert len(sizes) == stream.num_batches
        assert all(s == 4 for s in sizes) if drop_last else sum(sizes) == N_FRAMES
    ranks = [ShardStream(many_shards, "train", 4, CUTOFF, rank=r, world_size=2, num_workers=2) for r in (0, 1)]
    assert [sum(1 for _ in s) for s in ranks] == ranks[0].batches_per_rank() == ranks[1].batches_per_rank()


def test_bad_stream_arguments_are_user_errors(many_shards):
    with pytest.raises(ValueError, match="valid splits"):
        ShardStream(many_shards, "training", 4, CUTOFF)
    with pytest.raises(ValueError, match="rank"):
        ShardStream(many_shards, "train", 4, CUTOFF, rank=2, world_size=2)
    assert ShardStream(many_shards, "val", 4, CUTOFF).num_samples == 0
    assert list(ShardStream(many_shards, "val", 4, CUTOFF)) == []


def test_stream_delivers_every_dft_water_frame_as_a_graph(shared_data, tmp_path):
    """64-water DFT frames (192 atoms) at the EGNN cutoff through 2 workers: each frame exactly once, whole, with
    its neighbour graph (the loader's throughput is measured in benchmarks/bench_data.py, not asserted here)."""
    root = shared_data / "water_deepmd" / "data"
    build_shards([f"val={root / 'data_2'}"], tmp_path, shard_size=20, use_ray=False, progress=False)
    stream = ShardStream(tmp_path, "val", 16, 3.5, num_workers=2, shuffle_buffer=32)
    batches = list(stream)
    keys = [k for b in batches for k in b.key]
    assert len(keys) == len(set(keys)) == 80
    assert all(b.num_nodes == 192 * b.num_graphs for b in batches)
    assert all(b.edge_index.shape[1] > 0 for b in batches)
