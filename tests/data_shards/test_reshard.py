"""`shards reshard`: same samples (byte for byte), same splits, new shard count/size, deterministic."""
from __future__ import annotations

import filecmp
import shutil
import tarfile
from pathlib import Path

import ase.io
import pytest

from data_shards.build import build_shards
from data_shards.cli import main as cli_main
from data_shards.manifest import ManifestError, load_manifest, shard_paths, verify_shards
from data_shards.reshard import reshard
from tests.helpers.shards import assert_manifest_matches_disk
from tests.helpers.water_systems import water_atoms


def _raw_members(manifest: dict, split: str) -> list[tuple[str, bytes]]:
    out = []
    for path in shard_paths(manifest, split):
        with tarfile.open(path) as tar:
            out += [(m.name, tar.extractfile(m).read()) for m in tar]
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Built once per module; tests must not modify it (copy it first)."""
    tmp = tmp_path_factory.mktemp("reshard_src")
    a, b = tmp / "a.xyz", tmp / "b.xyz"
    ase.io.write(a, water_atoms(23, seed=51), format="extxyz")
    ase.io.write(b, water_atoms(7, seed=52), format="extxyz")
    build_shards([str(a), f"test={b}"], tmp / "src", shard_size=3, use_ray=False, progress=False)
    return tmp / "src"


def test_reshard_by_count_keeps_samples_and_splits(source, tmp_path):
    src = load_manifest(source)
    new = reshard(source, tmp_path / "dst", num_shards=2)
    assert_manifest_matches_disk(new)
    assert verify_shards(tmp_path / "dst") == []
    for split in ("train", "val", "test"):
        assert _raw_members(new, split) == _raw_members(src, split)
        assert new["splits"][split]["samples"] == src["splits"][split]["samples"]
    # a: train 18 → 9 + 9, val 3 → 2 + 1; test 2 + 7 = 9 → 5 + 4
    assert [(s["split"], s["samples"]) for s in new["shards"]] == [
        ("train", 9), ("train", 9), ("val", 2), ("val", 1), ("test", 5), ("test", 4)]
    assert new["totals"] == src["totals"] and new["stats"] == src["stats"]
    assert new["resharded_from"]["num_shards"] == 2
    one = reshard(source, tmp_path / "dst1", num_shards=50)    # more shards than samples: one sample each
    assert len(one["shards"]) == sum(src["splits"][s]["samples"] for s in ("train", "val", "test"))


def test_reshard_by_bytes_respects_the_limit_and_reruns_byte_identically(source, tmp_path):
    src = load_manifest(source)
    limit = 40_000
    new = reshard(source, tmp_path / "one", max_shard_bytes=limit)
    assert all(s["bytes"] <= limit for s in new["shards"])
    sizes = [s["bytes"] for s in new["shards"]]
    assert len(sizes) < len(src["shards"]) and max(sizes) > limit - 20_000  # shards are filled, not one per sample
    for split in ("train", "val", "test"):
        assert _raw_members(new, split) == _raw_members(src, split)
    again = reshard(source, tmp_path / "two", max_shard_bytes=limit)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "one", tmp_path / "two",
                                           [n for n in names if n != "manifest.json"], shallow=False)
    assert mismatch == [] and errors == []
    assert again["shards"] == new["shards"]
    # resharding into a folder that held more shards removes the stale ones
    reshard(source, tmp_path / "one", num_shards=1)
    assert sorted(p.name for p in (tmp_path / "one").glob("shard-*")) == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_reshard_refuses_bad_arguments_and_corrupt_source(source, tmp_path):
    source = Path(shutil.copytree(source, tmp_path / "copy"))
    with pytest.raises(ValueError, match="exactly one"):
        reshard(source, tmp_path / "x")
    with pytest.raises(ValueError, match="destination other than the source"):
        reshard(source, source, num_shards=2)
    victim = source / load_manifest(source)["shards"][1]["name"]
    blob = bytearray(victim.read_bytes())
    blob[700] ^= 0xFF
    victim.write_bytes(bytes(blob))
    with pytest.raises(ManifestError, match=victim.name):
        reshard(source, tmp_path / "y", num_shards=2)


def test_cli_reshard(source, tmp_path, capsys):
    assert cli_main(["shards", "reshard", str(source), str(tmp_path / "dst"), "--num-shards", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert cli_main(["shards", "verify", str(tmp_path / "dst")]) == 0
    with pytest.raises(SystemExit):
        cli_main(["shards", "reshard", str(source), str(tmp_path / "d2"), "--num-shards", "2",
                  "--max-shard-bytes", "100"])
