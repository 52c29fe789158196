"""MaskpotCalculator: same numbers as the model's own forward pass, forces = −∇E, per-atom energies,
molecules without a cell and periodic boxes, rotation equivariance, and the neighbour-list skin."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from data_shards import keys as K
from finetune.forcefield.calculator import MaskpotCalculator
from pretrain.export import load_export
from tests.helpers.paths import TINY_EXPORT
from tests.helpers.water_systems import random_rotation, to_batch, water_box, water_dimer


def as_atoms(sample: dict) -> Atoms:
    return Atoms(numbers=sample[K.SPECIES], positions=sample[K.POSITIONS], cell=sample[K.CELL], pbc=sample[K.PBC])


@pytest.fixture(scope="module")
def model64():
    model, _ = load_export(TINY_EXPORT)
    return model.double().eval()


@pytest.mark.parametrize("make", [water_dimer, water_box], ids=["dimer_no_cell", "box_32_periodic"])
@pytest.mark.parametrize("skin", [0.0, 0.4])
def test_calculator_equals_the_models_own_output(model64, make, skin):
    sample = make(seed=1)
    atoms = as_atoms(sample)
    atoms.calc = MaskpotCalculator(TINY_EXPORT, dtype="float64", skin=skin)
    with torch.no_grad():
        out = model64(to_batch([sample], model64.config.cutoff, torch.float64), compute_forces=True)
    assert atoms.get_potential_energy() == pytest.approx(float(out[K.PRED_ENERGY][0]), rel=1e-12, abs=1e-9)
    np.testing.assert_allclose(atoms.get_forces(), out[K.PRED_FORCES].detach().numpy(), rtol=1e-9, atol=1e-10)
    energies = atoms.get_potential_energies()
    assert energies.shape == (len(atoms),)
    assert energies.sum() == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
    # energies include E0: oxygen atoms sit near E0(O) = -432.1 eV of the asset's normalisation
    assert np.all(np.abs(energies[atoms.numbers == 8] + 432.1) < 50)


def test_float32_calculator_is_close_to_float64():
    sample = water_box(seed=2)
    a32, a64 = as_atoms(sample), as_atoms(sample)
    a32.calc, a64.calc = MaskpotCalculator(TINY_EXPORT, dtype="float32"), MaskpotCalculator(TINY_EXPORT)
    assert a32.get_potential_energy() == pytest.approx(a64.get_potential_energy(), rel=1e-6)
    np.testing.assert_allclose(a32.get_forces(), a64.get_forces(), atol=1e-4)


@pytest.mark.parametrize("make", [water_dimer, water_box], ids=["dimer_no_cell", "box_32_periodic"])
def test_forces_are_minus_the_numerical_energy_gradient(make):
    atoms = as_atoms(make(seed=3))
    atoms.calc = MaskpotCalculator(TINY_EXPORT, dtype="float64")
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 1e-3          # not trivially zero
    rng = np.random.default_rng(0)
    h = 1e-5
    for index in rng.choice(len(atoms), 4, replace=False):
        for axis in range(3):
            shifted = []
            for sign in (1, -1):
                moved = atoms.copy()
                moved.calc = atoms.calc
                moved.positions[index, axis] += sign * h
                shifted.append(moved.get_potential_energy())
            numerical = -(shifted[0] - shifted[1]) / (2 * h)
            assert numerical == pytest.approx(forces[index, axis], rel=1e-5, abs=1e-7)


def test_rotation_equivariance_through_the_calculator():
    rotation = random_rotation(np.random.default_rng(7))
    sample = water_dimer(seed=4)
    atoms = as_atoms(sample)
    atoms.calc = MaskpotCalculator(TINY_EXPORT)
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.T
    rotated.calc = MaskpotCalculator(TINY_EXPORT)
    assert rotated.get_potential_energy() == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
    np.testing.assert_allclose(rotated.get_forces(), atoms.get_forces() @ rotation.T, atol=1e-10)

    box = as_atoms(water_box(seed=5))       # a periodic box: rotate positions and cell together
    box.calc = MaskpotCalculator(TINY_EXPORT)
    turned = box.copy()
    turned.set_cell(box.cell.array @ rotation.T, scale_atoms=False)
    turned.positions = box.positions @ rotation.T
    turned.calc = MaskpotCalculator(TINY_EXPORT)
    assert turned.get_potential_energy() == pytest.approx(box.get_potential_energy(), rel=1e-12)
    np.testing.assert_allclose(turned.get_forces(), box.get_forces() @ rotation.T, atol=1e-9)


def test_skin_reuses_the_list_only_while_it_stays_exact():
    atoms = as_atoms(water_box(seed=6))
    skinned = MaskpotCalculator(TINY_EXPORT, skin=0.5)
    fresh = MaskpotCalculator(TINY_EXPORT, skin=0.0)
    rng = np.random.default_rng(1)
    start = atoms.positions.copy()
    for step in range(6):                    # random walk, every atom moves < 0.25 Å in total up to step 4
        atoms.positions = start + rng.uniform(-0.04, 0.04, size=start.shape) * (step + 1)
        atoms.calc = skinned
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = fresh
        assert energy == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
        np.testing.assert_allclose(forces, atoms.get_forces(), atol=1e-10)
    assert fresh.neighbour_builds == 6
    assert 1 < skinned.neighbour_builds < 6   # reused while |Δr| < skin/2, rebuilt once an atom went further


def test_bad_settings_and_missing_export_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="float16.*valid"):
        MaskpotCalculator(TINY_EXPORT, dtype="float16")
    with pytest.raises(ValueError, match="skin"):
        MaskpotCalculator(TINY_EXPORT, skin=-1.0)
    with pytest.raises(FileNotFoundError, match="not a maskpot export"):
        MaskpotCalculator(tmp_path)


def test_a_model_object_is_copied_not_changed(model64):
    model = load_export(TINY_EXPORT)[0]
    calc = MaskpotCalculator(model, dtype="float64")
    assert next(model.parameters()).dtype == torch.float32
    assert next(calc.model.parameters()).dtype == torch.float64
    atoms = as_atoms(water_dimer())
    atoms.calc = calc
    assert np.isfinite(atoms.get_potential_energy())
