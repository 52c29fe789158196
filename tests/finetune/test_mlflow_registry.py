"""MLflow model registry against a real `mlflow server`: every finetune adds a version of the registered
model from its `model` artifact, and the alias `champion` follows the lowest validation force RMSE."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from finetune.forcefield import metrics as M
from tests.helpers.finetuning import LEARNS, cfg_with, where
from tests.helpers.net import free_port

NAME = "water-egnn-tiny"
# lr 1e-12 changes no float32 weight: the best validation is step 0's, worse than any run that learns
IDLE = {"optim": {"lr": 1e-12, "min_lr": 0.0, "schedule": "constant", "warmup_steps": 0},
        "train": {"max_steps": 2, "val_every": 2}}


@pytest.mark.slow
def test_versions_are_registered_and_champion_follows_the_best(mlflow_server, water_shards, tmp_path):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    from finetune.loop import run_finetune

    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment("ft-registry-test")
    parent = client.create_run(experiment, run_name="sweep").info.run_id

    def finetune(label: str, *sections: dict) -> dict:
        tracking = {"tracking": {"uri": mlflow_server, "experiment": "ft-registry-test", "run_name": label,
                                 "registered_model": NAME, "parent_run_id": parent}}
        results = run_finetune(cfg_with(where(water_shards, tmp_path / label, tracking=True), *sections, tracking))
        assert results["tracking"]["complete"]
        return results

    learned = finetune("learned", LEARNS, {"train": {"max_steps": 8, "val_every": 4}})
    idle = finetune("idle", IDLE)
    better = finetune("better", LEARNS, {"train": {"max_steps": 16, "val_every": 4}})
    values = {r["tracking"]["run_id"]: r["best_val"][M.FORCE_RMSE] for r in (learned, idle, better)}
    assert values[better["tracking"]["run_id"]] < values[learned["tracking"]["run_id"]] \
        < values[idle["tracking"]["run_id"]], f"the runs do not differ as the test needs: {values}"

    # each registration chose the best version registered so far
    assert [r["registry"]["version"] for r in (learned, idle, better)] == ["1", "2", "3"]
    assert [r["registry"]["champion_version"] for r in (learned, idle, better)] == ["1", "1", "3"]
    assert idle["registry"]["champion_val_force_rmse_mev_per_a"] == pytest.approx(values[learned["tracking"]["run_id"]])
    assert better["registry"]["champion_val_force_rmse_mev_per_a"] == \
        pytest.approx(values[better["tracking"]["run_id"]])

    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.version == "3" and champion.run_id == better["tracking"]["run_id"]
    versions = {v.version: v for v in client.search_model_versions(f"name='{NAME}'")}
    assert {v: versions[v].run_id for v in versions} == {
        "1": learned["tracking"]["run_id"], "2": idle["tracking"]["run_id"], "3": better["tracking"]["run_id"]}

    # the version's source is the run's exported model, byte for byte
    fetched = Path(download_artifacts(artifact_uri=champion.source, dst_path=str(tmp_path / "dl"),
                                      tracking_uri=mlflow_server))
    for name in ("model.json", "model.safetensors"):
        assert hashlib.sha256((fetched / name).read_bytes()).digest() == \
            hashlib.sha256((tmp_path / "better" / "export" / name).read_bytes()).digest()

    # nested under the parent run
    for r in (learned, idle, better):
        assert client.get_run(r["tracking"]["run_id"]).data.tags["mlflow.parentRunId"] == parent


def test_registration_is_skipped_with_a_warning_when_the_store_is_down(water_shards, tmp_path, caplog):
    import logging

    from finetune.loop import run_finetune

    dead = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="finetune.tracking"):
        results = run_finetune(cfg_with(where(water_shards, tmp_path / "run", tracking=True), IDLE,
                                        {"tracking": {"uri": dead, "registered_model": NAME}}))
    assert results["registry"] is None and (tmp_path / "run" / "export" / "model.safetensors").is_file()
    assert f"model {NAME!r} not registered" in caplog.text
