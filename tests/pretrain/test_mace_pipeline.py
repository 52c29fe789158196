"""MACE through the whole chain: every pretext objective on real shards, DeepSpeed pretraining on 2 ranks
(`maskpot pretrain`), export → finetune from it → ASE calculator (energy, forces, stress) → NVT and NPT MD."""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data_shards import keys as K
from data_shards.config_io import from_dict
from pretrain.config import PretrainConfig
from pretrain.models import build_model
from pretrain.models.mace import mace_modules

pytestmark = pytest.mark.skipif(mace_modules() is None,
                                reason="mace-torch is not installed (pip install 'maskpot[mace]')")
REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "pretrain" / "tiny.yaml"
SMALL = {"num_channels": 8, "max_L": 1, "correlation": 2, "num_interactions": 2, "max_ell": 2, "r_max": 3.5,
         "radial_MLP": [16], "MLP_irreps": "8x0e", "avg_num_neighbors": 10.0, "elements": [1, 8]}


class Engine:
    """What `pretext_loss` needs of a DeepSpeed engine: a callable with `.module`."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("kind", ["mask", "hmask", "denoise", "mask+denoise", "supervised"])
def test_every_pretext_objective_trains_mace(water_shards, kind):
    from pretrain.loop import make_stream, pretext_loss

    data = yaml.safe_load(TINY.read_text())
    data["data"]["manifest_dir"] = str(water_shards)
    data["model"] = {"name": "mace", "params": SMALL}     # replaced, not merged with the EGNN params
    data["objective"]["kind"] = kind
    cfg = from_dict(PretrainConfig, data, "test config")
    torch.manual_seed(0)
    model = build_model("mace", SMALL).train()
    model.set_normalisation(0.8, {})
    batch = next(iter(make_stream(cfg, "train", 0, 1)))
    if "mask" in kind:
        assert int(batch[K.MASK_FLAG].sum()) > 0
    loss = pretext_loss(cfg, Engine(model), batch)
    assert math.isfinite(float(loss)) and float(loss) > 0
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    assert any(n.startswith("mace.interactions.") for n in grads)   # the backbone learns, not just the head


def test_r_max_below_nearest_neighbour_distance_exits_2_naming_it(water_shards, tmp_path, capsys):
    from maskpot.cli import main

    config = tmp_path / "bad.yaml"
    data = yaml.safe_load(TINY.read_text())
    data["data"]["manifest_dir"] = str(water_shards)
    data["model"] = {"name": "mace", "params": {**SMALL, "r_max": 0.5}}
    config.write_text(yaml.safe_dump(data))
    assert main(["pretrain", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.params.r_max 0.5 Å is not larger than the nearest-neighbour distance" in err[0]


@pytest.mark.slow
def test_two_rank_pretraining_export_finetune_calculator_md(water_shards, tmp_path):
    from ase import Atoms
    from ase.calculators.fd import calculate_numerical_stress

    from finetune.forcefield.calculator import MaskpotCalculator
    from finetune.forcefield.md import MDConfig, read_log, run_md
    from finetune.forcefield.md_guards import MDGuards
    from pretrain.cli import add_command
    from pretrain.export import load_export

    config = tmp_path / "pretrain.yaml"
    data = yaml.safe_load(TINY.read_text())
    data["model"] = {"name": "mace", "params": SMALL}
    config.write_text(yaml.safe_dump(data))
    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers())
    out = tmp_path / "pretrain"
    args = parser.parse_args(["pretrain", "--config", str(config), "--nproc", "2", "--resume", "never",
                              "--override", f"data.manifest_dir={water_shards}", f"train.out_dir={out}",
                              "train.max_steps=6", "train.val_every=3", "train.checkpoint_every=3"])
    assert args.func(args) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert any("probe_energy_rmse_mev_per_atom" in r for r in rows)   # the linear probe hooks MACE's readout
    _, meta = load_export(out / "export")
    assert meta["model"] == "mace" and meta["params"]["r_max"] == SMALL["r_max"]

    from data_shards.config_io import from_dict, merge
    from finetune.config import FinetuneConfig
    from finetune.loop import run_finetune

    ft = merge(yaml.safe_load((REPO / "configs" / "finetune" / "tiny.yaml").read_text()), {
        "data": {"manifest_dir": str(water_shards), "batch_size": 4}, "init": str(out / "export"),
        "train": {"max_steps": 6, "val_every": 3, "log_every": 3, "out_dir": str(tmp_path / "finetune")},
        "tracking": {"enabled": False}})
    results = run_finetune(from_dict(FinetuneConfig, ft, "finetune config"))
    assert math.isfinite(results["test"]["force_rmse_mev_per_a"])
    export = tmp_path / "finetune" / "export"
    assert json.loads((export / "model.json").read_text())["model"] == "mace"

    from data_shards.readers import read_frames

    frame = read_frames(min((water_shards.parent / "data").glob("*xyz")))[0]
    atoms = Atoms(numbers=frame.species, positions=frame.positions, cell=frame.cell, pbc=True)
    atoms.calc = MaskpotCalculator(export)
    np.testing.assert_allclose(atoms.get_stress(), calculate_numerical_stress(atoms, eps=1e-5), rtol=1e-4,
                               atol=1e-9)
    for ensemble in ("langevin", "npt"):
        result = run_md(atoms.copy(), MaskpotCalculator(export, skin=0.5),
                        MDConfig(10, 300.0, 0.5, ensemble, every=5, pdamp=50.0), tmp_path / f"{ensemble}.extxyz",
                        MDGuards(enabled=False))   # a 6-step model: its physics is not what is tested
        log = read_log(result["log"])
        assert len(log) == 3 and np.isfinite(log["etot_eV"]).all() and np.isfinite(log["density_g_cm3"]).all()
