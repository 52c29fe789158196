"""`shards build --split-mode shuffled`: each input's frames are permuted (seed, path) before the fractions
are cut, so a split is not one contiguous block; the same seed gives the same shards, a rerun resumes."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from data_shards.build import BuildConfig, build_shards, shuffled_positions

REPO = Path(__file__).resolve().parents[2]


def write_frames(path: Path, n: int) -> str:
    """n water molecules' frames; frame i has energy -i (a marker of its position in the file)."""
    rng = np.random.default_rng(0)
    frames = []
    for i in range(n):
        pos = np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]) + rng.normal(0, 0.02, (3, 3))
        atoms = ase.Atoms("OH2", positions=pos)
        atoms.calc = SinglePointCalculator(atoms, energy=-float(i), forces=rng.normal(0, 0.3, (3, 3)))
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")
    return str(path)


def split_positions(out: Path, manifest: dict) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    found[shard["split"]].append(json.loads(tar.extractfile(m).read())["frame_index"])
    return {k: sorted(v) for k, v in found.items()}


def test_positions_are_a_seeded_partition():
    a = shuffled_positions("x.xyz", 50, (0.8, 0.1, 0.1), seed=1)
    assert [len(a[s]) for s in ("train", "val", "test")] == [40, 5, 5]
    assert sorted(a["train"] + a["val"] + a["test"]) == list(range(50))
    assert a == shuffled_positions("x.xyz", 50, (0.8, 0.1, 0.1), seed=1)
    assert a != shuffled_positions("x.xyz", 50, (0.8, 0.1, 0.1), seed=2)
    assert a["val"] != list(range(a["val"][0], a["val"][0] + 5))   # not one block (a block has p ≈ 1e-6)


def test_shuffled_build_spreads_splits_is_reproducible_and_resumes(tmp_path):
    path = write_frames(tmp_path / "traj.xyz", 40)
    out = tmp_path / "out"
    kwargs = {"shard_size": 7, "split_fractions": (0.5, 0.25, 0.25), "use_ray": False, "progress": False,
              "split_mode": "shuffled", "split_seed": 3}
    manifest = build_shards([path], out, **kwargs)
    got = split_positions(out, manifest)
    assert got == shuffled_positions(path, 40, (0.5, 0.25, 0.25), seed=3)
    assert manifest["build"]["split_mode"] == "shuffled"
    assert manifest["inputs"][0]["counts"] == {"train": 20, "val": 10, "test": 10}
    assert max(got["val"]) - min(got["val"]) > 10          # a contiguous block of 10 would span 9
    first = {s["name"]: (out / s["name"]).read_bytes() for s in manifest["shards"]}
    (out / manifest["shards"][1]["name"]).unlink()           # a killed build: one shard missing
    (out / (manifest["shards"][1]["name"] + ".json")).unlink()
    again = build_shards([path], out, **kwargs)
    assert {s["name"]: (out / s["name"]).read_bytes() for s in again["shards"]} == first
    contiguous = build_shards([path], tmp_path / "contiguous", **{**kwargs, "split_mode": "contiguous"})
    assert split_positions(tmp_path / "contiguous", contiguous)["val"] == list(range(20, 30))


def test_bad_split_mode_is_one_line_exit_2(tmp_path):
    with pytest.raises(ValueError, match=r"split_mode must be one of \['contiguous', 'shuffled'\]"):
        BuildConfig(("a.xyz",), str(tmp_path), split_mode="random")
    with pytest.raises(ValueError, match="needs split_by 'frames'"):
        BuildConfig(("a.xyz",), str(tmp_path), split_mode="shuffled", split_by="input")
    path = write_frames(tmp_path / "t.xyz", 5)
    proc = subprocess.run([sys.executable, "-m", "maskpot.cli", "shards", "build", path, "--out", str(tmp_path / "o"),
                           "--serial", "--split-mode", "shuffled", "--split-by", "input"],
                          check=False, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "split_by" in proc.stderr
