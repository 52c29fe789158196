"""Where a run's MLflow tracking goes: the `tracking:` config section (`TrackingConfig`), the URI check, and
whether an http store answers (`server_is_up`). Importing it sets MLflow's environment defaults (no telemetry,
no "View run" URLs on stdout). The Tracker that sends to the store is pretrain/tracking.py.
"""
from __future__ import annotations

import math
import os
import re
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# mlflow 3 writes "🏃 View run … / 🧪 View experiment …" to stdout at every run end on an http store; the
# commands print one line that opens the runs table instead (tracking_links.ui_command)
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

DB_SCHEMES = ("postgresql", "mysql", "mssql")
RUN_ID = re.compile(r"[0-9a-f]{32}")
URI_FORMS = ("sqlite:///ABSOLUTE/PATH.db", "http://HOST:PORT", "https://HOST[:PORT]", "file:///ABSOLUTE/DIR",
             "postgresql://USER@HOST/DB (also mysql, mssql)")
HEALTH_TIMEOUT_S = 5.0


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_tracking_uri(uri: str) -> None:
    """ValueError unless `uri` is a tracking URI MLflow can use without guessing."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    bad = f"tracking.uri {uri!r} is malformed; valid forms: {list(URI_FORMS)}"
    if scheme == "sqlite":
        _require(uri.startswith("sqlite:///") and len(uri) > len("sqlite:///"), bad)
    elif scheme in ("http", "https"):
        _require(bool(parsed.hostname), bad)
        try:
            parsed.port  # noqa: B018 - raises on a non-numeric or out-of-range port
        except ValueError:
            raise ValueError(bad) from None
    elif scheme == "file":
        _require(bool(parsed.path) and parsed.netloc in ("", "localhost"), bad)
    elif scheme in DB_SCHEMES:
        _require(bool(parsed.hostname) and bool(parsed.path.strip("/")), bad)
    else:
        raise ValueError(bad)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None              # None: sqlite:///<train.out_dir>/mlflow.db, artifacts in out_dir
    experiment: str = "maskpot-finetune"   # pretraining: "maskpot-pretrain"
    run_name: str | None = None
    tags: dict = field(default_factory=dict)
    registered_model: str | None = None  # register the export under this name; alias `champion` = best
    parent_run_id: str | None = None    # nest the run under this MLflow run (tag mlflow.parentRunId)
    retry_every_s: float = 60.0         # while the store is unreachable: probe it at most this often (s)

    def __post_init__(self):
        _require(0 <= self.retry_every_s < math.inf,
                 f"tracking.retry_every_s must be a finite number of seconds >= 0, got {self.retry_every_s}")
        if self.uri is not None:
            check_tracking_uri(self.uri)
        _require(self.registered_model is None or (bool(self.registered_model.strip())
                                                   and not set("'\"`") & set(self.registered_model)),
                 f"tracking.registered_model must be a non-empty name without quotes, or null (no "
                 f"registration), got {self.registered_model!r}")
        _require(self.enabled or self.registered_model is None,
                 "tracking.registered_model needs tracking.enabled: true (the model is registered from the run)")
        _require(self.parent_run_id is None or RUN_ID.fullmatch(self.parent_run_id) is not None,
                 f"tracking.parent_run_id must be an MLflow run id (32 hex digits) or null, got "
                 f"{self.parent_run_id!r}")
        _require(bool(self.experiment.strip()), "tracking.experiment must be a non-empty name")
        bad = [k for k, v in self.tags.items() if not isinstance(k, str) or isinstance(v, (dict, list))]
        _require(not bad, f"tracking.tags must map names to scalars; bad entries: {bad}")

    def resolved_uri(self, out_dir: str | Path) -> str:
        return self.uri or f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_is_up(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    """GET <uri>/health of an mlflow server; local stores (sqlite, file, databases) count as up."""
    if not is_http(uri):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False
