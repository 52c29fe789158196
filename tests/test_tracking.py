"""MLflow tracking against a real `mlflow server` (sqlite backend, proxied artifacts) over HTTP."""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.forcefield import metrics as M
from finetune.tracking import server_is_up
from test_finetune import LEARNS, cfg_with, free_port, one_torch_thread, water_shards, where  # noqa: F401 - fixtures

SERVER_START_TIMEOUT_S = 120.0   # ~20 s alone; 2 busy cores can take several times that


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port` with its store under `root`, in its own process group; waits
    until /health answers."""
    uri = f"http://127.0.0.1:{port}"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log_path = root / f"server-{port}.log"
    with log_path.open("a") as log_file:
        proc = subprocess.Popen(
            [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,   # setsid: own process group
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not server_is_up(uri, timeout=2.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_mlflow_server(proc)
            pytest.fail(f"mlflow server on {uri} did not become healthy (exit code {proc.poll()}):\n"
                        f"{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port for the whole session; yields its URI."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_mlflow_server(proc)


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
def test_finetune_logs_everything_to_an_mlflow_server(mlflow_server, water_shards, tmp_path):  # noqa: F811
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    from finetune.loop import run_finetune

    out = tmp_path / "run"
    cfg = cfg_with(where(water_shards, out, tracking=True), LEARNS,
                   {"train": {"max_steps": 12, "eval_every": 4},
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
