"""Finetuning stage: config validation, metrics, tiny real finetunes on generated TIP3P water shards (from
scratch and from an export), the best-model bookkeeping, tracking fallback when the server is down, the CLI."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_shards.config_io import ConfigError, load_config
from finetune.config import FinetuneConfig
from finetune.forcefield import metrics as M
from tests.helpers.finetuning import LEARNS, build_tip3p_shards, cfg_with, export_fresh_model, where
from tests.helpers.net import free_port
from tests.helpers.paths import FINETUNE_TINY

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- config ------------------------------------------------------------------------------------------

def test_tiny_config_loads():
    cfg = load_config(FinetuneConfig, FINETUNE_TINY)
    assert cfg.model.cutoff == 3.5 and cfg.init is None
    assert cfg.tracking.resolved_uri("/x/run") == "sqlite:////x/run/mlflow.db"


@pytest.mark.parametrize("sections, expected", [
    ({"train": {"max_stepz": 3}}, ["max_stepz", "max_steps"]),
    ({"data": {"val_split": ""}}, ["val_split", "empty", "'train', 'val', 'test'"]),
    ({"data": {"test_split": "holdout"}}, ["holdout", "'test'"]),
    ({"tracking": {"uri": "sqlite:/relative.db"}}, ["malformed", "sqlite:///"]),
    ({"tracking": {"uri": "http://"}}, ["malformed", "http://HOST:PORT"]),
    ({"tracking": {"uri": "http://127.0.0.1:port"}}, ["malformed"]),
    ({"tracking": {"uri": "localhost:5000"}}, ["malformed"]),
    ({"tracking": {"uri": "ftp://host/x"}}, ["malformed"]),
    ({"optim": {"schedule": "step"}}, ["step", "cosine", "constant"]),
    ({"loss": {"kind": "mse"}}, ["mse", "huber"]),
    ({"train": {"device": "tpu"}}, ["tpu", "auto"]),
    ({"optim": {"ema_decay": 1.0}}, ["ema_decay"]),
    ({"train": {"ema_decay": 0.9}}, ["train.ema_decay is now optim.ema_decay"]),
    ({"train": {"eval_every": 5}}, ["train.eval_every is now train.val_every"]),
    ({"data": {"train_frames": 0}}, ["train_frames"]),
    ({"model": {"params": {"hiden": 8}}}, ["hiden", "hidden"]),
])
def test_bad_config_fails_naming_the_key_and_options(sections, expected):
    with pytest.raises(ConfigError) as err:
        cfg_with(sections)
    for text in expected:
        assert text in str(err.value)


@pytest.mark.parametrize("uri", ["sqlite:////tmp/a/mlflow.db", "http://127.0.0.1:5055", "https://mlflow.example.org",
                                 "file:///tmp/mlruns", "postgresql://user@db.example.org/mlflow"])
def test_valid_tracking_uris_are_accepted(uri):
    assert cfg_with({"tracking": {"uri": uri}}).tracking.resolved_uri("/elsewhere") == uri


def test_empty_validation_split_fails_before_training(tmp_path):
    from finetune.loop import run_finetune

    shards = build_tip3p_shards(tmp_path, (0.8, 0.0, 0.2))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"validation split 'val' is empty"):
        run_finetune(cfg_with(where(shards, out)))
    assert not out.exists()


def test_labels_in_the_wrong_units_fail_before_training(water_shards, tmp_path):
    import ase.io

    from data_shards.build import build_shards
    from data_shards.chunk import InputError
    from finetune.loop import run_finetune

    # the same frames with forces in meV/Å: every frame is quarantined and the build itself says why
    frames = ase.io.read(next((water_shards.parent / "data").glob("*.extxyz")), ":")
    for atoms in frames:
        atoms.calc.results["forces"] = atoms.calc.results["forces"] * 1000.0
    ase.io.write(tmp_path / "mev.extxyz", frames, format="extxyz")
    shards = tmp_path / "mev_shards"
    with pytest.raises(InputError, match=r"no sample written: all 40 frames read were quarantined.*"
                                         r"force RMS .* wrong units"):
        build_shards([str(tmp_path / "mev.extxyz")], str(shards), shard_size=8, split_fractions=(0.6, 0.2, 0.2),
                     use_ray=False, progress=False)
    out = tmp_path / "run"
    # a manifest whose statistics say the forces are not eV/Å (e.g. built before the per-frame check)
    copy = tmp_path / "copied"
    shutil.copytree(water_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["stats"]["force_rms"] *= 1000.0
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"force RMS of the labelled frames is .* not in eV/Å"):
        run_finetune(cfg_with(where(copy, out)))
    assert not out.exists()


def test_newer_export_format_fails_before_training(water_shards, tmp_path):
    from finetune.loop import run_finetune

    export = export_fresh_model(tmp_path / "export", {"hidden": 8, "layers": 1, "cutoff": 3.5})
    meta = json.loads((export / "model.json").read_text())
    (export / "model.json").write_text(json.dumps({**meta, "format_version": meta["format_version"] + 1}))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"format_version \d+ is newer"):
        run_finetune(cfg_with(where(water_shards, out), {"init": str(export)}))
    assert not out.exists()
    with pytest.raises(ValueError, match=r"train_frames 999 exceeds the 24 frames"):
        run_finetune(cfg_with(where(water_shards, out), {"data": {"train_frames": 999}}))


# --- metrics -----------------------------------------------------------------------------------------

def test_metrics_units_and_per_element():
    rng = np.random.default_rng(0)
    species = np.array([8, 1, 1, 8, 1, 1])
    f_ref = rng.normal(size=(6, 3))
    f_pred = f_ref.copy()
    f_pred[species == 1] += 0.03     # 30 meV/Å on every H component
    f_pred[species == 8] -= 0.06     # 60 meV/Å on every O component
    e_ref = np.array([-1.0, -2.0])
    e_pred = e_ref + np.array([0.002, -0.002])   # ±2 meV/atom
    got = M.summarize(e_pred, e_ref, f_pred, f_ref, species)
    assert got[M.ENERGY_RMSE] == pytest.approx(2.0) and got[M.ENERGY_MAE] == pytest.approx(2.0)
    assert got[M.FORCE_RMSE_PER_ELEMENT] == pytest.approx({"1": 30.0, "8": 60.0})
    assert got[M.FORCE_RMSE] == pytest.approx(np.sqrt((4 * 30.0**2 + 2 * 60.0**2) / 6))
    assert got[M.FORCE_MAE] == pytest.approx((4 * 30.0 + 2 * 60.0) / 6)
    assert (got[M.STRUCTURES], got[M.ATOMS]) == (2, 6)
    with pytest.raises(ValueError, match="shapes differ"):
        M.summarize(e_pred, e_ref, f_pred[:3], f_ref, species)


# --- real finetunes ----------------------------------------------------------------------------------

def test_finetune_from_scratch_keeps_and_exports_the_best_model(water_shards, tmp_path):
    from mlflow import MlflowClient

    from data_shards.stream import ShardStream
    from finetune.loop import run_finetune
    from pretrain.export import export_cutoff, load_export

    out = tmp_path / "run"
    results = run_finetune(cfg_with(where(water_shards, out, tracking=True), LEARNS))
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    history = results["history"]
    assert [h["step"] for h in history] == [0, 10, 20, 30, 40]
    forces = [h[M.FORCE_RMSE] for h in history]
    assert all(np.isfinite(forces))
    assert min(forces[1:]) < 0.99 * forces[0], f"validation force RMSE did not decrease: {forces}"
    assert results["best_step"] == history[int(np.argmin(forces))]["step"]
    assert results["best_val"][M.FORCE_RMSE] == min(forces)
    flagged = [h["step"] for h in history if h["best"]]   # each flagged one beat every earlier evaluation
    assert flagged[0] == 0 and flagged[-1] == results["best_step"]
    assert all(forces[i] < min(forces[:i]) for i, h in enumerate(history) if h["best"] and i > 0)
    assert results["train_frames"] == 24 and results["steps"] == 40 and results["init"] is None
    test = results["test"]
    assert test[M.STRUCTURES] == 8 and test[M.ATOMS] == 8 * 24
    assert set(test[M.FORCE_RMSE_PER_ELEMENT]) == {"1", "8"}
    assert 0 < test[M.ENERGY_RMSE] and 0 < test[M.FORCE_RMSE] < 10 * forces[0]

    # the exported model is the best one: re-evaluated on the validation split it gives the best figure
    model, meta = load_export(out / "export")
    assert meta["lineage"]["steps"] == results["best_step"] and meta["lineage"]["stage"] == "finetune"
    assert meta["params"]["hidden"] == 16 and meta["species"] == [1, 8]
    val = M.evaluate(model, ShardStream(water_shards, "val", 4, export_cutoff(meta)))
    assert val[M.FORCE_RMSE] == pytest.approx(results["best_val"][M.FORCE_RMSE], rel=1e-5)

    for png in ("learning_curve.png", "parity_energy.png", "parity_forces.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    tracking = results["tracking"]
    assert tracking["complete"] and tracking["tracking_uri"] == f"sqlite:///{out.resolve()}/mlflow.db"
    client = MlflowClient(tracking["tracking_uri"])
    run = client.get_run(tracking["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.01"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 40
    rss = client.get_metric_history(run.info.run_id, "system/peak_rss_mb")
    assert len(rss) == len(results["history"]) and all(100 < m.value < 50_000 for m in rss)
    assert client.get_metric_history(run.info.run_id, "system/steps_per_s")[-1].value > 0
    assert run.data.tags["maskpot.manifest_sha256"] == results["manifest_sha256"]
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(out.resolve()), "default store keeps artifacts inside out_dir"
    assert (artifacts / "model" / "model.safetensors").is_file()


def test_finetune_from_export_uses_its_weights_and_architecture(water_shards, tmp_path):
    from data_shards.manifest import file_sha256, load_manifest
    from data_shards.stream import ShardStream
    from finetune.loop import run_finetune
    from pretrain.export import export_cutoff, load_export, normalisation_from_stats

    arch = {"hidden": 8, "layers": 1, "cutoff": 3.0}
    init = export_fresh_model(tmp_path / "pretrained", arch)
    out = tmp_path / "run"
    results = run_finetune(cfg_with(where(water_shards, out), {"init": str(init)},   # no refit: the init's own E0
                                    {"data": {"train_frames": 8}, "train": {"max_steps": 4, "val_every": 2},
                                     "loss": {"refit_energy_offset": False}}))
    assert results["train_frames"] == 8 and results["init_sha256"] == file_sha256(init / "model.safetensors")

    # step 0 validates the init weights themselves, under the finetune data's normalisation
    model, _ = load_export(init)
    norm = normalisation_from_stats(load_manifest(water_shards))
    model.set_normalisation(norm["energy_scale"], {int(z): v for z, v in norm["e0"].items()})
    step0 = M.evaluate(model, ShardStream(water_shards, "val", 2, arch["cutoff"]))
    assert results["history"][0][M.FORCE_RMSE] == pytest.approx(step0[M.FORCE_RMSE], rel=1e-5)
    assert results["history"][0][M.ENERGY_RMSE] == pytest.approx(step0[M.ENERGY_RMSE], rel=1e-5)

    _, meta = load_export(out / "export")
    assert meta["params"]["hidden"] == 8 and meta["params"]["layers"] == 1 and export_cutoff(meta) == 3.0
    assert meta["normalisation"] == norm
    assert meta["lineage"]["init_sha256"] == results["init_sha256"]
    assert meta["lineage"]["init_lineage"]["steps"] == 7 and meta["lineage"]["pretrain_objective"] == "mask"


def test_ema_weights_are_the_ones_validated_and_exported(water_shards, tmp_path):
    from data_shards.stream import ShardStream
    from finetune.loop import run_finetune
    from pretrain.export import export_cutoff, load_export

    short = {"train": {"max_steps": 4, "val_every": 2}}
    plain = run_finetune(cfg_with(where(water_shards, tmp_path / "plain"), LEARNS, short))
    ema = run_finetune(cfg_with(where(water_shards, tmp_path / "ema"), LEARNS, short,
                                {"optim": {"ema_decay": 0.5}}))
    assert ema["history"][0][M.FORCE_RMSE] == plain["history"][0][M.FORCE_RMSE]   # same start
    assert ema["history"][1][M.FORCE_RMSE] != plain["history"][1][M.FORCE_RMSE]   # averaged weights scored
    model, meta = load_export(tmp_path / "ema" / "export")
    again = M.evaluate(model, ShardStream(water_shards, "val", 4, export_cutoff(meta)))
    assert again[M.FORCE_RMSE] == pytest.approx(ema["best_val"][M.FORCE_RMSE], rel=1e-5)


def test_unreachable_tracking_server_warns_keeps_training_and_buffers(water_shards, tmp_path, caplog):
    from mlflow import MlflowClient

    from finetune.loop import run_finetune
    from finetune.tracking import PENDING_FILE, replay_pending

    out = tmp_path / "run"
    dead = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="finetune.tracking"):
        results = run_finetune(cfg_with(where(water_shards, out, tracking=True), {"tracking": {"uri": dead}},
                                        {"train": {"max_steps": 3, "val_every": 2}}))
    assert "MLflow tracking unavailable" in caplog.text and dead in caplog.text
    assert (out / "results.json").is_file() and (out / "export" / "model.safetensors").is_file()
    assert results["tracking"]["complete"] is False
    pending = json.loads((out / PENDING_FILE).read_text())
    steps = {m[3] for e in pending["entries"] if "metrics" in e for m in e["metrics"] if m[0] == "train/loss"}
    assert steps == {1, 2, 3} and pending["params"]["train.max_steps"] == "3"

    # nothing was lost: the buffered run can be sent later
    store = f"sqlite:///{tmp_path / 'later.db'}"
    run_id = replay_pending(out / PENDING_FILE, store)
    client = MlflowClient(store)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "model", "parity_forces.png"}
    assert not (out / PENDING_FILE).exists()


def test_cli_runs_and_reports_user_errors(water_shards, tmp_path, capsys):
    from finetune.__main__ import main

    out = tmp_path / "run"
    common = ["--config", str(FINETUNE_TINY), "--override", f"data.manifest_dir={water_shards}", f"train.out_dir={out}",
              "tracking.enabled=false"]
    assert main([*common, "train.max_steps=2", "train.val_every=1"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("finetune: best step ") and "| test       |" in printed and "results.json" in printed
    assert main([*common, "train.device=tpu"]) == 2
    assert "train.device 'tpu' is not one of" in capsys.readouterr().err
    assert main([*common, "--init", str(tmp_path / "nowhere")]) == 2
    assert "not a maskpot export" in capsys.readouterr().err
