"""Flexible TIP3P generation: geometry, labels and units, determinism, and the written extxyz file."""
from __future__ import annotations

import numpy as np
import pytest

from data_shards import readers, tip3p
from data_shards.tip3p import TIP3PConfig, evaluate, iter_tip3p_frames, make_context, tip3p_frames

SMALL = dict(n_molecules=16, n_frames=3, equilibration_steps=200, steps_between_frames=50)


@pytest.fixture(scope="module")
def frames():
    return tip3p_frames(**SMALL)


def minimum_image(d: np.ndarray, side: float) -> np.ndarray:
    return d - np.round(d / side) * side


def test_unit_constants():
    assert 1.0 / tip3p.EV_PER_KJ_PER_MOL == pytest.approx(96.48533212, rel=1e-9)
    assert tip3p.EV_PER_ANGSTROM_PER_KJ_PER_MOL_NM == pytest.approx(tip3p.EV_PER_KJ_PER_MOL / 10, rel=1e-15)


def test_box_from_density():
    cfg = TIP3PConfig(n_molecules=64)
    mass_g = 64 * 18.015 / 6.02214076e23
    assert cfg.box_angstrom ** 3 * 1e-24 == pytest.approx(mass_g / 1.0, rel=1e-4)  # 1 g/cm³
    assert 12.3 < cfg.box_angstrom < 12.5 and cfg.cutoff == pytest.approx(0.49 * cfg.box_angstrom)


def test_water_geometry_and_labels(frames):
    side = TIP3PConfig(**SMALL).box_angstrom
    assert len(frames) == 3
    for i, f in enumerate(frames):
        f.validate()
        assert f.index == i and f.info["seed"] == 0
        np.testing.assert_array_equal(f.species, np.tile([8, 1, 1], 16))
        np.testing.assert_allclose(f.cell, np.eye(3) * side)
        assert f.pbc.all() and np.isfinite(f.forces).all() and f.forces.shape == (48, 3)
        molecules = f.positions.reshape(16, 3, 3)
        oh = minimum_image(molecules[:, 1:] - molecules[:, :1], side)
        bond = np.linalg.norm(oh, axis=-1)
        assert 0.85 < bond.min() and bond.max() < 1.10 and abs(bond.mean() - 0.96) < 0.03
        cos = np.sum(oh[:, 0] * oh[:, 1], axis=-1) / (bond[:, 0] * bond[:, 1])
        assert abs(np.degrees(np.arccos(cos)).mean() - 104.5) < 8
        # no H collapsing onto a neighbouring O (flexible TIP3P H has no LJ repulsion)
        d = np.linalg.norm(minimum_image(f.positions[:, None] - f.positions[None], side), axis=-1)
        other_molecule = np.arange(48)[:, None] // 3 != np.arange(48)[None] // 3
        assert d[other_molecule].min() > 1.2
        # TIP3P liquid: about -41 kJ/mol = -0.43 eV per molecule (plus intramolecular strain)
        assert -0.6 < f.energy / 16 < -0.25
        # a thermal frame: net force ~ 0, typical force magnitude of order 1 eV/Å
        assert np.abs(f.forces.sum(axis=0)).max() < 1e-2
        assert 0.2 < np.sqrt(np.mean(f.forces ** 2)) < 3.0


def test_frames_are_decorrelated_snapshots(frames):
    side = TIP3PConfig(**SMALL).box_angstrom
    for a, b in zip(frames, frames[1:]):
        shift = minimum_image(b.positions - a.positions, side)
        assert np.sqrt(np.mean(shift ** 2)) > 0.05   # Å moved in 50 steps of 0.5 fs
        assert a.energy != b.energy and not np.array_equal(a.forces, b.forces)


def test_forces_are_negative_energy_gradient_in_ev_per_angstrom(frames):
    """Central differences of the OpenMM energy (double precision Reference platform) in eV and Å."""
    cfg = TIP3PConfig(**SMALL)
    frame = frames[-1]
    context = make_context(cfg, frame.positions, platform="Reference")
    energy, forces, _ = evaluate(context)
    assert energy == pytest.approx(frame.energy, abs=5e-3)          # CPU (mixed precision) vs Reference
    np.testing.assert_allclose(forces, frame.forces, atol=5e-3)
    h = 1e-5  # Å; small enough that no pair crosses the cutoff
    for atom in (0, 1):  # an O and an H
        numeric = np.zeros(3)
        for k in range(3):
            energies = []
            for step in (h, -h):
                moved = frame.positions.copy()
                moved[atom, k] += step
                context.setPositions(moved / 10.0)
                energies.append(evaluate(context)[0])
            numeric[k] = -(energies[0] - energies[1]) / (2 * h)
        np.testing.assert_allclose(numeric, forces[atom], rtol=1e-5, atol=1e-5)


def test_same_seed_identical_different_seed_differs(frames):
    again = tip3p_frames(**SMALL)
    for a, b in zip(frames, again):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.forces, b.forces)
        assert a.energy == b.energy
    other = tip3p_frames(**{**SMALL, "seed": 1})
    assert not np.allclose(other[0].positions, frames[0].positions)
    assert other[0].energy != frames[0].energy and other[0].info["seed"] == 1


def test_generate_writes_readable_deterministic_file(tmp_path, frames):
    first = tip3p.generate_tip3p(tmp_path / "a", progress=False, **SMALL)
    second = tip3p.generate_tip3p(tmp_path / "b", progress=False, **SMALL)
    assert first.name == "tip3p_16w_seed0.extxyz" and first.parent == tmp_path / "a"
    assert first.read_bytes() == second.read_bytes()
    assert readers.detect_format(first) == "extxyz" and readers.count_frames(first) == 3
    back = readers.read_frames(first)
    for f, g in zip(back, frames):
        np.testing.assert_array_equal(f.species, g.species)
        np.testing.assert_allclose(f.positions, g.positions, atol=1e-7)
        np.testing.assert_allclose(f.forces, g.forces, atol=1e-7)
        np.testing.assert_allclose(f.cell, g.cell, atol=1e-12)
        assert f.energy == pytest.approx(g.energy, abs=1e-10) and f.pbc.all()
        assert f.info["seed"] == 0 and f.info["time_ps"] == g.info["time_ps"]


def test_progress_bar_counts_frames(capsys, monkeypatch):
    cfg = TIP3PConfig(n_molecules=8, n_frames=2, equilibration_steps=0, steps_between_frames=5)
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert len(list(iter_tip3p_frames(cfg, progress=True))) == 2
    assert "2/2" in capsys.readouterr().err
    monkeypatch.setenv("TQDM_DISABLE", "1")
    list(iter_tip3p_frames(cfg, progress=True))
    assert "2/2" not in capsys.readouterr().err


@pytest.mark.parametrize("bad", [dict(n_molecules=0), dict(n_frames=2.5), dict(seed=-1), dict(platform="CUDA"),
                                 dict(temperature=0.0), dict(equilibration_steps=-1),
                                 dict(n_molecules=8, cutoff_angstrom=5.0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        TIP3PConfig(**bad)
