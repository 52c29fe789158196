"""Calculator stress (strain derivative) against ASE's finite differences, a short MTK NPT run of a small
water box whose stress is checked against finite differences along the trajectory, and the refusals."""
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_stress
from ase.io import read, write

from data_shards import keys as K
from finetune.forcefield.calculator import MaskpotCalculator
from finetune.forcefield.md import MDConfig, density_g_cm3, read_log, run_md
from finetune.forcefield.md_guards import MDGuards
from maskpot.cli import main
from pretrain.models import build_model
from pretrain.models.mace import mace_modules
from tests.helpers.water_systems import water_box

TINY_EXPORT = Path(__file__).resolve().parents[1] / "assets" / "egnn_tiny_export"
MACE = {"num_channels": 8, "max_L": 1, "correlation": 2, "num_interactions": 2, "max_ell": 2, "r_max": 3.5,
        "radial_MLP": [16], "MLP_irreps": "8x0e", "avg_num_neighbors": 10.0, "elements": [1, 8]}


def box_atoms(n: int = 8, seed: int = 2, shear: bool = False) -> Atoms:
    sample = water_box(n, seed=seed)
    atoms = Atoms(numbers=sample[K.SPECIES], positions=sample[K.POSITIONS], cell=sample[K.CELL], pbc=True)
    if shear:
        cell = atoms.cell.array.copy()
        cell[1, 0] += 0.6
        cell[2] += [-0.4, 0.3, 0.2]
        atoms.set_cell(cell, scale_atoms=True)
    return atoms


def mace_calculator() -> MaskpotCalculator:
    torch.manual_seed(0)
    model = build_model("mace", MACE)
    model.set_normalisation(0.5, {1: -13.6, 8: -432.0})
    return MaskpotCalculator(model)


CALCULATORS = [pytest.param(lambda: MaskpotCalculator(TINY_EXPORT), id="egnn"),
               pytest.param(mace_calculator, id="mace",
                            marks=pytest.mark.skipif(mace_modules() is None, reason="mace-torch not installed"))]


@pytest.mark.parametrize("make_calc", CALCULATORS)
@pytest.mark.parametrize("shear", [False, True], ids=["cubic", "triclinic"])
def test_calculator_stress_equals_ase_numerical_stress(make_calc, shear):
    atoms = box_atoms(shear=shear)
    atoms.calc = make_calc()
    assert "stress" in atoms.calc.implemented_properties
    stress = atoms.get_stress()                       # Voigt xx yy zz yz xz xy, eV/Å³
    expected = calculate_numerical_stress(atoms, eps=1e-5)
    assert np.abs(expected).max() > 1e-6, "no strain dependence: the test is empty"
    np.testing.assert_allclose(stress, expected, rtol=1e-5, atol=1e-10)
    assert stress.shape == (6,)


def test_force_centric_model_has_no_stress_and_no_npt(tmp_path):
    model = build_model("gns", {"latent": 8, "mlp_layers": 1, "steps": 1, "cutoff": 3.5})
    calc = MaskpotCalculator(model)
    assert "stress" not in calc.implemented_properties
    atoms = box_atoms()
    atoms.calc = calc
    with pytest.raises(PropertyNotImplementedError, match=r"energy-centric model.*GNS is force-centric") as info:
        atoms.get_stress()
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"--ensemble npt needs the stress, which GNS \(force-centric\)"):
        run_md(box_atoms(), calc, MDConfig(5, ensemble="npt"), tmp_path / "npt.extxyz")


def test_stress_needs_a_3d_periodic_cell():
    atoms = box_atoms()
    atoms.pbc = (True, True, False)
    atoms.calc = MaskpotCalculator(TINY_EXPORT)
    with pytest.raises(PropertyNotImplementedError, match=r"periodic in 3D.*pbc=\[True, True, False\]"):
        atoms.get_stress()


def test_density_of_a_water_box():
    atoms = box_atoms(n=8)   # water_box packs molecules at liquid density
    assert density_g_cm3(atoms) == pytest.approx(0.997, abs=0.01)


@pytest.mark.parametrize("make_calc", CALCULATORS)
def test_short_npt_run_changes_volume_and_its_stress_matches_finite_differences(make_calc, tmp_path):
    atoms = box_atoms(n=8, seed=5)
    calc = make_calc()
    cfg = MDConfig(40, temperature=300.0, timestep=0.5, ensemble="npt", every=10, pdamp=50.0, tdamp=25.0)
    # untrained models: the safety checks (which would stop on close contacts) are not what is tested here
    result = run_md(atoms, calc, cfg, tmp_path / "npt.extxyz", MDGuards(enabled=False))
    log = read_log(result["log"])
    assert len(log) == 5 and np.isfinite(log["density_g_cm3"]).all()
    assert np.ptp(log["volume_A3"]) > 1e-3, "the barostat never changed the cell"
    np.testing.assert_allclose(log["density_g_cm3"] * log["volume_A3"], log["density_g_cm3"][0] * log["volume_A3"][0],
                               rtol=1e-7)              # mass conserved: ρV constant (log keeps 8 digits)
    assert result["final_density_g_cm3"] == pytest.approx(log["density_g_cm3"][-1])
    frames = read(tmp_path / "npt.extxyz", index=":")
    for frame in frames[1:]:       # along the trajectory, in cells the barostat produced
        check = Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=True)
        check.calc = make_calc()
        np.testing.assert_allclose(check.get_stress(), calculate_numerical_stress(check, eps=1e-5),
                                   rtol=1e-5, atol=1e-10)


@pytest.mark.slow
def test_md_cli_npt_prints_density(tmp_path, capsys):
    start = tmp_path / "box.extxyz"
    atoms = box_atoms(n=8, seed=6)
    write(start, atoms)
    out = tmp_path / "npt.extxyz"
    assert main(["md", str(TINY_EXPORT), str(start), "--ensemble", "npt", "--steps", "20", "--every", "10",
                 "--temperature", "300", "--pdamp", "50", "--no-guards", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"density {density_g_cm3(atoms):.4f} → " in printed and "g/cm³ (mean over the second half" in printed
    assert len(read_log(out.with_suffix(".log"))) == 3


def test_evaluate_reports_stress_rmse_when_labels_carry_stress():
    from data_shards.graph import collate, sample_to_data
    from finetune.forcefield import metrics as M
    from pretrain.export import load_export
    from pretrain.models.strain import energy_forces_stress

    model, _ = load_export(TINY_EXPORT)
    model = model.double()
    datas = []
    for seed in (2, 3):
        sample = water_box(8, seed=seed, labelled=True)
        data = sample_to_data(sample, 3.5, torch.float64)
        predicted = energy_forces_stress(model, collate([data]))[K.PRED_STRESS]
        data[K.STRESS] = predicted + 0.002          # every component off by 2 meV/Å³
        datas.append(data)
    result = M.evaluate(model, [collate(datas)])
    assert result[M.STRESS_RMSE] == pytest.approx(2.0, rel=1e-6)
    assert result[M.ARRAYS]["stress_pred"].shape == (2, 3, 3)
    unlabelled = M.evaluate(model, [collate([sample_to_data(water_box(8, seed=2, labelled=True), 3.5)])])
    assert M.STRESS_RMSE not in unlabelled
