"""Real SLURM (22.05, 2 virtual nodes on this host): `maskpot submit pipeline` runs a 2-node × 1-task DeepSpeed
pretraining of the tiny model, then the finetune that depends on it (afterok), both to completion."""
import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.net import free_ports
from tests.helpers.paths import REPO
from tests.helpers.slurm_cluster import LocalSlurm, SlurmUnavailable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def slurm():
    cluster = LocalSlurm(nnodes=2)
    try:
        cluster.start()
    except (SlurmUnavailable, OSError) as e:
        cluster.stop()
        pytest.skip(f"NO REAL SLURM: local cluster could not be started: {e}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def two_node_shards(tmp_path_factory) -> Path:
    """12 flexible-TIP3P frames of 4 H2O: 8 train (2 shards: one per rank) / 2 val / 2 test."""
    from data_shards.build import build_shards
    from data_shards.tip3p import tip3p_frames, write_extxyz

    root = tmp_path_factory.mktemp("slurm_shards")
    frames = tip3p_frames(n_molecules=4, n_frames=12, seed=5, steps_between_frames=10, equilibration_steps=50)
    write_extxyz(frames[:8], root / "train.xyz")
    write_extxyz(frames[8:10], root / "val.xyz")
    write_extxyz(frames[10:], root / "test.xyz")
    out = root / "shards"
    build_shards([f"{split}={root / split}.xyz" for split in ("train", "val", "test")], str(out), shard_size=4,
                 use_ray=False, progress=False)
    return out


def _maskpot(env, *args, module="maskpot.cli"):
    """`maskpot ARGS` (maskpot.cli); module="cluster" skips importing torch & co. (3-10 s a call here)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def test_pipeline_pretrains_on_two_nodes_then_finetunes(slurm, two_node_shards, tmp_path):
    t0 = time.monotonic()
    pre_out, ft_out, run_dir = tmp_path / "pretrain", tmp_path / "finetune", tmp_path / "run"
    cfg = {
        "slurm": {"nodes": 2, "ntasks_per_node": 1, "cpus_per_task": 1, "time": "15", "cpu_only": True,
                  "signal_before_walltime": None, "job_name_prefix": "mp-test",
                  # virtual nodes n1/n2 share 127.0.0.1
                  "setup": ["export DS_ACCELERATOR=cpu", "export MASTER_ADDR=127.0.0.1",
                            "export OMP_NUM_THREADS=1 TQDM_DISABLE=1 MLFLOW_DISABLE_TELEMETRY=true"]},
        "launch": {"run_dir": str(run_dir), "python": sys.executable, "workdir": str(REPO),
                   "pretrain_config": "configs/pretrain/tiny.yaml",
                   "pretrain_overrides": [f"data.manifest_dir={two_node_shards}", f"train.out_dir={pre_out}",
                                          "train.max_steps=4", "train.val_every=2", "train.checkpoint_every=2",
                                          "optim.decay_steps=4"],
                   "finetune_config": "configs/finetune/tiny.yaml", "finetune_init": str(pre_out / "export"),
                   "finetune_overrides": [f"data.manifest_dir={two_node_shards}", f"train.out_dir={ft_out}",
                                          "train.max_steps=4", "train.val_every=2",
                                          "tracking.enabled=false"]},
    }
    cfg_path = tmp_path / "cluster.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in slurm.env.items() if not k.startswith("SLURM_JOB")}

    inside = _maskpot(dict(env, SLURM_JOB_ID="9"), "submit", "pretrain", "--config", str(cfg_path))
    assert inside.returncode == 2 and "--force" in inside.stderr

    sub = _maskpot(env, "submit", "pipeline", "--config", str(cfg_path))
    assert sub.returncode == 0, sub.stderr
    print(sub.stdout)
    jobs = json.loads((run_dir / "jobs.json").read_text())
    assert [(j["stage"], j["depends_on"]) for j in jobs] == [("pretrain", None), ("finetune", "pretrain")]
    ids = [j["job_id"] for j in jobs]
    assert all(i.isdigit() for i in ids)

    status = _maskpot(env, "status", "--config", str(cfg_path), module="cluster")
    assert status.returncode == 0 and all(i in status.stdout for i in ids)

    slurm.wait_for_jobs(ids, timeout_s=600)
    logs = {j["stage"]: Path(j["log"]).read_text() if Path(j["log"]).is_file() else "<no log>" for j in jobs}
    for j in jobs:
        print(f"--- {j['stage']} job {j['job_id']}: {slurm.job_state(j['job_id'])}\n{logs[j['stage']][-3000:]}")
    assert all(slurm.job_state(i).startswith("COMPLETED") for i in ids), logs

    pre_log = logs["pretrain"]
    assert "preflight ok: 2 rank(s)" in pre_log and "slowest rank:" in pre_log
    assert pre_log.index("preflight ok: 2 rank(s)") < pre_log.index("finished with status 0")
    metrics = [json.loads(x) for x in (pre_out / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in metrics) == 4
    assert (pre_out / "export" / "model.safetensors").is_file()
    assert (pre_out / "checkpoints" / "step00000004" / "rng-rank1.json").is_file()  # two ranks took part
    assert (ft_out / "export" / "model.safetensors").is_file(), sorted(os.listdir(ft_out))
    assert "test" in json.loads((ft_out / "results.json").read_text())
    print(f"pipeline wall time {time.monotonic() - t0:.1f} s")


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return [p for p in pids if p != os.getpid()]


def test_shards_job_runs_ray_head_on_n1_and_a_worker_on_n2(slurm, tmp_path):
    """Two-node Ray-on-SLURM: head on n1, worker on n2 (both 127.0.0.1, so the worker gets its own ports and
    temp dir), both nodes registered, `shards build --ray-address`, every Ray process gone afterwards."""
    import signal
    import tempfile

    from data_shards.tip3p import tip3p_frames, write_extxyz

    write_extxyz(tip3p_frames(n_molecules=4, n_frames=10, seed=6, steps_between_frames=10, equilibration_steps=50),
                 tmp_path / "water.xyz")
    head_port, nm, om, agent, agent_grpc, metrics, rt_env = free_ports(7)
    ray_tmp, worker_tmp = tempfile.mkdtemp(prefix="ray-"), tempfile.mkdtemp(prefix="rayw-")  # < 108-char sockets
    # Ray refuses a second node unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 ("multi-node … not supported")
    # whenever it decides the head is a local-only cluster, as it does here. On a loaded 2-core machine the
    # worker's raylet can take longer than Ray's default 30 s to register with the head's GCS.
    cfg = {"slurm": {"nodes": 2, "cpus_per_task": 1, "time": "10", "signal_before_walltime": None,
                     "setup": ["export RAY_USAGE_STATS_ENABLED=0 TQDM_DISABLE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 "
                               "RAY_raylet_start_wait_time_s=180"]},
           "ray": {"head_port": head_port, "num_cpus": 1, "object_store_memory": 80_000_000, "temp_dir": ray_tmp,
                   "wait_nodes_s": 120,
                   "worker_args": [f"--temp-dir={worker_tmp}", "--node-ip-address=127.0.0.1",
                                   f"--node-manager-port={nm}", f"--object-manager-port={om}",
                                   # below the ephemeral range (32768-60999) the other ports come from, and
                                   # above Ray's default 10002-19999 that the head's workers use
                                   "--min-worker-port=21000", "--max-worker-port=21999",
                                   f"--dashboard-agent-listen-port={agent}",
                                   f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
                                   f"--runtime-env-agent-port={rt_env}"]},
           "launch": {"run_dir": str(tmp_path / "run"), "python": sys.executable, "workdir": str(REPO),
                      "shards_inputs": [str(tmp_path / "water.xyz")], "shards_out": str(tmp_path / "shards"),
                      "shard_size": 4}}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in slurm.env.items() if not k.startswith("SLURM_JOB")}
    leftovers = []
    try:
        sub = _maskpot(env, "submit", "shards", "--config", str(tmp_path / "cluster.yaml"), module="cluster")
        assert sub.returncode == 0, sub.stderr
        [job] = json.loads((tmp_path / "run" / "jobs.json").read_text())
        slurm.wait_for_jobs([job["job_id"]], timeout_s=300)
        log = Path(job["log"]).read_text()
        print(log[-4000:])
        assert slurm.job_state(job["job_id"]).startswith("COMPLETED"), log
        deadline = time.monotonic() + 30  # SIGTERM lets each raylet drain
        while time.monotonic() < deadline and (
                leftovers := _processes_mentioning(ray_tmp) + _processes_mentioning(worker_tmp)):
            time.sleep(1)
    finally:
        for pid in _processes_mentioning(ray_tmp) + _processes_mentioning(worker_tmp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        import shutil
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(worker_tmp, ignore_errors=True)
    assert "Ray cluster up: 2 nodes" in log
    assert not leftovers, f"Ray processes still running after the job: {leftovers}"
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["totals"]["samples_written"] == 10


def test_cancel_stops_recorded_jobs(slurm, tmp_path):
    (tmp_path / "p.yaml").write_text("{}")
    cfg = {"slurm": {"time": "5", "extra_sbatch": ["--hold"], "signal_before_walltime": None},  # stays pending
           "launch": {"run_dir": str(tmp_path / "run"), "python": sys.executable, "workdir": str(tmp_path),
                      "pretrain_config": "p.yaml"}}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in slurm.env.items() if not k.startswith("SLURM_JOB")}
    submitted = _maskpot(env, "submit", "pretrain", "--config", str(tmp_path / "cluster.yaml"), module="cluster")
    assert submitted.returncode == 0, submitted.stderr
    [job] = json.loads((tmp_path / "run" / "jobs.json").read_text())
    status = _maskpot(env, "status", "--config", str(tmp_path / "cluster.yaml"), module="cluster")
    assert f"{job['job_id']}\tPENDING" in status.stdout
    cancel = _maskpot(env, "cancel", "--config", str(tmp_path / "cluster.yaml"), module="cluster")
    assert cancel.returncode == 0 and f"cancelled: {job['job_id']}" in cancel.stdout
    assert slurm.job_state(job["job_id"]).startswith("CANCELLED")


def test_unknown_partition_reports_sbatchs_own_error(slurm, tmp_path):
    (tmp_path / "p.yaml").write_text("{}")
    cfg = {"slurm": {"partition": "nosuch", "time": "5", "signal_before_walltime": None},
           "launch": {"run_dir": str(tmp_path / "run"), "python": sys.executable, "workdir": str(tmp_path),
                      "pretrain_config": "p.yaml"}}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in slurm.env.items() if not k.startswith("SLURM_JOB")}
    out = _maskpot(env, "submit", "pretrain", "--config", str(tmp_path / "cluster.yaml"), module="cluster")
    assert out.returncode == 1
    assert "sbatch: error:" in out.stderr and "invalid partition" in out.stderr.lower(), out.stderr
    assert not (tmp_path / "run" / "jobs.json").exists()


def test_second_submit_of_a_live_run_is_refused_unless_forced(slurm, tmp_path):
    (tmp_path / "p.yaml").write_text("{}")
    cfg = {"slurm": {"time": "5", "extra_sbatch": ["--hold"], "signal_before_walltime": None},  # stays pending
           "launch": {"run_dir": str(tmp_path / "run"), "python": sys.executable, "workdir": str(tmp_path),
                      "pretrain_config": "p.yaml"}}
    cfg_path = tmp_path / "cluster.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in slurm.env.items() if not k.startswith("SLURM_JOB")}
    try:
        first = _maskpot(env, "submit", "pretrain", "--config", str(cfg_path), module="cluster")
        assert first.returncode == 0, first.stderr
        [job] = json.loads((tmp_path / "run" / "jobs.json").read_text())
        again = _maskpot(env, "submit", "pretrain", "--config", str(cfg_path), module="cluster")
        assert again.returncode == 2 and f"{job['job_id']} (PENDING)" in again.stderr and "--force" in again.stderr
        assert len(json.loads((tmp_path / "run" / "jobs.json").read_text())) == 1
        forced = _maskpot(env, "submit", "pretrain", "--config", str(cfg_path), "--force", module="cluster")
        assert forced.returncode == 0, forced.stderr
        assert len(json.loads((tmp_path / "run" / "jobs.json").read_text())) == 2
    finally:
        _maskpot(env, "cancel", "--config", str(cfg_path), module="cluster")


def test_walltime_warning_checkpoints_requeues_and_resumes(slurm, two_node_shards, tmp_path):
    """USR1 to the batch shell (what `--signal=B:USR1@N` sends before the walltime, here sent at once with
    `scancel --signal=USR1 --batch`) → forwarded to the ranks → checkpoint, exit 0 → `scontrol requeue` →
    the requeued job resumes from the checkpoint and finishes."""
    import subprocess

    pre_out, run_dir = tmp_path / "pretrain", tmp_path / "run"
    cfg = {"slurm": {"nodes": 2, "ntasks_per_node": 1, "time": "15", "cpu_only": True, "signal_before_walltime": 60,
                     "requeue": True, "job_name_prefix": "mp-requeue",
                     "setup": ["export DS_ACCELERATOR=cpu MASTER_ADDR=127.0.0.1 OMP_NUM_THREADS=1 TQDM_DISABLE=1",
                               "export MASKPOT_TEST_STEP_SLEEP_S=1"]},  # slow steps: the signal lands mid-run
           "launch": {"run_dir": str(run_dir), "python": sys.executable, "workdir": str(REPO),
                      "pretrain_config": "configs/pretrain/tiny.yaml",
                      "pretrain_overrides": [f"data.manifest_dir={two_node_shards}", f"train.out_dir={pre_out}",
                                             "train.max_steps=12", "train.val_every=0", "train.checkpoint_every=0",
                                             "optim.decay_steps=12"]}}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in slurm.env.items() if not k.startswith("SLURM_JOB")}
    sub = _maskpot(env, "submit", "pretrain", "--config", str(tmp_path / "cluster.yaml"), module="cluster")
    assert sub.returncode == 0, sub.stderr
    [job] = json.loads((run_dir / "jobs.json").read_text())
    job_id, metrics = job["job_id"], pre_out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (metrics.is_file() and '"step": 2' in metrics.read_text()):
        time.sleep(0.5)
    assert metrics.is_file(), Path(job["log"]).read_text() if Path(job["log"]).is_file() else "no log"
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True, timeout=30)
    slurm.wait_for_jobs([job_id], timeout_s=400)
    log = Path(job["log"]).read_text()
    print(log[-5000:])
    show = slurm.run(["scontrol", "show", "job", job_id], check=False).stdout
    assert slurm.job_state(job_id).startswith("COMPLETED"), log
    assert "Restarts=1" in show, show
    assert "requeueing job" in log and log.count("preflight ok: 2 rank(s)") == 2
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    [stop] = [r for r in records if r.get("preempted")]
    assert 2 <= stop["step"] < 12 and stop["signal"] == 10  # SIGUSR1
    steps = [r["step"] for r in records if "loss" in r]
    assert max(steps) == 12 and steps.count(stop["step"] + 1) == 1  # resumed after the checkpoint, not from 0
    assert (pre_out / "export" / "model.safetensors").is_file()


def test_walltime_warning_checkpoints_and_requeues_a_finetune_that_resumes(slurm, two_node_shards, tmp_path):
    """The finetune job on a real SLURM: USR1 to the batch shell (as `--signal=B:USR1@N` sends it) →
    forwarded to `python -m finetune` → checkpoint, exit 0 → `scontrol requeue` → the requeued job resumes
    at the checkpoint (`--resume auto`), finishes, and its MLflow run is the one the first start opened."""
    import subprocess

    from mlflow import MlflowClient

    ft_out, run_dir = tmp_path / "finetune", tmp_path / "run"
    cfg = {"slurm": {"time": "15", "cpu_only": True, "signal_before_walltime": 60, "requeue": True,
                     "job_name_prefix": "mp-ft-requeue",
                     "setup": ["export OMP_NUM_THREADS=1 TQDM_DISABLE=1 MLFLOW_DISABLE_TELEMETRY=true",
                               "export MASKPOT_TEST_STEP_SLEEP_S=1"]},  # slow steps: the signal lands mid-run
           "launch": {"run_dir": str(run_dir), "python": sys.executable, "workdir": str(REPO), "preflight": False,
                      "finetune_config": "configs/finetune/tiny.yaml",
                      "finetune_overrides": [f"data.manifest_dir={two_node_shards}", f"train.out_dir={ft_out}",
                                             "train.max_steps=12", "train.val_every=4", "train.log_every=1",
                                             "train.checkpoint_every=2"]}}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in slurm.env.items() if not k.startswith("SLURM_JOB")}
    sub = _maskpot(env, "submit", "finetune", "--config", str(tmp_path / "cluster.yaml"), module="cluster")
    assert sub.returncode == 0, sub.stderr
    [job] = json.loads((run_dir / "jobs.json").read_text())
    job_id, state = job["job_id"], ft_out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not state.is_file():  # the periodic checkpoint at step 2
        time.sleep(0.5)
    assert state.is_file(), Path(job["log"]).read_text() if Path(job["log"]).is_file() else "no log"
    run_id = json.loads(state.read_text())["tracking"]["run_id"]
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True, timeout=30)
    slurm.wait_for_jobs([job_id], timeout_s=400)
    log = Path(job["log"]).read_text()
    print(log[-5000:])
    show = slurm.run(["scontrol", "show", "job", job_id], check=False).stdout
    assert slurm.job_state(job_id).startswith("COMPLETED"), log
    assert "Restarts=1" in show, show
    assert "requeueing job" in log and '"preempted": "SIGUSR1"' in log and "resuming from" in log
    results = json.loads((ft_out / "results.json").read_text())
    assert results["steps"] == 12 and results["tracking"]["run_id"] == run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{ft_out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 13))  # each step once: resumed at the checkpoint, not from 0
