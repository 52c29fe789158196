"""--units conversion and the implausible-units check: quarantine entries name file, frame, field and the option."""
from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from data_shards import keys as K
from data_shards.build import build_shards
from data_shards.chunk import InputError
from data_shards.cli import main as cli_main
from data_shards.frame import Frame, FrameError
from data_shards.manifest import shard_paths
from data_shards.units import BOHR_TO_ANGSTROM, HARTREE_TO_EV, MAX_FORCE_RMS, check_plausible, energy_bound
from tests.helpers.shards import tar_samples
from tests.helpers.water_systems import water_atoms

EV_PER_KCAL_MOL = 0.0433641
WATER_EV = -469.4     # total DFT energy of one water molecule with a pseudopotential code, eV


def _quarantine(out) -> list[dict]:
    return [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]


def _n2p2_in_ev(path, n: int, rng) -> str:
    """Water monomers written in Å / eV / eV/Å (n2p2's reader assumes Bohr / Hartree unless told)."""
    blocks = []
    for _ in range(n):
        pos = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]) + rng.uniform(0, 5, 3)
        forces = rng.normal(0, 0.5, (3, 3))
        atoms = [f"atom {' '.join(map(repr, p.tolist()))} {s} 0.0 0.0 {' '.join(map(repr, f.tolist()))}"
                 for s, p, f in zip("OHH", pos, forces)]
        blocks.append("\n".join(["begin", *atoms, f"energy {WATER_EV + rng.normal(0, 0.1)!r}", "charge 0.0", "end"]))
    path.write_text("\n".join(blocks) + "\n")
    return str(path)


def test_ev_file_read_as_hartree_is_quarantined_with_a_units_hint(tmp_path):
    path = _n2p2_in_ev(tmp_path / "input.data", 4, np.random.default_rng(0))
    with pytest.raises(InputError, match=r"no sample written: all 4 frames read were quarantined.*"
                                         r"did you mean --units angstrom_ev"):
        build_shards([f"train={path}"], tmp_path / "wrong", use_ray=False, progress=False)
    records = _quarantine(tmp_path / "wrong")
    assert [r["frame"] for r in records] == [0, 1, 2, 3]
    assert all(r["source"] == path and r["field"] == "energy" for r in records)
    assert "did you mean --units angstrom_ev?" in records[0]["reason"] and "eV/atom" in records[0]["reason"]
    fixed = build_shards([f"train={path}"], tmp_path / "right", use_ray=False, progress=False, units="angstrom_ev")
    assert fixed["totals"] == {"frames_read": 4, "samples_written": 4, "quarantined": 0, "duplicates": 0}
    assert fixed["build"]["units"] == "angstrom_ev"


def test_forces_in_mev_and_energies_in_kcal_mol_are_caught(tmp_path):
    atoms = water_atoms(5, seed=31)
    atoms[1].calc.results["forces"] = atoms[1].get_forces() * 1000.0                 # meV/Å
    atoms[3].calc = SinglePointCalculator(atoms[3], energy=4 * WATER_EV / EV_PER_KCAL_MOL,
                                          forces=atoms[3].get_forces())              # kcal/mol
    path = tmp_path / "a.xyz"
    ase.io.write(path, atoms, format="extxyz")
    manifest = build_shards([f"train={path}"], tmp_path / "out", use_ray=False, progress=False)
    assert manifest["totals"]["quarantined"] == 2 and manifest["totals"]["samples_written"] == 3
    by_frame = {r["frame"]: r for r in _quarantine(tmp_path / "out")}
    assert by_frame[1]["field"] == "forces" and "force RMS" in by_frame[1]["reason"]
    assert by_frame[3]["field"] == "energy"
    for r in by_frame.values():
        assert "--units bohr_hartree" in r["reason"] and "kcal/mol" in r["reason"] and r["source"] == str(path)


def test_plausible_labels_pass_and_thresholds_are_the_documented_ones():
    rng = np.random.default_rng(2)
    species = np.array([8, 1, 1] * 4)
    frame = Frame(species, rng.uniform(0, 8, (12, 3)), np.eye(3) * 8, np.ones(3, bool), 4 * WATER_EV,
                  rng.normal(0, 1, (12, 3)), "mem", 0)
    assert check_plausible(frame, "angstrom_ev") is frame
    assert energy_bound(species) == pytest.approx(4 * 1.5 * 0.7687 * HARTREE_TO_EV * (8 ** (7 / 3) + 2))
    frame.energy = -energy_bound(species) * 1.01
    with pytest.raises(FrameError, match="frame 0, field 'energy'"):
        check_plausible(frame, "angstrom_ev")
    frame.energy = 4 * WATER_EV
    frame.forces = np.full((12, 3), MAX_FORCE_RMS * 1.01)
    with pytest.raises(FrameError, match="field 'forces'.*did you mean --units bohr_hartree"):
        check_plausible(frame, "angstrom_ev")
    frame.forces = np.full((12, 3), MAX_FORCE_RMS * 0.99)
    check_plausible(frame, "angstrom_ev")


def test_units_option_converts_formats_without_their_own_units(tmp_path):
    atoms = water_atoms(3, seed=32)
    for a in atoms:     # labels as if in Hartree / Hartree/Bohr, positions as if in Bohr
        a.calc.results["energy"] = a.get_potential_energy() / HARTREE_TO_EV
    path = tmp_path / "bohr.xyz"
    ase.io.write(path, atoms, format="extxyz")
    manifest = build_shards([f"train={path}"], tmp_path / "out", use_ray=False, progress=False, units="bohr_hartree")
    samples = sorted((s for p in shard_paths(manifest, "train") for s in tar_samples(p)),
                     key=lambda s: s[K.FRAME_INDEX])
    assert len(samples) == 3
    for sample, a in zip(samples, atoms):
        np.testing.assert_allclose(sample[K.POSITIONS], a.positions * BOHR_TO_ANGSTROM, atol=1e-5)
        np.testing.assert_allclose(sample[K.CELL], np.array(a.cell) * BOHR_TO_ANGSTROM, atol=1e-12)
        assert sample[K.ENERGY] == pytest.approx(a.get_potential_energy() * HARTREE_TO_EV, rel=1e-9)
        np.testing.assert_allclose(sample[K.FORCES], a.get_forces() * HARTREE_TO_EV / BOHR_TO_ANGSTROM,
                                   rtol=1e-5, atol=1e-4)


def test_unknown_units_are_refused_with_the_valid_names(tmp_path, capsys):
    path = tmp_path / "a.xyz"
    ase.io.write(path, water_atoms(2, seed=33), format="extxyz")
    with pytest.raises(ValueError, match=r"unknown units 'hartree'.*angstrom_ev.*bohr_hartree"):
        build_shards([str(path)], tmp_path / "out", use_ray=False, units="hartree")
    with pytest.raises(SystemExit):
        cli_main(["shards", "build", str(path), "--out", str(tmp_path / "o"), "--units", "hartree"])
    assert "angstrom_ev" in capsys.readouterr().err
