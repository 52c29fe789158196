"""Render → write into the run dir → `sbatch --parsable`; jobs recorded in RUN_DIR/jobs.json for status/cancel."""
from __future__ import annotations

import dataclasses
import getpass
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.config import ClusterConfig
from cluster.sbatch import STAGES, StageScript, job_name, render, render_pipeline

JOBS_FILE = "jobs.json"


class SubmitError(RuntimeError):
    """sbatch/squeue/scancel failed or is missing: the message holds its output."""


@dataclass(frozen=True)
class SubmittedJob:
    stage: str
    job_id: str | None  # None on a dry run
    script: str
    log: str
    depends_on: str | None
    text: str = dataclasses.field(default="", repr=False)  # the rendered script


def absolutised(cfg: ClusterConfig) -> ClusterConfig:
    """Copy of `cfg` with run_dir and workdir absolute (jobs start in another cwd than the submitter)."""
    launch = cfg.launch
    workdir = os.path.abspath(launch.workdir or os.getcwd())
    run_dir = os.path.join(workdir, launch.run_dir) if not os.path.isabs(launch.run_dir) else launch.run_dir
    return dataclasses.replace(cfg, launch=dataclasses.replace(launch, workdir=workdir, run_dir=run_dir))


def preflight(cfg: ClusterConfig, stages: list[str]) -> None:
    """Submit-time checks: stage configs exist (relative to workdir) and the interpreter runs."""
    workdir = Path(cfg.launch.workdir or ".")
    for stage in stages:
        path = {"pretrain": cfg.launch.pretrain_config, "finetune": cfg.launch.finetune_config}.get(stage)
        if path and not (workdir / path).is_file():
            raise FileNotFoundError(f"launch.{stage}_config not found: {workdir / path}")
    python = cfg.launch.python
    if os.sep not in python and shutil.which(python) is None:
        raise FileNotFoundError(f"launch.python {python!r} is not on PATH here (nodes may differ: "
                                "set launch.preflight: false to skip this check)")
    if os.sep in python and not os.access(python, os.X_OK):
        raise FileNotFoundError(f"launch.python {python!r} is not an executable file")


def refuse_inside_job(force: bool, environ=None) -> None:
    env = os.environ if environ is None else environ
    if env.get("SLURM_JOB_ID") and not force:
        raise ValueError(f"refusing to submit from inside SLURM job {env['SLURM_JOB_ID']} (its limits and "
                         "environment would leak into the new jobs); use --force to do it anyway")


NODE_LOCAL_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/local", "/scratch/local")
NODE_LOCAL_FSTYPES = ("tmpfs", "ramfs")


def _mount_fstype(path: str, mounts_file: str = "/proc/mounts") -> str | None:
    """Filesystem type of the longest mount point containing `path` (None where /proc/mounts is unreadable)."""
    try:
        entries = [line.split()[1:3] for line in Path(mounts_file).read_text().splitlines() if line.strip()]
    except OSError:
        return None
    best = max((m for m in entries if path == m[0] or path.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else None


def shared_fs_warnings(cfg: ClusterConfig, stages: list[str]) -> list[str]:
    """Heuristic: a multi-node stage whose run_dir is under a node-local path (/tmp, /dev/shm, …) or on a
    tmpfs cannot share checkpoints, logs and shards between nodes. Only a warning: clusters differ."""
    if cfg.slurm.nodes < 2 or not any(s in ("shards", "pretrain") for s in stages):
        return []
    run_dir = os.path.realpath(cfg.launch.run_dir)
    fstype = _mount_fstype(run_dir)
    local = any(run_dir == p or run_dir.startswith(p + "/") for p in NODE_LOCAL_PREFIXES)
    if not local and fstype not in NODE_LOCAL_FSTYPES:
        return []
    why = f"filesystem type {fstype}" if fstype in NODE_LOCAL_FSTYPES else "a node-local path"
    return [f"warning: launch.run_dir {run_dir} looks like {why}, but slurm.nodes={cfg.slurm.nodes}: every node "
            "must see the same run dir, checkpoints and shards (use a shared filesystem such as $HOME, /work or "
            "a parallel filesystem)"]


LIVE_STATES = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING")


def refuse_live_jobs(run_dir: Path, force: bool) -> None:
    """A run dir whose recorded jobs are still queued or running gets no new job unless forced."""
    if force or not (Path(run_dir) / JOBS_FILE).is_file():
        return
    live = {i: s for i, s in status(run_dir).items() if s.split()[0] in LIVE_STATES}
    if live:
        jobs = ", ".join(f"{i} ({s})" for i, s in live.items())
        raise ValueError(f"run dir {run_dir} still has job(s) {jobs}: submitting again would run two jobs on the "
                         "same checkpoints; wait, `maskpot cancel --config …`, or use --force")


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        raise SubmitError(f"{cmd[0]} not found on PATH: is this a SLURM login node?")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        output = proc.stderr.strip() or proc.stdout.strip()
        raise SubmitError(f"{' '.join(cmd)} failed with status {proc.returncode}: {output}")
    return proc.stdout


def _sbatch(script: Path, after_id: str | None) -> str:
    dependency = [f"--dependency=afterok:{after_id}", "--kill-on-invalid-dep=yes"] if after_id else []
    cmd = ["sbatch", "--parsable", *dependency]
    out = _run(cmd + [str(script)]).strip()
    return out.split(";")[0]  # "<id>[;cluster]"


def submit(cfg: ClusterConfig, stage: str, dry_run: bool = False, force: bool = False) -> list[SubmittedJob]:
    """Submit one stage, or all configured stages chained with afterok ("pipeline")."""
    if stage not in (*STAGES, "pipeline"):
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join((*STAGES, 'pipeline'))}")
    cfg = absolutised(cfg)
    scripts = (render_pipeline(cfg) if stage == "pipeline" else [StageScript(stage, render(cfg, stage), None)])
    if cfg.launch.preflight:
        preflight(cfg, [s.stage for s in scripts])
    run_dir = Path(cfg.launch.run_dir)
    if not dry_run:
        refuse_inside_job(force)
        refuse_live_jobs(run_dir, force)
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}
    jobs = []
    for s in scripts:
        path = run_dir / f"{s.stage}.sbatch"
        job_id = None
        if not dry_run:
            path.write_text(s.text)
            job_id = _sbatch(path, ids.get(s.after) if s.after else None)
            ids[s.stage] = job_id
        log = str(run_dir / "logs" / f"{job_name(cfg, s.stage)}-{job_id or '%j'}.out")
        jobs.append(SubmittedJob(s.stage, job_id, str(path), log, s.after, s.text))
    if not dry_run:
        record_jobs(run_dir, jobs)
    return jobs


def record_jobs(run_dir: Path, jobs: list[SubmittedJob]) -> None:
    path = Path(run_dir) / JOBS_FILE
    previous = load_jobs(run_dir) if path.exists() else []
    entries = previous + [{"stage": j.stage, "job_id": j.job_id, "script": j.script, "log": j.log,
                           "depends_on": j.depends_on, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
                          for j in jobs]
    tmp = path.with_name(f".{JOBS_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(entries, indent=2) + "\n")
    os.replace(tmp, path)


def load_jobs(run_dir) -> list[dict]:
    path = Path(run_dir) / JOBS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no jobs recorded: {path} does not exist (submit something first)")
    entries = json.loads(path.read_text())
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "job_id" in e for e in entries):
        raise ValueError(f"{path}: expected a list of job records with 'job_id'")
    return entries


def status(run_dir) -> dict[str, str]:
    """job id → SLURM state for the recorded jobs (squeue; sacct-less clusters: gone jobs read 'finished')."""
    ids = [str(e["job_id"]) for e in load_jobs(run_dir) if e["job_id"]]
    # all of this user's jobs, filtered here: `squeue -j` fails outright once one id has been purged
    out = _run(["squeue", "-h", "-o", "%i %T", "-u", getpass.getuser()]) if ids else ""
    states = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
    return {i: states.get(i, "FINISHED (not in squeue)").strip() for i in ids}


def cancel(run_dir) -> list[str]:
    """scancel every recorded job still queued or running; returns the ids cancelled."""
    live = [i for i, state in status(run_dir).items() if not state.startswith("FINISHED")]
    if live:
        _run(["scancel", *live])
    return live
