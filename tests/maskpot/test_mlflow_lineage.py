"""Every stage in MLflow (issue 15 item 4), against a real `mlflow server`: a 2-rank DeepSpeed pretraining is
one MLflow run (rank 0: params, per-step metrics, the export as artifacts); a finetune from its export is
tagged `source_run_id` with a markdown link in its description; the printed UI command lands on the runs
table; a headless Chromium (when installed) screenshots the runs table and the finetune run's page."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.tracking_links import runs_table_url, ui_command
from tests.helpers.paths import FINETUNE_TINY, PRETRAIN_TINY, REPO

SCREENSHOTS_ENV = "MASKPOT_SCREENSHOT_DIR"   # keep the screenshots there (to look at them)


def _maskpot(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("TQDM_DISABLE", None)
    return subprocess.run([sys.executable, "-m", "maskpot.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=900, check=False)


def _quiet(r: subprocess.CompletedProcess) -> None:
    """Non-TTY output: progress as plain lines (no carriage-return redraws), few warnings (item 6)."""
    text = r.stdout + r.stderr
    assert "\r" not in text
    warnings = [line for line in text.splitlines() if "Warning" in line or "WARNING" in line]
    assert len(warnings) <= 3, warnings


def _screenshot(url: str, path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1600,1000", "--virtual-time-budget=20000", f"--screenshot={path}", url],
                   capture_output=True, timeout=180, check=True)


@pytest.mark.slow
def test_pretraining_is_a_run_and_finetuning_links_to_it(mlflow_server, water_shards, tmp_path):
    server = mlflow_server
    from mlflow import MlflowClient

    pre = tmp_path / "pretrain"
    r = _maskpot("pretrain", "--config", str(PRETRAIN_TINY), "--nproc", "2", "--override",
                 f"data.manifest_dir={water_shards}", f"train.out_dir={pre}", "train.max_steps=6", "train.val_every=3",
                 "tracking.enabled=true", f"tracking.uri={server}", "tracking.experiment=lineage")
    assert r.returncode == 0, r.stderr[-3000:]
    _quiet(r)
    client = MlflowClient(tracking_uri=server)
    experiment = client.get_experiment_by_name("lineage")
    (run,) = client.search_runs([experiment.experiment_id])      # rank 0 only: one run, not two
    assert run.info.status == "FINISHED" and run.data.tags["maskpot.stage"] == "pretrain"
    assert run.data.tags["maskpot.platform.cpu"] and run.data.tags["maskpot.platform.torch"].startswith("2.")
    assert run.data.params["model.name"] == "egnn" and run.data.params["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.json", "model/model.safetensors"} <= artifacts
    lineage = json.loads((pre / "export" / "model.json").read_text())["lineage"]
    assert lineage["mlflow_run_id"] == run.info.run_id
    assert ui_command(server, experiment.experiment_id) in r.stdout   # printed, landing on the runs table

    fin = tmp_path / "finetune"
    r = _maskpot("finetune", "--config", str(FINETUNE_TINY), "--init", str(pre / "export"), "--override",
                 f"data.manifest_dir={water_shards}", f"train.out_dir={fin}", "train.max_steps=4",
                 "train.val_every=2", f"tracking.uri={server}", "tracking.experiment=lineage",
                 f"tracking.parent_run_id={run.info.run_id}")
    assert r.returncode == 0, r.stderr[-3000:]
    _quiet(r)
    assert r.stdout.startswith("finetune: best step") and "| test       |" in r.stdout and "{" not in r.stdout
    assert f"#/experiments/{experiment.experiment_id}/runs" in r.stdout
    (child,) = [x for x in client.search_runs([experiment.experiment_id]) if x.info.run_id != run.info.run_id]
    tags = child.data.tags
    assert tags["source_run_id"] == run.info.run_id and tags["mlflow.parentRunId"] == run.info.run_id
    assert f"(#/experiments/{experiment.experiment_id}/runs/{run.info.run_id})" in tags["mlflow.note.content"]

    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("chromium not installed (apt-get install chromium): browser screenshots not taken")
    shots = Path(os.environ.get(SCREENSHOTS_ENV, tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    table, lineage_png = shots / "runs_table.png", shots / "finetune_run.png"
    _screenshot(runs_table_url(server, experiment.experiment_id), table)
    _screenshot(f"{server}/#/experiments/{experiment.experiment_id}/runs/{child.info.run_id}", lineage_png)
    for png in (table, lineage_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000, png
