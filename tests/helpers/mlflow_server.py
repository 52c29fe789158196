"""A real `mlflow server` (sqlite backend, proxied artifacts) on a loopback port, in its own process group."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.tracking import server_is_up

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
