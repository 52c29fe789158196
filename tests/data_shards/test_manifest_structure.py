"""Manifest `structure` section: mean neighbour count at --stats-cutoff, natoms histogram, periodicity."""
from __future__ import annotations

import ase
import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from data_shards.build import build_shards
from data_shards.cli import main as cli_main
from data_shards.graph import neighbour_list
from tests.helpers.water_systems import water_atoms


def _molecules(n: int, seed: int) -> list[ase.Atoms]:
    """Non-periodic clusters of 2 or 3 waters (6 or 9 atoms)."""
    out = []
    for i, a in enumerate(water_atoms(n, n_waters=3, seed=seed)):
        keep = 9 if i % 2 else 6
        m = ase.Atoms(a.numbers[:keep], positions=a.positions[:keep], pbc=False)
        m.calc = SinglePointCalculator(m, energy=-14.0 * keep / 3, forces=a.get_forces()[:keep])
        out.append(m)
    return out


def _direct_mean(atoms: list[ase.Atoms], cutoff: float) -> float:
    edges = sum(neighbour_list(a.positions, np.array(a.cell), a.pbc, cutoff)[0].shape[1] for a in atoms)
    return edges / sum(len(a) for a in atoms)


def test_mixed_periodicity_histogram_and_neighbour_mean(tmp_path):
    boxes, molecules = water_atoms(5, seed=41), _molecules(4, seed=42)
    a, b = tmp_path / "boxes.xyz", tmp_path / "mol.xyz"
    ase.io.write(a, boxes, format="extxyz")
    ase.io.write(b, molecules, format="extxyz")
    m = build_shards([f"train={a}", f"val={b}"], tmp_path / "out", shard_size=2, use_ray=False, progress=False,
                     stats_cutoff=3.5)
    s = m["structure"]
    assert s["cutoff"] == 3.5 and m["build"]["stats_cutoff"] == 3.5
    assert s["periodicity"] == "mixed" and (s["periodic_samples"], s["non_periodic_samples"]) == (5, 4)
    assert s["natoms_histogram"] == {"6": 2, "9": 2, "12": 5}
    assert s["mean_neighbours"] == pytest.approx(_direct_mean(boxes + molecules, 3.5), rel=1e-12)
    assert s["mean_neighbours_per_split"]["train"] == pytest.approx(_direct_mean(boxes, 3.5), rel=1e-12)
    assert s["mean_neighbours_per_split"]["val"] == pytest.approx(_direct_mean(molecules, 3.5), rel=1e-12)
    assert s["mean_neighbours_per_split"]["test"] is None
    assert s["mean_neighbours"] > 0


def test_default_cutoff_and_pure_periodicity(tmp_path):
    boxes, molecules = water_atoms(3, seed=43), _molecules(3, seed=44)
    a, b = tmp_path / "boxes.xyz", tmp_path / "mol.xyz"
    ase.io.write(a, boxes, format="extxyz")
    ase.io.write(b, molecules, format="extxyz")
    periodic = build_shards([f"train={a}"], tmp_path / "p", use_ray=False, progress=False)["structure"]
    assert periodic["cutoff"] == 5.0 and periodic["periodicity"] == "periodic"
    # 6.5 Å box, 5 Å cutoff: periodic images count, so the mean exceeds the 11 other atoms of the box
    assert periodic["mean_neighbours"] == pytest.approx(_direct_mean(boxes, 5.0)) and periodic["mean_neighbours"] > 11
    free = build_shards([f"train={b}"], tmp_path / "f", use_ray=False, progress=False)["structure"]
    assert free["periodicity"] == "non-periodic"
    assert free["mean_neighbours"] == pytest.approx(_direct_mean(molecules, 5.0))


def test_changed_cutoff_rebuilds_and_cli_reports_structure(tmp_path, capsys):
    a = tmp_path / "boxes.xyz"
    ase.io.write(a, water_atoms(4, seed=45), format="extxyz")
    out = tmp_path / "out"
    first = build_shards([str(a)], out, shard_size=2, use_ray=False, progress=False, stats_cutoff=2.0)
    again = build_shards([str(a)], out, shard_size=2, use_ray=False, progress=False, stats_cutoff=4.0)
    assert again["structure"]["cutoff"] == 4.0
    assert again["structure"]["mean_neighbours"] > first["structure"]["mean_neighbours"]
    assert cli_main(["shards", "build", str(a), "--out", str(out), "--serial", "--stats-cutoff", "3"]) == 0
    capsys.readouterr()
    assert cli_main(["shards", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mean neighbours within 3 Å" in text and "periodic" in text and "12: 4" in text
