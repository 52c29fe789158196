"""Build-wide duplicate detection: kept once at the first occurrence, counted, deterministic and resumable."""
from __future__ import annotations

import filecmp
import json
from pathlib import Path

import ase.io
import pytest

from data_shards import keys as K
from data_shards.build import SIDECAR_SUFFIX, build_shards
from data_shards.manifest import shard_paths
from data_shards.stream import ShardStream
from tests.helpers.shards import assert_manifest_matches_disk, tar_samples
from tests.helpers.water_systems import water_atoms


def _write(path: Path, atoms) -> str:
    ase.io.write(path, atoms, format="extxyz")
    return str(path)


def _split_keys(manifest: dict, split: str) -> list[str]:
    return [s[K.SAMPLE_KEY] for p in shard_paths(manifest, split) for s in tar_samples(p)]


def _streamed_keys(out: Path, split: str) -> list[str]:
    keys = []
    for batch in ShardStream(out, split, batch_size=4, cutoff=3.0):
        keys += list(batch[K.SAMPLE_KEY])
    return keys


def _all_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_same_frames_in_two_inputs_are_counted_once_and_streamed_once(tmp_path):
    frames = water_atoms(10, seed=21)
    a = _write(tmp_path / "a.xyz", frames)
    extra = water_atoms(3, seed=22)
    b = _write(tmp_path / "b.xyz", [frames[2], extra[0], frames[7], extra[1], frames[2], extra[2]])
    out = tmp_path / "out"
    manifest = build_shards([f"train={a}", f"train={b}"], out, shard_size=3, use_ray=False, progress=False)
    assert_manifest_matches_disk(manifest)
    t = manifest["totals"]
    assert t == {"frames_read": 16, "samples_written": 13, "quarantined": 0, "duplicates": 3}
    assert t["frames_read"] == t["samples_written"] + t["quarantined"] + t["duplicates"]
    assert manifest["splits"]["train"]["samples"] == 13
    dup = manifest["duplicates"]
    assert dup["count"] == 3
    assert [(e["first"], e["again"]) for e in dup["examples"]] == [
        (f"{a}:2", f"{b}:0"), (f"{a}:7", f"{b}:2"), (f"{a}:2", f"{b}:4")]
    keys = _split_keys(manifest, "train")
    assert len(keys) == len(set(keys)) == 13
    streamed = _streamed_keys(out, "train")
    assert sorted(streamed) == sorted(keys)
    # the kept copy is the first one, from a.xyz
    sources = {s[K.SAMPLE_KEY]: (s[K.SOURCE], s[K.FRAME_INDEX])
               for p in shard_paths(manifest, "train") for s in tar_samples(p)}
    assert sum(src == a for src, _ in sources.values()) == 10


def test_duplicate_across_splits_is_kept_in_the_earlier_split_only(tmp_path):
    frames = water_atoms(6, seed=23)
    a = _write(tmp_path / "a.xyz", frames)
    b = _write(tmp_path / "b.xyz", [frames[0], frames[5]] + water_atoms(2, seed=24))
    manifest = build_shards([f"train={a}", f"test={b}"], tmp_path / "out", shard_size=4, use_ray=False,
                            progress=False)
    assert {s: manifest["splits"][s]["samples"] for s in ("train", "val", "test")} == {
        "train": 6, "val": 0, "test": 2}
    assert set(_split_keys(manifest, "train")).isdisjoint(_split_keys(manifest, "test"))
    assert manifest["totals"]["duplicates"] == 2


def test_repeats_inside_one_chunk_and_whole_duplicate_chunk(tmp_path):
    frames = water_atoms(4, seed=25)
    path = _write(tmp_path / "a.xyz", frames + [frames[1], frames[1]] + frames)   # 4 + 2 + 4 frames
    manifest = build_shards([f"train={path}"], tmp_path / "out", shard_size=4, use_ray=False, progress=False)
    assert_manifest_matches_disk(manifest)
    assert manifest["totals"]["duplicates"] == 6 and manifest["totals"]["samples_written"] == 4
    assert [s["name"] for s in manifest["shards"]] == ["shard-000000.tar"]   # later chunks were all repeats
    assert not (tmp_path / "out" / "shard-000001.tar").exists()


def test_dedup_rerun_and_resume_are_byte_identical(tmp_path):
    frames = water_atoms(9, seed=26)
    a = _write(tmp_path / "a.xyz", frames)
    b = _write(tmp_path / "b.xyz", frames[3:6] + water_atoms(4, seed=27) + frames[:2])
    inputs = [a, b]
    one, two = tmp_path / "one", tmp_path / "two"
    first = build_shards(inputs, one, shard_size=2, split_fractions=(0.6, 0.2, 0.2), use_ray=False, progress=False)
    build_shards(inputs, two, shard_size=2, split_fractions=(0.6, 0.2, 0.2), use_ray=False, progress=False)
    assert first["totals"]["duplicates"] == 5
    names = _all_files(one)
    assert names == _all_files(two)
    _, mismatch, errors = filecmp.cmpfiles(one, two, names, shallow=False)
    assert mismatch == [] and errors == []
    # resume: a rewritten chunk lost its sidecar, another its tar, and the manifest is gone
    sidecars = [n for n in names if n.endswith(".tar" + SIDECAR_SUFFIX)]
    rewritten = [n for n in sidecars if json.loads((two / n).read_text())["dropped"]
                 and json.loads((two / n).read_text())["samples"]]
    assert rewritten
    (two / rewritten[0]).unlink()
    (two / rewritten[-1].removesuffix(SIDECAR_SUFFIX)).unlink()
    (two / "manifest.json").unlink()
    build_shards(inputs, two, shard_size=2, split_fractions=(0.6, 0.2, 0.2), use_ray=False, progress=False)
    assert _all_files(two) == names
    _, mismatch, errors = filecmp.cmpfiles(one, two, names, shallow=False)
    assert mismatch == [] and errors == []


def test_every_duplicate_is_counted_but_examples_are_capped(tmp_path):
    from data_shards.dedup import MAX_EXAMPLES

    frames = water_atoms(MAX_EXAMPLES + 5, seed=28)
    a = _write(tmp_path / "a.xyz", frames + frames)
    manifest = build_shards([f"val={a}"], tmp_path / "out", shard_size=7, use_ray=False, progress=False)
    assert manifest["duplicates"]["count"] == MAX_EXAMPLES + 5
    assert len(manifest["duplicates"]["examples"]) == MAX_EXAMPLES
    assert manifest["splits"]["val"]["samples"] == MAX_EXAMPLES + 5
    assert len(_streamed_keys(tmp_path / "out", "val")) == MAX_EXAMPLES + 5


@pytest.mark.slow
def test_ray_build_with_duplicates_matches_serial(tmp_path):
    frames = water_atoms(8, seed=29)
    a = _write(tmp_path / "a.xyz", frames + frames[:3])
    ray = build_shards([a], tmp_path / "ray", shard_size=3, num_cpus=2, progress=False)
    serial = build_shards([a], tmp_path / "serial", shard_size=3, use_ray=False, progress=False)
    assert ray["shards"] == serial["shards"] and ray["duplicates"] == serial["duplicates"]
    assert ray["totals"]["duplicates"] == 3
