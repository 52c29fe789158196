"""Replay of pretraining structures during finetuning (`replay:`): config validation, the objective's
resolution, the pretext loss at the pretraining corpus's scale, and tiny real finetunes that mix an
unlabelled TIP3P corpus into the labelled one."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from data_shards.config_io import ConfigError
from finetune import replay as R
from tests.helpers.finetuning import LEARNS, cfg_with, export_fresh_model, exported_params, where

SHORT = {"data": {"train_frames": 8}, "train": {"max_steps": 4, "val_every": 2}}


@pytest.fixture(scope="session")
def pretrain_corpus(tmp_path_factory) -> Path:
    """16 unlabelled flexible-TIP3P frames of 8 H2O (another seed than the finetune set): 8 train / 8 val."""
    from ase.io import read, write

    from data_shards.build import build_shards
    from data_shards.manifest import load_manifest
    from data_shards.tip3p import generate_tip3p

    root = tmp_path_factory.mktemp("replay_corpus")
    xyz = generate_tip3p(root / "data", n_molecules=8, n_frames=16, seed=11, steps_between_frames=20,
                         equilibration_steps=200, progress=False)
    frames = read(xyz, ":")
    for atoms in frames:
        atoms.calc = None
        atoms.info.pop("energy", None)
        atoms.arrays.pop("forces", None)
    bare = root / "bare.extxyz"
    write(bare, frames, format="extxyz")
    out = root / "shards"
    build_shards([str(bare)], str(out), shard_size=4, split_fractions=(0.5, 0.5, 0.0), require_labels=False,
                 use_ray=False, progress=False)
    assert not load_manifest(out)["labelled"]
    return out


def replay_on(corpus: Path, **keys) -> dict:
    return {"replay": {"manifest_dir": str(corpus), **keys}}


# --- config ------------------------------------------------------------------------------------------

def test_replay_is_off_by_default_and_its_keys_are_checked_only_when_on():
    cfg = cfg_with({})
    assert cfg.replay.manifest_dir is None
    assert cfg_with({"replay": {"fraction": 0.1}}).replay.fraction == 0.1   # off: nothing to round
    on = cfg_with(replay_on(Path("/corpus"), fraction=0.5), {"data": {"batch_size": 4}})
    assert on.replay.batch_size(on.data.batch_size) == 2


@pytest.mark.parametrize("sections, expected", [
    (replay_on(Path("/c"), fraction=0.0), ["replay.fraction", "> 0"]),
    (replay_on(Path("/c"), fraction=float("inf")), ["replay.fraction", "finite"]),
    (replay_on(Path("/c"), weight=0.0), ["replay.weight", "> 0", "replay.manifest_dir: null"]),
    (replay_on(Path("/c"), weight=-1.0), ["replay.weight"]),
    ({**replay_on(Path("/c"), fraction=0.2), "data": {"batch_size": 2}}, ["rounds to 0", "at least 0.25"]),
    (replay_on(Path("/c"), split="holdout"), ["replay.split", "holdout", "'train'"]),
    ({"replay": {"manifest_dir": ""}}, ["replay.manifest_dir", "null"]),
    (replay_on(Path("/c"), objective={"kind": "supervised"}), ["not a pretext task", "'hmask'"]),
    (replay_on(Path("/c"), objective={"kind": "jigsaw"}), ["replay.objective", "jigsaw", "'mask'"]),
    (replay_on(Path("/c"), objective={"mask_ratoi": 0.3}), ["replay.objective", "mask_ratoi", "mask_ratio"]),
    (replay_on(Path("/c"), objective={"mask_ratio": 1.5}), ["replay.objective", "mask_ratio", "(0, 1]"]),
    (replay_on(Path("/c"), share=0.3), ["share", "fraction"]),
])
def test_bad_replay_config_fails_naming_the_key(sections, expected):
    with pytest.raises(ConfigError) as err:
        cfg_with(sections)
    for text in expected:
        assert text in str(err.value)


@pytest.mark.parametrize("objective, lineage, kind, source", [
    ({"kind": "denoise", "noise_sigma": 0.1}, "mask", "denoise", "replay.objective.kind"),
    ({"mask_ratio": 0.25}, "hmask", "hmask", "init lineage"),
    ({}, None, "mask", "default"),
])
def test_objective_comes_from_the_config_then_the_init_lineage_then_mask(objective, lineage, kind, source):
    cfg = cfg_with(replay_on(Path("/c"), objective=objective))
    meta = None if lineage is None else {"lineage": {"pretrain_objective": lineage}}
    got, where_from = R.resolve_objective(cfg, meta)
    assert (got.kind, where_from) == (kind, source)
    assert got.mask_ratio == objective.get("mask_ratio", 0.5)


def test_supervised_init_lineage_needs_an_explicit_kind():
    cfg = cfg_with(replay_on(Path("/c")), {"init": "/some/export"})
    with pytest.raises(ValueError, match=r"pretrained with objective 'supervised'.*replay.objective.kind"):
        R.resolve_objective(cfg, {"lineage": {"pretrain_objective": "supervised"}})


def test_empty_replay_split_fails_before_anything_is_written(water_shards, pretrain_corpus, tmp_path):
    from finetune.loop import run_finetune

    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"replay split 'test' is empty"):
        run_finetune(cfg_with(where(water_shards, out), replay_on(pretrain_corpus, split="test")))
    assert not out.exists()


# --- the loss ----------------------------------------------------------------------------------------

def test_replay_loss_is_the_pretext_loss_at_the_pretraining_corpus_scale(water_shards, pretrain_corpus):
    from pretrain.models import build_model
    from pretrain.objectives import cosine_mask_loss, denoise_loss

    cfg = cfg_with({"data": {"manifest_dir": str(water_shards), "batch_size": 4}},
                   replay_on(pretrain_corpus, fraction=0.5, objective={"kind": "mask+denoise"}))
    plan = R.check_replay(cfg, None)
    assert (plan.batch_size, plan.samples, plan.energy_scale, plan.objective.kind) == (2, 8, 1.0, "mask+denoise")
    torch.manual_seed(0)
    model = build_model("egnn", {"hidden": 8, "layers": 1, "cutoff": 3.5})
    model.set_normalisation(40.0, {})                   # a finetune scale unlike the corpus's 1.0
    got = R.Replay(cfg, plan, 3.5).loss(model, torch.device("cpu"))

    batch = next(R.Replay(cfg, plan, 3.5).batches)     # same seed, same first batch
    assert batch.num_graphs == 2 and int(batch["mask_flag"].sum()) > 0
    as_pretrained = copy.deepcopy(model)
    as_pretrained.set_normalisation(plan.energy_scale, {})
    pred = as_pretrained(batch, compute_forces=True)["pred_forces"]
    expected = (cosine_mask_loss(pred, batch["mask_target"], batch["mask_flag"])
                + denoise_loss(pred, batch["noise_target"]))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    unscaled = model(batch, compute_forces=True)["pred_forces"]    # the finetune scale would give another loss
    assert denoise_loss(unscaled, batch["noise_target"]).item() > 1.5 * denoise_loss(pred, batch["noise_target"]).item()


# --- real finetunes ----------------------------------------------------------------------------------

def test_finetune_with_replay_logs_the_pretext_loss_and_changes_the_weights(water_shards, pretrain_corpus,
                                                                           tmp_path):
    from mlflow import MlflowClient

    from finetune.loop import run_finetune

    init = export_fresh_model(tmp_path / "pretrained", {"hidden": 8, "layers": 1, "cutoff": 3.5})
    plain = run_finetune(cfg_with(where(water_shards, tmp_path / "plain"), LEARNS, SHORT, {"init": str(init)}))
    out = tmp_path / "replay"
    mixed = run_finetune(cfg_with(where(water_shards, out, tracking=True), LEARNS, SHORT, {"init": str(init)},
                                  replay_on(pretrain_corpus, fraction=0.5, weight=1.0)))
    assert plain["replay"] is None
    replay = mixed["replay"]
    assert json.loads((out / "results.json").read_text())["replay"] == replay
    assert replay["steps"] == 4 and replay["structures_per_step"] == 2 and replay["weight"] == 1.0
    assert (replay["objective"], replay["objective_source"]) == ("mask", "init lineage")
    assert math.isfinite(replay["mean_loss"]) and 0.0 < replay["mean_loss"] < 2.0   # 1 - cosine

    client = MlflowClient(mixed["tracking"]["tracking_uri"])
    logged = client.get_metric_history(mixed["tracking"]["run_id"], "train/replay_loss")
    assert [m.step for m in logged] == [1, 2, 3, 4]
    assert sum(m.value for m in logged) / 4 == pytest.approx(replay["mean_loss"])

    assert mixed["history"][0] == plain["history"][0]          # same start, then replay changes the path
    a, b = exported_params(tmp_path / "plain" / "export"), exported_params(out / "export")
    assert any(not torch.equal(a[n], b[n]) for n in a)
    assert mixed["history"][-1]["force_rmse_mev_per_a"] != plain["history"][-1]["force_rmse_mev_per_a"]
