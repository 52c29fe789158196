"""Where a run is in the MLflow UI, and the lineage link from a finetuning run to its pretraining run.

MLflow 3 opens on its GenAI overview; its runs table of an experiment is the hash route
`#/experiments/<id>/runs` and a run's page `#/experiments/<id>/runs/<run_id>` (routes of the UI bundled
with mlflow 3.17). A local store (sqlite, file) is browsed with `mlflow ui --backend-store-uri URI`, which
serves http://127.0.0.1:5000; an http store is the server itself.
"""
from __future__ import annotations

import shlex

DEFAULT_UI = "http://127.0.0.1:5000"
SOURCE_RUN_TAG = "source_run_id"            # on a finetuning run: the MLflow run id of its pretraining
SOURCE_URI_TAG = "source_tracking_uri"
DESCRIPTION_TAG = "mlflow.note.content"     # the run description the UI shows (markdown)
LINEAGE_RUN_ID = "mlflow_run_id"            # keys of an export's lineage written by a tracked pretraining
LINEAGE_EXPERIMENT_ID = "mlflow_experiment_id"
LINEAGE_TRACKING_URI = "mlflow_tracking_uri"


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def ui_base(uri: str) -> str:
    return uri.rstrip("/") if _is_http(uri) else DEFAULT_UI


def runs_table_url(uri: str, experiment_id: str) -> str:
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_command(uri: str, experiment_id: str | None) -> str:
    """One line: how to open the runs table of `experiment_id` for the store `uri`."""
    where = runs_table_url(uri, experiment_id) if experiment_id is not None else ui_base(uri)
    if _is_http(uri):
        return f"open {where}"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)} --host 127.0.0.1 --port 5000, then open {where}"


def lineage_tags(init_lineage: dict | None, tracking_uri: str) -> dict[str, str]:
    """Tags and description of a finetuning run whose init export came from a tracked pretraining:
    `source_run_id`, and a markdown link to that run (a relative UI link when both share the store)."""
    lineage = init_lineage or {}
    run_id = lineage.get(LINEAGE_RUN_ID)
    if not run_id:
        return {}
    return {SOURCE_RUN_TAG: str(run_id), SOURCE_URI_TAG: str(lineage.get(LINEAGE_TRACKING_URI, "")),
            DESCRIPTION_TAG: lineage_description(lineage, tracking_uri)}


def lineage_description(lineage: dict, tracking_uri: str) -> str:
    run_id, experiment_id = lineage[LINEAGE_RUN_ID], lineage.get(LINEAGE_EXPERIMENT_ID)
    source_uri = str(lineage.get(LINEAGE_TRACKING_URI, ""))
    if experiment_id is None:
        link = f"`{run_id}`"
    elif source_uri == tracking_uri or not _is_http(source_uri):
        link = f"[{run_id}](#/experiments/{experiment_id}/runs/{run_id})"   # same UI: in-app link
    else:
        link = f"[{run_id}]({run_url(source_uri, experiment_id, run_id)})"
    objective = lineage.get("pretrain_objective") or "pretraining"
    return (f"Finetuned from the export of pretraining run {link} ({objective}, step {lineage.get('steps', '?')}"
            + (f", store `{source_uri}`" if source_uri and source_uri != tracking_uri else "") + ").")
