"""A small MLflow wrapper for one run (a pretraining on rank 0, a finetuning) that never stops training when
tracking fails. Shared by pretrain (train.py) and finetune (finetune/tracking.py re-exports it).

Everything logged goes into a journal first (params, tags, metric batches, artifact paths) and is sent
from there. When the tracking store cannot be reached (a server that is down at the start, or a request
that fails mid-run) a warning says so, training goes on, and the unsent part of the journal is retried:
at the next flush at least `retry_every_s` seconds later (a health probe first, so a dead server costs
milliseconds) and at `finish()`. Once the store answers again everything buffered is sent, in order, and
a warning says so. If it still cannot be sent at the end, it is written to OUT_DIR/mlflow_pending.json
and `replay_pending(file)` sends it later.

`register_model` makes the run's exported model a version of a registered model (source: the run's
`model` artifact folder, no pickled flavour) and points the alias `champion` at the version whose run
has the lowest `best/val_force_rmse_mev_per_a`. `parent_run_id` nests the run (tag mlflow.parentRunId).

Default store: `sqlite:///<out_dir>/mlflow.db` with artifacts under <out_dir>/mlartifacts (any sqlite
store keeps new experiments' artifacts in `mlartifacts/` beside the database file). An
`http://HOST:PORT` URI talks to an `mlflow server` (artifacts proxied by the server). Only the process
that trains creates a Tracker (finetuning is single-process; pretraining: rank 0 only).

The `tracking:` section (`TrackingConfig`), the URI check and the store's health probe are in
pretrain/tracking_config.py; MLflow UI links and the finetune → pretraining lineage tags in
pretrain/tracking_links.py.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pretrain.registry import register_version
from pretrain.tracking_config import TrackingConfig, is_http, server_is_up

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("maskpot.tracking")

ARTIFACTS_DIR = "mlartifacts"
PENDING_FILE = "mlflow_pending.json"
# mlflow's own defaults (7 retries, exponential backoff, 120 s timeout) would stall training for minutes
# on a dead server; ours fail within seconds and fall back to the journal. Env values set by the user win.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
MAX_PARAM_CHARS = 6000
MAX_BATCH_METRICS = 1000
MAX_BATCH_PARAMS_TAGS = 100
PARENT_TAG = "mlflow.parentRunId"


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 1] + "…"


@dataclass
class Journal:
    """What the run should hold, in order; `sent` counts the entries already in the store."""
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    entries: list[dict] = field(default_factory=list)   # {"metrics": [[key, value, ms, step], ...]} | {"artifact": ...}
    sent: int = 0
    header_sent: bool = False

    def to_json(self) -> dict:
        return {"params": self.params, "tags": self.tags, "entries": self.entries[self.sent:]}


class Tracker:
    """One MLflow run. Methods never raise on tracking-store errors (they warn and buffer instead)."""

    def __init__(self, cfg: TrackingConfig, out_dir: str | Path):
        self.enabled = cfg.enabled
        self.out_dir = Path(out_dir)
        self.uri = cfg.resolved_uri(out_dir)
        self.experiment_name = cfg.experiment
        self.run_name = cfg.run_name
        self.journal = Journal(tags={str(k): str(v) for k, v in cfg.tags.items()})
        self.parent_run_id = cfg.parent_run_id
        if cfg.parent_run_id:
            self.journal.tags[PARENT_TAG] = cfg.parent_run_id
        self.pending_metrics: list[list] = []
        self.resume_run_id: str | None = None
        self.client: MlflowClient | None = None   # set once a run is open
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.offline = False
        self.retry_every_s = cfg.retry_every_s
        self._offline_since = 0.0       # time.monotonic() of the last failure or probe
        if self.enabled and is_http(self.uri):
            for name, value in HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(name, value)

    # --- what the training loop calls --------------------------------------------------------------
    def start(self, params: dict[str, Any], tags: dict[str, Any]) -> None:
        self.journal.params.update({k: _param_value(v) for k, v in params.items()})
        self.journal.tags.update({k: str(v) for k, v in tags.items()})
        self._connect()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ms = int(time.time() * 1000)
        self.pending_metrics += [[k, float(v), ms, int(step)] for k, v in metrics.items()]

    def flush(self) -> None:
        """Move buffered metrics into the journal and send it (offline: retried every `retry_every_s`)."""
        if self.pending_metrics:
            self.journal.entries.append({"metrics": self.pending_metrics})
            self.pending_metrics = []
        if self.enabled and self.offline and time.monotonic() - self._offline_since >= self.retry_every_s:
            self._retry()
        if self.enabled and not self.offline:
            self._send()

    def _retry(self) -> None:
        """Probe the store; when it answers, go back online (the next `_send` delivers the backlog)."""
        self._offline_since = time.monotonic()
        if server_is_up(self.uri):
            log.warning("MLflow store %s reachable again: sending the %d buffered journal entries", self.uri,
                        len(self.journal.entries) - self.journal.sent)
            self.offline = False

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a whole folder (its contents go under `artifact_path`)."""
        self.journal.entries.append({"artifact": str(Path(path).resolve()), "artifact_path": artifact_path})
        self.flush()

    def finish(self, status: str = "FINISHED") -> dict:
        """Send what is left (retrying once if offline), end the run; returns where it went."""
        self.flush()
        if self.enabled and self.offline:
            self._retry()
            if not self.offline:
                self._send()
            if self.offline:
                self._write_pending()
        if self.enabled and not self.offline and self.run_id is not None:
            try:
                client, run_id = self._open_run()
                client.set_terminated(run_id, status=status)
            except Exception as e:  # noqa: BLE001 - tracking must never end a finished training
                log.warning("could not mark MLflow run %s %s: %s", self.run_id, status, e)
        return {"tracking_uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id,
                "complete": self.enabled and not self.offline and self.run_id is not None,
                "pending_file": str(self.out_dir / PENDING_FILE) if self.enabled and self.offline else None}

    def register_model(self, name: str, artifact_path: str) -> dict | None:
        """Register the run's `artifact_path` folder as a new version of `name` and update `champion`.

        Call after that folder was logged. Never raises: None with a warning when it cannot be done.
        """
        self.flush()
        if not self.enabled or self.offline or self.run_id is None:
            log.warning("model %r not registered: the MLflow store %s was not reachable (register it later "
                        "from the run's %r artifact)", name, self.uri, artifact_path)
            return None
        try:
            return register_version(self.client, name, self.run_id, artifact_path)
        except Exception as e:  # noqa: BLE001 - the training is done and exported whatever the registry says
            log.warning("could not register model %r from run %s: %s: %s", name, self.run_id, type(e).__name__, e)
            return None

    # --- checkpoints (finetune.resume) ---------------------------------------------------------------
    def snapshot(self) -> dict:
        """JSON state to continue this run after a restart: its ids and the journal entries not yet sent."""
        self.flush()
        j = self.journal
        return {"run_id": self.run_id, "experiment_id": self.experiment_id,
                "journal": {"params": j.params, "tags": j.tags, "entries": j.entries[j.sent:], "sent": 0,
                            "header_sent": j.header_sent}}

    def restore(self, snapshot: dict) -> None:
        """Continue the run of `snapshot` (the same MLflow run id); sends what it had not sent yet."""
        self.run_id, self.experiment_id = snapshot["run_id"], snapshot["experiment_id"]
        self.journal = Journal(**snapshot["journal"])
        self._connect()

    # --- sending -----------------------------------------------------------------------------------
    def _connect(self) -> None:
        """Send what the journal holds, or go offline (buffering) when no server answers."""
        if not self.enabled:
            return
        if not server_is_up(self.uri):
            self._go_offline(f"no MLflow server answers at {self.uri}/health")
            return
        self._send()

    def _go_offline(self, reason: str) -> None:
        if not self.offline:
            log.warning("MLflow tracking unavailable (%s); training continues, metrics are buffered and "
                        "retried every %g s and at the end (then written to %s if still unreachable)", reason,
                        self.retry_every_s, self.out_dir / PENDING_FILE)
        self.offline = True
        self._offline_since = time.monotonic()

    def _send(self) -> None:
        try:
            self._ensure_run()
            self._send_header()
            while self.journal.sent < len(self.journal.entries):
                self._send_entry(self.journal.entries[self.journal.sent])
                self.journal.sent += 1
        except Exception as e:  # noqa: BLE001 - any store/network failure: buffer and carry on
            self._go_offline(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    def _ensure_run(self) -> None:
        if self.run_id is not None and self.client is not None:
            return
        if self.run_id is not None:   # restored from a finetune checkpoint (restore): continue that run
            from mlflow import MlflowClient  # startup: mlflow

            self.client = MlflowClient(tracking_uri=self.uri)
            self.client.update_run(self.run_id, status="RUNNING")
            return
        if self.resume_run_id:   # a restarted job continues its run (pretraining after preemption)
            from mlflow import MlflowClient  # startup: mlflow (+12 s over torch) only when tracking is on

            self.client = MlflowClient(tracking_uri=self.uri)
            run = self.client.get_run(self.resume_run_id)
            self.experiment_id, self.run_id = run.info.experiment_id, run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        from mlflow import MlflowClient  # startup: mlflow (+12 s over torch) only when tracking is on

        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(self.experiment_name,
                                                               artifact_location=self._artifact_location())
        else:
            if experiment.lifecycle_stage == "deleted":
                self.client.restore_experiment(experiment.experiment_id)
            self.experiment_id = experiment.experiment_id
        if self.parent_run_id:
            self._check_parent()
        run = self.client.create_run(self.experiment_id, run_name=self.run_name)
        self.run_id = run.info.run_id

    def _open_run(self) -> tuple[MlflowClient, str]:
        """The client and run id, once a run is open (what every send needs)."""
        assert self.client is not None and self.run_id is not None, "no MLflow run is open"
        return self.client, self.run_id

    def _check_parent(self) -> None:
        from mlflow.exceptions import MlflowException  # startup: mlflow (+12 s over torch) only when tracking is on

        try:
            assert self.client is not None and self.parent_run_id is not None
            parent = self.client.get_run(self.parent_run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("tracking.parent_run_id %s: no such run in %s; the run is tagged with it anyway",
                        self.parent_run_id, self.uri)
            return
        if parent.info.experiment_id != self.experiment_id:
            log.warning("parent run %s is in experiment %s, this run in %s: the MLflow UI nests runs of one "
                        "experiment only", self.parent_run_id, parent.info.experiment_id, self.experiment_id)

    def _artifact_location(self) -> str | None:
        """Next to a sqlite file (inside out_dir for the default store); the server's own for http."""
        if is_http(self.uri) or self.uri.startswith("file:"):
            return None
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri.removeprefix("sqlite:///")).resolve().parent / ARTIFACTS_DIR).as_uri()
        return (self.out_dir / ARTIFACTS_DIR).resolve().as_uri()

    def _send_header(self) -> None:
        if self.journal.header_sent:
            return
        from mlflow.entities import Param, RunTag  # startup: mlflow (+12 s over torch) only when tracking is on

        client, run_id = self._open_run()
        params = [Param(k, v) for k, v in self.journal.params.items()]
        tags = [RunTag(k, v) for k, v in self.journal.tags.items()]
        for i in range(0, len(params), MAX_BATCH_PARAMS_TAGS):
            client.log_batch(run_id, params=params[i:i + MAX_BATCH_PARAMS_TAGS])
        for i in range(0, len(tags), MAX_BATCH_PARAMS_TAGS):
            client.log_batch(run_id, tags=tags[i:i + MAX_BATCH_PARAMS_TAGS])
        self.journal.header_sent = True

    def _send_entry(self, entry: dict) -> None:
        from mlflow.entities import Metric  # startup: mlflow (+12 s over torch) only when tracking is on

        client, run_id = self._open_run()
        if "metrics" in entry:
            metrics = [Metric(k, v, ms, step) for k, v, ms, step in entry["metrics"]]
            for i in range(0, len(metrics), MAX_BATCH_METRICS):
                client.log_batch(run_id, metrics=metrics[i:i + MAX_BATCH_METRICS])
            return
        path = Path(entry["artifact"])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), entry["artifact_path"])
        elif path.is_file():
            client.log_artifact(run_id, str(path), entry["artifact_path"])
        else:
            log.warning("artifact %s no longer exists; not logged", path)

    def _write_pending(self) -> None:
        path = self.out_dir / PENDING_FILE
        record = {"tracking_uri": self.uri, "experiment": self.experiment_name, "run_name": self.run_name,
                  "run_id": self.run_id, "header_sent": self.journal.header_sent, **self.journal.to_json()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        log.warning("MLflow store %s still unreachable: the run's params, metrics and artifact list are in %s "
                    "(send them later with finetune.tracking.replay_pending)", self.uri, path)


def replay_pending(pending_file: str | Path, uri: str | None = None) -> str:
    """Send a run saved in mlflow_pending.json to `uri` (default: the one it was meant for); returns the run id."""
    record = json.loads(Path(pending_file).read_text())
    cfg = TrackingConfig(uri=uri or record["tracking_uri"], experiment=record["experiment"],
                         run_name=record["run_name"])
    tracker = Tracker(cfg, Path(pending_file).parent)
    tracker.journal = Journal(params=record["params"], tags=record["tags"], entries=record["entries"])
    if record.get("run_id") and record.get("header_sent"):
        from mlflow import MlflowClient  # startup: mlflow (+12 s over torch) only when tracking is on

        tracker.client, tracker.run_id = MlflowClient(tracking_uri=cfg.uri), record["run_id"]
        tracker.journal.header_sent = True
    tracker._send()
    if tracker.offline:
        raise ConnectionError(f"MLflow store {cfg.uri} is still unreachable; nothing was lost ({pending_file})")
    tracker.finish()
    Path(pending_file).unlink()
    assert tracker.run_id is not None
    return tracker.run_id
