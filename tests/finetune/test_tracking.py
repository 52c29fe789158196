"""MLflow tracking against a real `mlflow server` (sqlite backend, proxied artifacts) over HTTP."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import torch

from finetune.forcefield import metrics as M
from tests.helpers.finetuning import LEARNS, cfg_with, where
from tests.helpers.mlflow_server import start_mlflow_server, stop_mlflow_server
from tests.helpers.net import free_port


@pytest.mark.slow
def test_server_that_goes_away_mid_run_gets_everything_once_it_is_back(tmp_path, caplog):
    from mlflow import MlflowClient

    from finetune.config import TrackingConfig
    from finetune.tracking import Tracker

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = start_mlflow_server(tmp_path, port)
    tracker = Tracker(TrackingConfig(uri=uri, experiment="outage", retry_every_s=0.0), tmp_path / "run")
    try:
        tracker.start({"train.max_steps": 6}, {"purpose": "outage"})
        for step in (1, 2):
            tracker.log_metrics({"train/loss": 1.0 / step}, step)
        tracker.flush()
        assert not tracker.offline and tracker.run_id
        stop_mlflow_server(proc)                                   # the server goes away mid-run
        with caplog.at_level(logging.WARNING, logger="finetune.tracking"):
            for step in (3, 4):
                tracker.log_metrics({"train/loss": 1.0 / step}, step)
                tracker.flush()                                    # fails, then probes: still down
            assert tracker.offline and "MLflow tracking unavailable" in caplog.text
            proc = start_mlflow_server(tmp_path, port)             # back, same store
            tracker.log_metrics({"train/loss": 0.2}, 5)
            tracker.flush()
            assert not tracker.offline and "reachable again" in caplog.text
        tracker.log_metrics({"train/loss": 0.1}, 6)
        note = tmp_path / "note.txt"
        note.write_text("logged after the outage")
        tracker.log_artifact(note)
        result = tracker.finish()
        assert result["complete"] and result["pending_file"] is None
        client = MlflowClient(uri)
        history = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, "train/loss"))
        assert history == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 0.25), (5, 0.2), (6, 0.1)]
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "6"
        assert {a.path for a in client.list_artifacts(tracker.run_id)} == {"note.txt"}
        assert not (tmp_path / "run" / "mlflow_pending.json").exists()
    finally:
        stop_mlflow_server(proc)


@pytest.mark.slow
def test_finetune_logs_everything_to_an_mlflow_server(mlflow_server, water_shards, tmp_path):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    from finetune.loop import run_finetune

    out = tmp_path / "run"
    cfg = cfg_with(where(water_shards, out, tracking=True), LEARNS,
                   {"train": {"max_steps": 12, "val_every": 4},
                    "tracking": {"uri": mlflow_server, "experiment": "ft-server-test", "run_name": "tiny",
                                 "tags": {"purpose": "test"}}})
    results = run_finetune(cfg)
    tracking = results["tracking"]
    assert tracking["complete"] and tracking["tracking_uri"] == mlflow_server
    assert not (out / "mlflow.db").exists(), "with a server URI nothing is tracked locally"

    client = MlflowClient(mlflow_server)
    run = client.get_run(tracking["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert client.get_experiment(run.info.experiment_id).name == "ft-server-test"
    params = run.data.params
    assert params["train.max_steps"] == "12" and params["model.params.hidden"] == "16"
    assert params["data.manifest_dir"] == str(water_shards) and params["model.resolved.cutoff"] == "3.5"
    tags = run.data.tags
    assert tags["purpose"] == "test" and tags["maskpot.init"] == "scratch"
    assert tags["maskpot.manifest_sha256"] == results["manifest_sha256"]
    assert tags["maskpot.config_sha256"] == results["config_sha256"]
    # the machine: the same run gives other digits on another CPU model (data_shards.version.platform_info)
    assert tags["maskpot.platform.cpu"] == results["platform"]["cpu"] != ""
    assert tags["maskpot.platform.torch"] == results["platform"]["torch"] == torch.__version__

    val = client.get_metric_history(run.info.run_id, "val/force_rmse_mev_per_a")
    assert [m.step for m in sorted(val, key=lambda m: m.step)] == [0, 4, 8, 12]
    assert {m.step: m.value for m in val} == pytest.approx(
        {h["step"]: h[M.FORCE_RMSE] for h in results["history"]})
    assert len(client.get_metric_history(run.info.run_id, "train/lr")) == 12
    final = run.data.metrics
    assert final["test/force_rmse_mev_per_a"] == pytest.approx(results["test"][M.FORCE_RMSE])
    assert final["test/energy_rmse_mev_per_atom"] == pytest.approx(results["test"][M.ENERGY_RMSE])
    assert final["best/step"] == results["best_step"]

    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert listed >= {"config.yaml", "learning_curve.png", "parity_energy.png", "parity_forces.png", "model"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/model.json",
                                                                                  "model/model.safetensors"}
    fetched = Path(download_artifacts(run_id=run.info.run_id, artifact_path="model", dst_path=str(tmp_path / "dl"),
                                      tracking_uri=mlflow_server))
    for name in ("model.json", "model.safetensors"):
        assert hashlib.sha256((fetched / name).read_bytes()).digest() == \
            hashlib.sha256((out / "export" / name).read_bytes()).digest()
    config = Path(download_artifacts(run_id=run.info.run_id, artifact_path="config.yaml",
                                     dst_path=str(tmp_path / "dl"), tracking_uri=mlflow_server)).read_text()
    assert f"manifest_dir: {water_shards}" in config and mlflow_server in config
