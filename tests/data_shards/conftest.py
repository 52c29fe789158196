"""Shard sets shared by the stream tests (built once per run)."""
from pathlib import Path

import ase.io
import pytest

from data_shards.build import build_shards
from tests.helpers.water_systems import water_atoms


@pytest.fixture(scope="session")
def mixed_shards(tmp_path_factory) -> Path:
    """24 frames of 4 waters (12 atoms) then 12 frames of 8 waters (24 atoms), 4 per shard: 9 shards."""
    root = tmp_path_factory.mktemp("mixed")
    small, large = root / "small.xyz", root / "large.xyz"
    ase.io.write(small, water_atoms(24, n_waters=4, seed=1), format="extxyz")
    ase.io.write(large, water_atoms(12, n_waters=8, box=8.5, seed=2), format="extxyz")
    out = root / "shards"
    build_shards([f"train={small}", f"train={large}"], out, shard_size=4, use_ray=False, progress=False)
    return out


@pytest.fixture(scope="session")
def uniform_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uniform")
    ase.io.write(root / "w.xyz", water_atoms(20, seed=4), format="extxyz")
    out = root / "shards"
    build_shards([f"train={root / 'w.xyz'}"], out, shard_size=3, use_ray=False, progress=False)
    return out
