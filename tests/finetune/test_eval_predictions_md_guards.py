"""`maskpot evaluate` writes predictions.extxyz (reference labels kept, maskpot_* predictions, per-atom force
errors); `maskpot md` warns then stops a run a bad model heats (issue 15 item 5)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from ase.io import read

from finetune.forcefield.calculator import MaskpotCalculator
from finetune.forcefield.md import MDConfig, run_md
from finetune.forcefield.md_guards import MDGuards, MDUnstable
from maskpot.cli import main
from pretrain.export import save_export
from pretrain.models import build_model


def _export(directory, energy_scale: float, seed: int = 5):
    torch.manual_seed(seed)
    model = build_model("egnn", {"hidden": 8, "layers": 2, "cutoff": 3.5})
    model.set_normalisation(energy_scale, {1: -10.0, 8: -20.0})
    meta = {"model": "egnn", "params": dataclasses.asdict(model.config),
            "species": [1, 8], "normalisation": {"energy_scale": energy_scale, "e0": {"1": -10.0, "8": -20.0}},
            "lineage": {"config_sha256": "c" * 64, "manifest_sha256": "m" * 64, "maskpot_version": "0.1.0",
                        "pretrain_objective": None, "steps": 0, "stage": "test"}}
    return save_export(model, directory, meta)


@pytest.fixture(scope="module")
def water(tmp_path_factory):
    from data_shards.tip3p import tip3p_frames, write_extxyz

    root = tmp_path_factory.mktemp("guards")
    frames = tip3p_frames(n_molecules=8, n_frames=4, seed=2, steps_between_frames=20, equilibration_steps=100)
    return root, write_extxyz(frames, root / "water.extxyz"), frames


def test_evaluate_writes_predictions_extxyz_matching_the_metrics(water, tmp_path, capsys):
    root, xyz, frames = water
    export_dir = _export(root / "sane", 0.7)
    out = tmp_path / "eval"
    assert main(["evaluate", str(export_dir), str(xyz), "--out", str(out), "--batch-size", "3"]) == 0
    assert "predictions.extxyz" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["predictions"] == "predictions.extxyz"
    pred = read(out / "predictions.extxyz", ":")
    assert len(pred) == len(frames)
    e_err, f_err = [], []
    for atoms, frame in zip(pred, frames, strict=True):
        np.testing.assert_allclose(atoms.positions, frame.positions, atol=1e-5)
        assert atoms.get_potential_energy() == pytest.approx(frame.energy, abs=1e-6)   # reference kept
        np.testing.assert_allclose(atoms.get_forces(), frame.forces, atol=1e-5)
        pe, pf = atoms.info["maskpot_energy"], atoms.arrays["maskpot_forces"]
        assert atoms.info["maskpot_energy_error_per_atom"] == pytest.approx((pe - frame.energy) / len(atoms), abs=1e-6)
        np.testing.assert_allclose(atoms.arrays["maskpot_force_error"], np.linalg.norm(pf - frame.forces, axis=1),
                                   atol=1e-5)
        check = atoms.copy()   # the stress column: the calculator's strain-derivative stress (eV/Å³)
        check.calc = MaskpotCalculator(str(export_dir))
        np.testing.assert_allclose(atoms.info["maskpot_stress"].reshape(3, 3), check.get_stress(voigt=False),
                                   rtol=1e-4, atol=1e-7)
        e_err.append((pe - frame.energy) / len(atoms))
        f_err.append(pf - frame.forces)
    assert metrics["energy_rmse_mev_per_atom"] == pytest.approx(1000 * np.sqrt(np.mean(np.square(e_err))), rel=1e-4)
    assert metrics["force_rmse_mev_per_a"] == pytest.approx(
        1000 * np.sqrt(np.mean(np.concatenate(f_err) ** 2)), rel=1e-4)


def test_md_stops_a_model_that_heats_the_system(water, tmp_path, capsys, caplog):
    """An export with random weights and an energy scale ~30× a sane one heats 300 K water: warned at 450 K,
    stopped past 600 K (measured: warning near step 25, stop near step 35 at ~604 K)."""
    root, xyz, _ = water
    bad = _export(root / "bad", 20.0)
    with caplog.at_level("WARNING", logger="finetune.md"):
        rc = main(["md", str(bad), str(xyz), "--steps", "300", "--temperature", "300", "--every", "5",
                   "--ensemble", "nve", "--out", str(tmp_path / "md.extxyz")])
    err = capsys.readouterr().err
    assert rc == 3, err
    line = [x for x in err.splitlines() if x.startswith("maskpot md:")][-1]
    assert "md stopped at step" in line and "temperature" in line and "--max-temperature" in line, line
    assert any("temperature" in r.message and "approaching" in r.message for r in caplog.records)
    assert read(tmp_path / "md.extxyz", ":")   # the trajectory up to the stop is kept
    # the same run with guards off goes on to the end
    from finetune.forcefield.calculator import MaskpotCalculator
    from finetune.forcefield.md import load_structure

    atoms = load_structure(xyz)
    result = run_md(atoms, MaskpotCalculator(bad), MDConfig(steps=40, temperature=300.0, every=5, ensemble="nve"),
                    tmp_path / "off.extxyz", MDGuards(enabled=False))
    assert result["steps"] == 40


def test_guards_warn_once_then_stop_with_the_option_named(water, caplog):
    from ase import Atoms

    atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.6]], cell=np.eye(3) * 8, pbc=True)
    guards = MDGuards(max_temperature=500.0, min_distance=0.5)
    with caplog.at_level("WARNING", logger="finetune.md"):
        guards.check(atoms, 10, 300.0, 0.0, 0.0, nve=False)       # 0.6 Å < 0.5/0.75: warned
        guards.check(atoms, 20, 300.0, 0.0, 0.0, nve=False)       # once
    assert sum("closest distance" in r.message for r in caplog.records) == 1
    atoms.positions[1, 2] = 0.3
    with pytest.raises(MDUnstable, match=r"step 30: closest distance 0.3 Å is past the limit 0.5 Å \(--min-distance\)"):
        guards.check(atoms, 30, 300.0, 0.0, 0.0, nve=False)
    with pytest.raises(MDUnstable, match="--max-drift"):
        MDGuards(max_drift=0.01).check(Atoms("H2", positions=[[0, 0, 0], [0, 0, 1.0]]), 5, 300.0, 1.0, 0.0, nve=True)
    with pytest.raises(ValueError, match="--max-temperature"):
        MDGuards(max_temperature=-1.0)
