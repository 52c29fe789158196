"""`maskpot submit|status|cancel` (also `python -m cluster ...`): SLURM jobs from a cluster YAML."""
from __future__ import annotations

import argparse
import sys

from cluster.config import load_cluster_config
from cluster.sbatch import STAGES, pipeline_stages
from cluster.submit import (
    SubmitError,
    absolutised,
    cancel,
    shared_fs_warnings,
    status,
    submit,
)


def _submit(args) -> int:
    cfg = load_cluster_config(args.config)
    stages = pipeline_stages(cfg) if args.stage == "pipeline" else [args.stage]
    for warning in shared_fs_warnings(absolutised(cfg), stages):
        print(warning, file=sys.stderr)
    try:
        jobs = submit(cfg, args.stage, dry_run=args.dry_run, force=args.force)
    except SubmitError as e:
        print(f"maskpot submit: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        for job in jobs:
            after = f" (after {job.depends_on} succeeds)" if job.depends_on else ""
            print(f"# ---- {job.script}{after}; log {job.log}")
            print(job.text)
        return 0
    for job in jobs:
        after = f" after {job.depends_on}" if job.depends_on else ""
        print(f"{job.stage}: job {job.job_id}{after}  script {job.script}  log {job.log}")
    return 0


def _run_dir(args) -> str:
    return absolutised(load_cluster_config(args.config)).launch.run_dir


def _status(args) -> int:
    try:
        states = status(_run_dir(args))
    except SubmitError as e:
        print(f"maskpot status: {e}", file=sys.stderr)
        return 1
    for job_id, state in states.items():
        print(f"{job_id}\t{state}")
    return 0


def _cancel(args) -> int:
    try:
        ids = cancel(_run_dir(args))
    except SubmitError as e:
        print(f"maskpot cancel: {e}", file=sys.stderr)
        return 1
    print(f"cancelled: {' '.join(ids)}" if ids else "nothing to cancel: no recorded job is queued or running")
    return 0


def add_commands(subparsers) -> None:
    """Register `submit`, `status` and `cancel` on the top-level parser's subparsers."""
    s = subparsers.add_parser(
        "submit", help="render an sbatch script from a cluster YAML and submit it (sbatch --parsable)",
        description="Writes RUN_DIR/STAGE.sbatch, submits it and records the job id in RUN_DIR/jobs.json. "
                    "`pipeline` submits every configured stage chained with --dependency=afterok.")
    s.add_argument("stage", choices=[*STAGES, "pipeline"])
    s.add_argument("--config", required=True, help="cluster YAML with slurm:, ray:, launch: sections")
    s.add_argument("--dry-run", action="store_true", help="print the scripts; write and submit nothing")
    s.add_argument("--force", action="store_true",
                   help="submit even from inside a SLURM job, or while jobs of this run dir are still queued/running")
    s.set_defaults(func=_submit)
    for name, func, text in (("status", _status, "squeue state of the jobs recorded in RUN_DIR/jobs.json"),
                             ("cancel", _cancel, "scancel the recorded jobs that are still queued or running")):
        p = subparsers.add_parser(name, help=text, description=text)
        p.add_argument("--config", required=True, help="the cluster YAML the jobs were submitted with")
        p.set_defaults(func=func)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster", description="maskpot SLURM submission")
    add_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    # user errors exit 2 as data_shards.cli_errors does for the layers, written out here: cluster imports none
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
