"""`init:` from a DeepSpeed training checkpoint of pretraining (one rank, ZeRO 0, fp32) instead of an export."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.finetuning import cfg_with, where
from tests.helpers.pretraining import cfg_with as pretrain_cfg

ARCH = {"hidden": 8, "layers": 1, "cutoff": 3.0}


@pytest.fixture
def pretrain_run(one_rank, water_shards, tmp_path):
    """A pretrain run folder with one checkpoint (step 3) of an EGNN; returns (run folder, module weights)."""
    from data_shards.manifest import load_manifest
    from pretrain import checkpoint as ckpt
    from pretrain.engine import build_engine
    from pretrain.export import normalisation_from_stats
    from pretrain.models import build_model

    run = tmp_path / "pretrain"
    cfg = pretrain_cfg(model={"name": "egnn", "params": ARCH}, train={"out_dir": str(run), "max_steps": 20},
                       data={"manifest_dir": str(water_shards)})
    torch.manual_seed(5)
    model = build_model("egnn", ARCH)
    norm = normalisation_from_stats(load_manifest(water_shards))
    model.set_normalisation(norm["energy_scale"], {int(z): v for z, v in norm["e0"].items()})
    engine = build_engine(cfg, model, run)
    ckpt.save_checkpoint(engine, run, ckpt.TrainState(step=3), cfg, ckpt.manifest_sha256(water_shards), keep_last=2)
    return run, {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def test_checkpoint_folders_load_its_weights_and_architecture(pretrain_run, water_shards, tmp_path):
    from finetune.inputs import check_inputs
    from finetune.loop import make_model

    run, weights = pretrain_run
    tag = run / "checkpoints" / "step00000003"
    for init in (run, run / "checkpoints", tag):
        cfg = cfg_with(where(water_shards, tmp_path / "ft"), {"init": str(init)})
        inputs = check_inputs(cfg)
        assert inputs.init_meta["lineage"]["checkpoint"] == str(tag) and inputs.init_meta["species"] == [1, 8]
        model, arch = make_model(cfg, inputs)
        assert arch == {"model": "egnn", "params": {**model.config.__dict__}, "cutoff": 3.0}
        assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_finetune_from_a_checkpoint_records_it(pretrain_run, water_shards, tmp_path):
    from data_shards.manifest import file_sha256
    from finetune.loop import run_finetune

    run, _ = pretrain_run
    tag = run / "checkpoints" / "step00000003"
    out = tmp_path / "ft"
    results = run_finetune(cfg_with(where(water_shards, out), {"init": str(run)},
                                    {"data": {"train_frames": 8}, "train": {"max_steps": 2, "val_every": 2}}))
    assert results["init_sha256"] == file_sha256(tag / "mp_rank_00_model_states.pt")
    meta = json.loads((out / "export" / "model.json").read_text())
    assert meta["params"]["hidden"] == 8 and meta["params"]["cutoff"] == 3.0 and "cutoff" not in meta
    assert meta["lineage"]["init_lineage"]["checkpoint"] == str(tag) and meta["lineage"]["init_lineage"]["steps"] == 3


def test_bf16_checkpoints_and_non_checkpoints_are_refused(pretrain_run, water_shards, tmp_path):
    from finetune.inputs import check_inputs

    run, _ = pretrain_run
    state = run / "checkpoints" / "step00000003" / "state.json"
    record = json.loads(state.read_text())
    record["config"]["deepspeed.precision"] = "bf16"
    state.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"bf16 checkpoint.*export"):
        check_inputs(cfg_with(where(water_shards, tmp_path / "ft"), {"init": str(run)}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a maskpot export"):
        check_inputs(cfg_with(where(water_shards, tmp_path / "ft"), {"init": str(tmp_path / "empty")}))
