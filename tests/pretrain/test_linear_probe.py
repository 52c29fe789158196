"""Linear-probe validation (pretrain/probe.py): the ridge fit recovers a linear target, and a validation on
labelled shards logs finite probe figures next to the pretext val_loss (one rank, in-process)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers.pretraining import cfg_with


def test_ridge_probe_recovers_a_linear_target_and_not_noise(one_rank):
    from pretrain.probe import ridge_probe

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    w = torch.tensor([0.3, -0.2, 0.1, 0.05, 0.0], dtype=torch.float64)
    y = -156.0 + x @ w  # eV/atom: a large offset, as absolute DFT energies have
    exact = ridge_probe(x[0::2], y[0::2], x[1::2], y[1::2])
    assert exact["probe_energy_rmse_mev_per_atom"] < 1e-2
    assert exact["probe_baseline_rmse_mev_per_atom"] > 100.0
    assert exact["probe_frames"] == 64

    noise = torch.randn(64, 5, generator=g, dtype=torch.float64)  # features unrelated to y
    blind = ridge_probe(noise[0::2], y[0::2], noise[1::2], y[1::2])
    assert blind["probe_energy_rmse_mev_per_atom"] > 0.8 * blind["probe_baseline_rmse_mev_per_atom"]

    none = ridge_probe(x[:1], y[:1], x[1:2], y[1:2])  # one fitting frame: no fit
    assert math.isnan(none["probe_energy_rmse_mev_per_atom"]) and none["probe_frames"] == 1


@pytest.mark.parametrize("model, params", [
    ("egnn", {"hidden": 16, "layers": 2, "cutoff": 3.5}),
    ("forcenet", {"hidden": 16, "blocks": 2, "decoder_hidden": 16, "num_radial": 4, "cutoff": 3.4}),
])
def test_validation_logs_a_finite_probe_next_to_the_pretext_loss(one_rank, tiny_shards, tmp_path, model, params):
    from data_shards.manifest import load_manifest
    from pretrain import checkpoint as ckpt
    from pretrain.engine import build_engine
    from pretrain.loop import MetricsLog, keep_if_best, make_validator
    from pretrain.models import build_model

    manifest = load_manifest(tiny_shards)
    assert manifest["labelled"]
    from pretrain.config import ModelConfig

    cfg = cfg_with(data={"manifest_dir": str(tiny_shards)}, train={"out_dir": str(tmp_path), "val_batches": 4})
    cfg.model = ModelConfig(model, params)  # an override would merge params into the tiny EGNN's
    torch.manual_seed(0)
    module = build_model(cfg.model.name, cfg.model.params)
    module.set_normalisation(0.5, {1: -13.0, 8: -440.0})
    engine = build_engine(cfg, module)
    validate = make_validator(cfg, manifest, 0, 1)
    metrics = MetricsLog(tmp_path / "metrics.jsonl", 0, cfg)
    state = ckpt.TrainState(step=5)
    keep_if_best(state, validate(engine), metrics)
    metrics.close()
    assert engine.module.training  # validation leaves the engine in training mode
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 5 and math.isfinite(record["val_loss"]) and record["best_step"] == 5
    assert math.isfinite(record["probe_energy_rmse_mev_per_atom"]) and record["probe_energy_rmse_mev_per_atom"] > 0
    assert math.isfinite(record["probe_baseline_rmse_mev_per_atom"])
    assert record["probe_frames"] == 8  # 8 validation frames, half fitted, half scored

    off = cfg_with(data={"manifest_dir": str(tiny_shards)}, train={"out_dir": str(tmp_path), "linear_probe": False})
    off.model = cfg.model
    assert set(make_validator(off, manifest, 0, 1)(engine)) == {"val_loss"}
    unlabelled = make_validator(cfg, {**manifest, "labelled": False}, 0, 1)
    assert set(unlabelled(engine)) == {"val_loss"}
