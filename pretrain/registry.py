"""MLflow model registry: a run's exported model folder as a version, alias `champion` on the best one."""
from __future__ import annotations

import math

CHAMPION_ALIAS = "champion"
CHAMPION_METRIC = "best/val_force_rmse_mev_per_a"


def register_version(client, name: str, run_id: str, artifact_path: str) -> dict:
    """New version of registered model `name` (created if needed) from run `run_id`'s artifact folder;
    the alias `champion` moves to the version with the lowest CHAMPION_METRIC (ties keep the current one)."""
    from mlflow.exceptions import MlflowException  # startup: mlflow (+12 s over torch) only when tracking is on

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=run_id)
    champion, value = choose_champion(client, name)
    return {"name": name, "version": str(version.version), "source": source,
            "champion_version": champion, "champion_val_force_rmse_mev_per_a": value}


def choose_champion(client, name: str) -> tuple[str | None, float | None]:
    """Point alias `champion` of `name` at its version with the lowest CHAMPION_METRIC; returns (version, value)."""
    from mlflow.exceptions import MlflowException  # startup: mlflow (+12 s over torch) only when tracking is on

    try:
        current = str(client.get_model_version_by_alias(name, CHAMPION_ALIAS).version)
    except MlflowException:
        current = None
    metric_of_run: dict[str, float | None] = {}
    best = None
    for version in client.search_model_versions(f"name='{name}'"):
        if not version.run_id:
            continue
        if version.run_id not in metric_of_run:
            try:
                metric_of_run[version.run_id] = client.get_run(version.run_id).data.metrics.get(CHAMPION_METRIC)
            except MlflowException:   # the run was deleted
                metric_of_run[version.run_id] = None
        value = metric_of_run[version.run_id]
        if value is None or not math.isfinite(value):
            continue
        key = (value, str(version.version) != current, int(version.version))
        if best is None or key < best[0]:
            best = (key, str(version.version))
    if best is None:
        return current, None
    if best[1] != current:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, best[1])
    return best[1], best[0][0]


