"""Finetuning a few-shot user can trust: energies of a finetuned small molecule (ethanol, rMD17) beat the
constant predictor, the energy zero does not drift, exports of the best and the last step, a test split on
another energy zero is reported, `evaluate` gives the offset-corrected energy error, threads and selection."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator

from data_shards.build import build_shards
from data_shards.config_io import load_config
from finetune import energy as E
from finetune.config import FinetuneConfig
from finetune.forcefield import metrics as M
from finetune.forcefield.evaluate import evaluate_model
from finetune.loop import run_finetune
from pretrain.export import read_meta

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "finetune" / "tiny.yaml"


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def ethanol_shards(root: Path, shared: Path, train: int, test: int, shift_test: float = 0.0) -> Path:
    src = shared / "ethanol_rmd17"
    ase.io.write(root / "train.xyz", ase.io.read(src / "train.xyz", f":{train}"), format="extxyz")
    frames = ase.io.read(src / "test_MD.xyz", f":{test}")
    for atoms in frames:   # optionally move the test set to another energy zero
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy() + shift_test * len(atoms),
                                           forces=atoms.get_forces())
    ase.io.write(root / "test.xyz", frames, format="extxyz")
    out = root / "shards"
    # the shuffled split is seeded by (split_seed, the input path as given): a relative path, the same in
    # every run, keeps the train/val frames (and so the result) the same from run to run
    here = os.getcwd()
    os.chdir(root)
    try:
        build_shards(["train.xyz", "test=test.xyz"], out, shard_size=100, split_fractions=(0.75, 0.25, 0.0),
                     use_ray=False, progress=False, split_mode="shuffled")
    finally:
        os.chdir(here)
    return out


def config(shards: Path, out: Path, steps: int, **train) -> FinetuneConfig:
    return load_config(FinetuneConfig, TINY, {
        "data": {"manifest_dir": str(shards), "batch_size": 4, "train_frames": 50},
        "model": {"name": "egnn", "params": {"hidden": 16, "layers": 2, "cutoff": 4.0}},
        "optim": {"lr": 5e-3, "warmup_steps": 10, "min_lr": 5e-4},
        "train": {"max_steps": steps, "val_every": 50, "out_dir": str(out), **train},
        "tracking": {"enabled": False}})


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_finetuned_ethanol_energies_beat_the_constant_predictor(shared_data, tmp_path):
    shards = ethanol_shards(tmp_path, shared_data, train=200, test=100)
    results = run_finetune(config(shards, tmp_path / "ft", 600))
    test_energy = np.array([a.get_potential_energy() / len(a) for a in ase.io.read(tmp_path / "test.xyz", ":")])
    constant = 1000 * float(test_energy.std())       # the best constant per-atom energy, chosen on the test set
    # 600 steps measured 8.5 vs 17.7 meV/atom here; at 300 steps the margin was ~10% and machine-dependent
    assert results["test"][M.ENERGY_RMSE] < 0.75 * constant, (results["test"], constant)
    assert results["test"][M.FORCE_RMSE] < 0.7 * results["history"][0][M.FORCE_RMSE]   # forces learnt too
    # the energy zero is refitted: no validation jumps by a multiple of the one before it (the issue saw
    # 51 -> 5 -> 66 -> 5 meV/atom); a steady descent is allowed
    energies = [h[M.ENERGY_RMSE] for h in results["history"]]
    assert max(b / a for a, b in zip(energies, energies[1:])) < 1.5, energies
    assert results["energy_offset_refit"]["frames"] == 50
    assert abs(results["energy_offset_refit"]["mean_error_before_mev_per_atom"]) > constant  # it was needed
    # best and last step exported; each export's E0 is the model's own (refitted), so a reload predicts the same
    for name in ("export", "export_last"):
        meta = read_meta(tmp_path / "ft" / name)
        assert set(meta["normalisation"]["e0"]) == {"1", "6", "8"}
    summary = evaluate_model(tmp_path / "ft" / "export", shards, tmp_path / "eval", split="test")
    assert summary[M.ENERGY_RMSE] == pytest.approx(results["test"][M.ENERGY_RMSE], rel=1e-4)
    assert summary[M.ENERGY_RMSE_CORRECTED] <= summary[M.ENERGY_RMSE] + 1e-9
    assert (tmp_path / "ft" / "export_last" / "model.safetensors").is_file()


@pytest.mark.needs_shared_data
def test_a_test_split_on_another_energy_zero_is_warned_and_evaluate_reports_both(shared_data, tmp_path, caplog):
    shards = ethanol_shards(tmp_path, shared_data, train=80, test=12, shift_test=-5.0)   # 5 eV/atom off
    caplog.set_level(logging.WARNING, logger="finetune")
    results = run_finetune(config(shards, tmp_path / "ft", 2, val_every=1, select="energy", threads=1))
    warned = [r.getMessage() for r in caplog.records if "another energy zero" in r.getMessage()]
    assert len(warned) == 1 and "split 'test'" in warned[0]
    assert torch.get_num_threads() == 1 and results["select"] == "energy"
    picked = min(results["history"], key=lambda h: h[M.ENERGY_RMSE])
    assert results["best_step"] == picked["step"]
    summary = evaluate_model(tmp_path / "ft" / "export", shards, tmp_path / "eval", split="test")
    assert summary[M.ENERGY_RMSE] > 4000                 # the raw error is the 5 eV/atom offset ...
    assert summary[M.ENERGY_OFFSET] == pytest.approx(5000, rel=0.05)
    assert summary[M.ENERGY_RMSE_CORRECTED] < 200        # ... the offset-corrected one is the model's own
    assert "offset-corrected" in (tmp_path / "eval" / "metrics.md").read_text()


def test_energy_loss_scale_and_selection_score():
    manifest = {"stats": {"energy_per_atom_std": 0.01}}
    assert E.energy_loss_scale(manifest, "force_scale", 1.0) == 1.0
    assert E.energy_loss_scale(manifest, "energy_std", 1.0) == 0.01
    assert E.energy_loss_scale(manifest, "annealed", 1.0, 0.0) == pytest.approx(1.0)
    assert E.energy_loss_scale(manifest, "annealed", 1.0, 0.5) == pytest.approx(0.1)
    assert E.energy_loss_scale(manifest, "annealed", 1.0, 1.0) == pytest.approx(0.01)
    assert E.energy_loss_scale({"stats": {"energy_per_atom_std": 0.0}}, "energy_std", 1.0) == E.MIN_ENERGY_STD
    figures = {M.ENERGY_RMSE: 10.0, M.FORCE_RMSE: 500.0}
    assert E.selection_score(figures, "force", 0.01, 1.0, 1.0, 1.0) == 500.0
    assert E.selection_score(figures, "energy", 0.01, 1.0, 1.0, 1.0) == 10.0
    assert E.selection_score(figures, "weighted", 0.01, 1.0, 1.0, 1.0) == pytest.approx((1.0 + 0.5) / 2)


def test_bad_options_name_the_setting():
    with pytest.raises(ValueError, match=r"train.select 'best' is not one of \['force', 'energy', 'weighted'\]"):
        load_config(FinetuneConfig, TINY, {"train": {"select": "best"}})
    with pytest.raises(ValueError, match="train.threads must be"):
        load_config(FinetuneConfig, TINY, {"train": {"threads": -1}})
    with pytest.raises(ValueError, match="loss.energy_normalisation 'std'"):
        load_config(FinetuneConfig, TINY, {"loss": {"energy_normalisation": "std"}})


def test_threads_default_follows_omp_num_threads(monkeypatch):
    cfg = load_config(FinetuneConfig, TINY, {})
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cfg.train.resolved_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cfg.train.resolved_threads() == 1
    assert load_config(FinetuneConfig, TINY, {"train": {"threads": 0}}).train.resolved_threads() == 0


