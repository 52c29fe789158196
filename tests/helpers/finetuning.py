"""Finetuning test helpers: the tiny config with overrides, a force-dominated recipe that visibly learns,
labelled TIP3P water shards, and an export of a freshly initialised EGNN to finetune from."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from data_shards.build import build_shards
from data_shards.config_io import load_config, merge
from data_shards.tip3p import generate_tip3p
from finetune.config import FinetuneConfig
from pretrain.export import load_export, save_export
from pretrain.models import build_model
from tests.helpers.paths import FINETUNE_TINY

# Force-dominated loss, constant lr: the tiny EGNN's force RMSE visibly drops within 40 steps.
LEARNS = {"optim": {"lr": 1e-2, "schedule": "constant", "warmup_steps": 2},
          "loss": {"energy_weight": 0.1, "force_weight": 10.0},
          "data": {"batch_size": 4}, "train": {"max_steps": 40, "val_every": 10, "log_every": 5}}


def cfg_with(*sections: dict) -> FinetuneConfig:
    merged: dict = {}
    for s in sections:
        merged = merge(merged, s)
    return load_config(FinetuneConfig, FINETUNE_TINY, merged)


def where(shards: Path, out_dir: Path, tracking: bool = False) -> dict:
    return {"data": {"manifest_dir": str(shards)}, "train": {"out_dir": str(out_dir)},
            "tracking": {"enabled": tracking}}


def build_tip3p_shards(root: Path, fractions) -> Path:
    """40 flexible-TIP3P frames of 8 H2O (OpenMM) under root/data, sharded 8 per shard into root/shards."""
    xyz = generate_tip3p(root / "data", n_molecules=8, n_frames=40, seed=3, steps_between_frames=20,
                         equilibration_steps=200, progress=False)
    out = root / "shards"
    build_shards([str(xyz)], str(out), shard_size=8, split_fractions=fractions, use_ray=False, progress=False)
    return out


def export_fresh_model(directory: Path, params: dict, lineage: dict | None = None) -> Path:
    torch.manual_seed(123)
    model = build_model("egnn", params)
    meta = {"model": "egnn", "params": dataclasses.asdict(model.config), "species": [1, 8],
            "normalisation": {"energy_scale": 1.0, "e0": {}},
            "lineage": lineage or {"config_sha256": "c" * 64, "manifest_sha256": "m" * 64,
                                   "maskpot_version": "0.1.0", "pretrain_objective": "mask", "steps": 7}}
    return save_export(model, directory, meta)


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def exported_params(directory) -> dict[str, torch.Tensor]:
    return params_of(load_export(directory)[0])
