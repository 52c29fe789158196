"""Cluster YAML validation, sbatch rendering (golden files), dry-run submission and the in-job guard.

Set MASKPOT_UPDATE_GOLDEN=1 to rewrite slurm/*.sbatch (the one golden copy, the examples users read) after an
intended change.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.config import ClusterConfig, ClusterConfigError, LaunchConfig, SlurmConfig, load_cluster_config
from cluster.sbatch import render, render_pipeline
from cluster.submit import SubmittedJob, load_jobs, record_jobs, refuse_inside_job, submit
from tests.helpers.paths import REPO

EXAMPLE = REPO / "configs" / "cluster" / "gpu.yaml"
SCRIPT_NAMES = {"shards": "shards_ray.sbatch", "pretrain": "pretrain_multinode.sbatch", "finetune": "finetune.sbatch"}


def _write(tmp_path, data) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("stage", sorted(SCRIPT_NAMES))
def test_rendered_scripts_match_golden_files_and_slurm_examples(stage):
    text = render(load_cluster_config(EXAMPLE), stage)
    golden = REPO / "slurm" / SCRIPT_NAMES[stage]
    if os.environ.get("MASKPOT_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.read_text() == text, f"{golden} differs from the rendering (MASKPOT_UPDATE_GOLDEN=1 rewrites it)"


@pytest.mark.parametrize("stage", sorted(SCRIPT_NAMES))
def test_rendered_scripts_are_valid_bash(stage):
    text = render(load_cluster_config(EXAMPLE), stage)
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_pretrain_script_runs_one_rank_per_task_through_cluster_launch():
    cfg = load_cluster_config(EXAMPLE)
    text = render(cfg, "pretrain")
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=4" in text and "#SBATCH --gpus-per-node=4" in text
    assert '-m cluster.launch "$PYTHON" -m pretrain --config configs/pretrain.yaml' in text
    assert text.index("#SBATCH --mail-type=FAIL") < text.index("set -euo pipefail")  # all #SBATCH before commands
    finetune = render(cfg, "finetune")
    assert "#SBATCH --nodes=1" in finetune and "#SBATCH --gpus-per-node=1" in finetune
    assert "--init runs/pretrain/export" in finetune


def test_pipeline_chains_stages_in_order():
    cfg = load_cluster_config(EXAMPLE)
    assert [(s.stage, s.after) for s in render_pipeline(cfg)] == [
        ("shards", None), ("pretrain", "shards"), ("finetune", "pretrain")]
    cfg.launch.shards_inputs = []
    assert [(s.stage, s.after) for s in render_pipeline(cfg)] == [("pretrain", None), ("finetune", "pretrain")]


def test_overrides_are_quoted_for_the_shell():
    cfg = ClusterConfig(launch=LaunchConfig(pretrain_config="p.yaml", pretrain_overrides=["train.out_dir=a b"]))
    assert "--override 'train.out_dir=a b'" in render(cfg, "pretrain")


@pytest.mark.parametrize("section,message", [
    ({"time": "25 hours"}, "not a SLURM time"),
    ({"time": "1:61:00"}, "not a SLURM time"),
    ({"cpu_only": True, "gpus_per_node": 2}, "cpu_only is true"),
    ({"gpus_per_node": 2, "ntasks_per_node": 4}, "cannot fit"),
    ({"cpus_per_node": 16, "ntasks_per_node": 4, "cpus_per_task": 8}, "does not fit"),
    ({"nodes": 0}, "positive integer"),
    ({"mem": "lots"}, "slurm.mem"),
    ({"partiton": "gpu"}, "valid keys"),
])
def test_bad_slurm_sections_are_clear_errors(tmp_path, section, message):
    with pytest.raises(ClusterConfigError, match=message) as err:
        load_cluster_config(_write(tmp_path, {"slurm": section}))
    assert str(tmp_path / "cluster.yaml") in str(err.value)


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(ClusterConfigError, match=r"launch: unknown key\(s\) \['runs_dir'\].*'run_dir'"):
        load_cluster_config(_write(tmp_path, {"launch": {"runs_dir": "x"}}))
    with pytest.raises(ClusterConfigError,
                       match=r"unknown key\(s\) \['sbatch'\].*\['launch', 'ray', 'slurm', 'stages'\]"):
        load_cluster_config(_write(tmp_path, {"sbatch": {}}))


@pytest.mark.parametrize("time", ["30", "12:00", "24:00:00", "1-00:00:00", "2-12"])
def test_valid_time_formats(time):
    assert SlurmConfig(time=time).time == time


def test_stage_without_its_config_names_the_missing_key():
    with pytest.raises(ValueError, match="launch.pretrain_config"):
        render(ClusterConfig(), "pretrain")
    with pytest.raises(ValueError, match="valid stages: shards, pretrain, finetune"):
        render(ClusterConfig(), "train")


def test_dry_run_writes_nothing_and_absolutises_paths(tmp_path, monkeypatch):
    (tmp_path / "p.yaml").write_text("{}")
    cfg = ClusterConfig(launch=LaunchConfig(run_dir="runs/c", workdir=str(tmp_path), python=sys.executable,
                                            pretrain_config="p.yaml"))
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # a dry run is allowed anywhere
    [job] = submit(cfg, "pretrain", dry_run=True)
    assert job.job_id is None and job.script == str(tmp_path / "runs/c/pretrain.sbatch")
    assert f"#SBATCH --output={tmp_path}/runs/c/logs/%x-%j.out" in job.text and f"cd {tmp_path}" in job.text
    assert not (tmp_path / "runs").exists()


def test_preflight_reports_a_missing_stage_config(tmp_path):
    cfg = ClusterConfig(launch=LaunchConfig(workdir=str(tmp_path), python=sys.executable, pretrain_config="nope.yaml"))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        submit(cfg, "pretrain", dry_run=True)


def test_refuses_to_submit_from_inside_a_job_unless_forced():
    with pytest.raises(ValueError, match="inside SLURM job 42.*--force"):
        refuse_inside_job(False, {"SLURM_JOB_ID": "42"})
    refuse_inside_job(True, {"SLURM_JOB_ID": "42"})
    refuse_inside_job(False, {})


def test_job_records_accumulate_in_the_run_dir(tmp_path):
    record_jobs(tmp_path, [SubmittedJob("pretrain", "11", "a", "l", None)])
    record_jobs(tmp_path, [SubmittedJob("finetune", "12", "b", "m", "pretrain")])
    assert [(e["stage"], e["job_id"], e["depends_on"]) for e in load_jobs(tmp_path)] == [
        ("pretrain", "11", None), ("finetune", "12", "pretrain")]
    assert "text" not in json.loads((tmp_path / "jobs.json").read_text())[0]


def test_cli_dry_run_prints_the_chained_scripts(tmp_path):
    data = yaml.safe_load(EXAMPLE.read_text())
    data["launch"].update(workdir=str(tmp_path), python=sys.executable, preflight=False)
    cfg_path = _write(tmp_path, data)
    env = dict(os.environ, SLURM_JOB_ID="")
    out = subprocess.run([sys.executable, "-m", "cluster", "submit", "pipeline", "--config", str(cfg_path),
                          "--dry-run"], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("#!/bin/bash") == 3 and "finetune.sbatch (after pretrain succeeds)" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "cluster", "submit", "pretrain", "--config", str(tmp_path / "no.yaml")],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "cluster config not found" in bad.stderr


def test_pretrain_script_runs_the_distributed_preflight_first_unless_disabled():
    cfg = load_cluster_config(EXAMPLE)
    text = render(cfg, "pretrain")
    step = '"$PYTHON" -m cluster.launch "$PYTHON" -m pretrain.preflight --config configs/pretrain.yaml'
    assert step in text and text.index(step) < text.index('-m pretrain --config')
    assert "import importlib" not in text  # the import-only check is for the other stages
    cfg.launch.preflight = False
    assert "pretrain.preflight" not in render(cfg, "pretrain")


def test_multinode_run_dir_on_a_node_local_path_is_warned_about(tmp_path):
    from cluster.submit import _mount_fstype, shared_fs_warnings

    cfg = ClusterConfig(slurm=SlurmConfig(nodes=2), launch=LaunchConfig(run_dir="/tmp/run"))
    [warning] = shared_fs_warnings(cfg, ["pretrain"])
    assert "/tmp/run" in warning and "slurm.nodes=2" in warning
    assert shared_fs_warnings(cfg, ["finetune"]) == []  # finetune runs on one node
    assert shared_fs_warnings(ClusterConfig(launch=LaunchConfig(run_dir="/tmp/run")), ["pretrain"]) == []
    mounts = tmp_path / "mounts"
    mounts.write_text("overlay / overlay rw 0 0\ntmpfs /work/fast tmpfs rw 0 0\n")
    assert _mount_fstype("/work/fast/run", str(mounts)) == "tmpfs"
    assert _mount_fstype("/work/x", str(mounts)) == "overlay"


def test_ray_worker_args_reach_only_the_worker_nodes_and_replace_the_temp_dir():
    cfg = load_cluster_config(EXAMPLE)
    cfg.ray.worker_args = ["--temp-dir=/tmp/rw", "--node-manager-port=7001"]
    lines = render(cfg, "shards").splitlines()
    [head] = [x for x in lines if "start --head" in x]
    [worker] = [x for x in lines if 'start --address="$RAY_ADDRESS_ARG"' in x]
    assert "--temp-dir=/tmp/ray-maskpot" in head and "7001" not in head
    assert "--temp-dir=/tmp/rw --node-manager-port=7001" in worker and "/tmp/ray-maskpot" not in worker
    with pytest.raises(ValueError, match="ray.worker_args"):
        load_cluster_config(EXAMPLE).ray.__class__(worker_args="--port 1")
