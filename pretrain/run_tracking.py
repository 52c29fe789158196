"""A pretraining as an MLflow run (rank 0 only): params, per-step metrics, the export and logs as artifacts.

`start` opens the run (or, after a preemption, continues the one recorded in OUT_DIR/mlflow_run.json), with
the flattened config as params and the config/manifest hashes as tags. MetricsLog sends every metrics.jsonl
record through `log_record`. Each export written carries the run in its lineage (`mlflow_run_id`,
`mlflow_experiment_id`, `mlflow_tracking_uri`), which a finetuning from that export turns into a
`source_run_id` tag and a link in its description (pretrain/tracking_links.py). `finish` logs the export
folder (artifact `model`), metrics.jsonl and config.json and ends the run. Tracking failures never stop
the training (pretrain/tracking.py's offline journal).
"""
from __future__ import annotations

import json
from numbers import Real
from pathlib import Path

from data_shards.config_io import config_hash
from data_shards.version import maskpot_version, platform_info
from pretrain.config import PretrainConfig, flatten
from pretrain.tracking import Tracker
from pretrain.tracking_links import LINEAGE_EXPERIMENT_ID, LINEAGE_RUN_ID, LINEAGE_TRACKING_URI, ui_command

RUN_FILE = "mlflow_run.json"
MODEL_ARTIFACT = "model"


def start(cfg: PretrainConfig, rank: int, world_size: int, out_dir: Path, manifest_hash: str) -> Tracker | None:
    """Rank 0 with tracking enabled: the started Tracker; else None."""
    if rank != 0 or not cfg.tracking.enabled:
        return None
    tracker = Tracker(cfg.tracking, out_dir)
    tracker.run_name = cfg.tracking.run_name or f"pretrain {cfg.model.name} {cfg.objective.kind} ({out_dir.name})"
    run_file = out_dir / RUN_FILE
    if run_file.is_file():
        tracker.resume_run_id = json.loads(run_file.read_text()).get("run_id")
    params = {k: v for k, v in flatten(cfg).items() if not k.startswith("tracking.")}
    params["world_size"] = world_size
    tags = {"maskpot.stage": "pretrain", "maskpot.version": maskpot_version(),
            "maskpot.config_sha256": config_hash(cfg), "maskpot.manifest_sha256": manifest_hash,
            "maskpot.objective": cfg.objective.kind, "maskpot.model": cfg.model.name,
            **{f"maskpot.platform.{k}": v for k, v in platform_info().items()}}
    tracker.start(params, tags)
    if tracker.run_id is not None:
        run_file.write_text(json.dumps({"run_id": tracker.run_id, "experiment_id": tracker.experiment_id,
                                        "tracking_uri": tracker.uri}) + "\n")
    return tracker


def log_record(tracker: Tracker | None, record: dict) -> None:
    """One metrics.jsonl record: its numbers as metrics at its step (validation keys keep their names)."""
    if tracker is None:
        return
    values = {k: float(v) for k, v in record.items()
              if k != "step" and isinstance(v, Real) and not isinstance(v, bool) and v is not None}
    if values:
        tracker.log_metrics(values, int(record["step"]))
        tracker.flush()


def lineage(tracker: Tracker | None) -> dict:
    """Lineage keys an export records so that finetuning can link back to this run."""
    if tracker is None or tracker.run_id is None:
        return {}
    return {LINEAGE_RUN_ID: tracker.run_id, LINEAGE_EXPERIMENT_ID: tracker.experiment_id,
            LINEAGE_TRACKING_URI: tracker.uri}


def finish(tracker: Tracker | None, out_dir: Path, preempted: bool) -> dict | None:
    """Log the export, metrics.jsonl and config.json; end the run (KILLED when preempted: it resumes)."""
    if tracker is None:
        return None
    for name, artifact_path in (("export", MODEL_ARTIFACT), ("metrics.jsonl", None), ("config.json", None)):
        if (out_dir / name).exists():
            tracker.log_artifact(out_dir / name, artifact_path)
    result = tracker.finish("KILLED" if preempted else "FINISHED")
    if result["complete"]:
        command = ui_command(tracker.uri, result["experiment_id"])
        print(f"MLflow pretraining run {result['run_id']}; runs table: {command}")
    return result
