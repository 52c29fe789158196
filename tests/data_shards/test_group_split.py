"""`split_by="input"`: whole inputs (files, DeePMD systems) go to one split, a pure function of paths,
sizes and the seed; explicit train=/val=/test= prefixes still win."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_shards import readers
from data_shards.build import BuildConfig, InputSpec, assign_groups, build_shards
from tests.helpers.shards import write_deepmd_system, write_xyz
from tests.helpers.water_systems import water_atoms


def test_every_group_goes_wholly_to_one_split_and_small_splits_still_get_one():
    specs = [InputSpec(f"traj_seed{i}.xyz", "extxyz", 100, None) for i in range(10)]
    groups = assign_groups(specs, (0.8, 0.1, 0.1), seed=0)
    counts = {s: sum(1 for v in groups.values() if v == s) for s in ("train", "val", "test")}
    assert counts == {"train": 8, "val": 1, "test": 1}
    assert groups == assign_groups(list(reversed(specs)), (0.8, 0.1, 0.1), seed=0)   # input order is irrelevant
    others = [assign_groups(specs, (0.8, 0.1, 0.1), seed=s) for s in range(1, 6)]
    assert any(o != groups for o in others)                                        # the seed picks which ones
    few = assign_groups(specs[:3], (0.8, 0.1, 0.1), seed=0)
    assert sorted(few.values()) == ["test", "train", "val"]   # 3 groups: one per split, not all in train
    none_in_test = assign_groups(specs, (0.9, 0.1, 0.0), seed=0)
    assert "test" not in none_in_test.values()


def test_sizes_not_counts_fill_the_fractions():
    big = InputSpec("big.xyz", "extxyz", 800, None)
    small = [InputSpec(f"s{i}.xyz", "extxyz", 25, None) for i in range(8)]
    groups = assign_groups([big, *small], (0.8, 0.1, 0.1), seed=3)
    frames = {s: sum(sp.frames for sp in [big, *small] if groups[sp.path] == s) for s in ("train", "val", "test")}
    assert frames == {"train": 800, "val": 100, "test": 100}


def test_build_by_input_keeps_trajectories_and_deepmd_systems_whole(tmp_path):
    paths = [write_xyz(tmp_path / f"seed{i}.xyz", water_atoms(4, seed=10 + i)) for i in range(4)]
    root = tmp_path / "dp"
    for i in range(3):
        write_deepmd_system(root / f"sys{i}", [0, 1, 1] * 2, ["O", "H"], sets=[3], seed=20 + i)
    fixed = write_xyz(tmp_path / "fixed.xyz", water_atoms(2, seed=99))
    out = tmp_path / "out"
    manifest = build_shards([*paths, str(root), f"val={fixed}"], out, shard_size=3,
                            split_fractions=(0.6, 0.2, 0.2), use_ray=False, progress=False, split_by="input",
                            split_seed=7)
    inputs = {Path(i["path"]).name: i for i in manifest["inputs"]}
    assert set(inputs) == {"seed0.xyz", "seed1.xyz", "seed2.xyz", "seed3.xyz", "sys0", "sys1", "sys2", "fixed.xyz"}
    assert inputs["fixed.xyz"]["split"] == "val"
    for item in inputs.values():   # one split per group, all of its frames
        assert item["split"] in ("train", "val", "test") and item["ranges"] == {item["split"]: [0, item["frames"]]}
    assert manifest["build"]["split_by"] == "input" and manifest["build"]["split_seed"] == 7
    total = sum(manifest["splits"][s]["samples"] for s in ("train", "val", "test"))
    assert total == 4 * 4 + 3 * 3 + 2
    assert all(manifest["splits"][s]["samples"] > 0 for s in ("train", "val", "test"))
    again = build_shards([*paths, str(root), f"val={fixed}"], tmp_path / "again", shard_size=3,
                         split_fractions=(0.6, 0.2, 0.2), use_ray=False, progress=False, split_by="input",
                         split_seed=7)
    strip = lambda m: json.dumps({k: v for k, v in m.items() if k != "manifest_dir"}, sort_keys=True)  # noqa: E731
    assert strip(again).replace(str(tmp_path / "again"), "X") == strip(manifest).replace(str(out), "X")
    for shard in manifest["shards"]:
        assert (out / shard["name"]).read_bytes() == (tmp_path / "again" / shard["name"]).read_bytes()


def test_unknown_split_by_lists_the_options(tmp_path):
    with pytest.raises(ValueError, match=r"split_by must be one of \['frames', 'input'\]"):
        BuildConfig(("a.xyz",), str(tmp_path), split_by="trajectory")
    assert readers  # the readers registry is what detects each group's format
