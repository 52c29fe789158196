"""`maskpot pretrain`: validate the config here, then launch one process per rank with torchrun."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from data_shards.config_io import load_config, parse_dotted_overrides
from pretrain import mixture
from pretrain.config import PretrainConfig


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="masked (or denoising) pretraining with DeepSpeed, one process per rank",
        description="Validates the config, then runs `torchrun --standalone --nproc_per_node N -m pretrain`. "
                    "Output: OUT_DIR/metrics.jsonl, OUT_DIR/checkpoints/, OUT_DIR/export/ (model for finetuning).",
    )
    p.add_argument("--config", required=True, help="pretraining YAML (see configs/pretrain/tiny.yaml)")
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) on this machine (default 2)")
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="e.g. train.max_steps=50 deepspeed.zero_stage=2")
    p.add_argument("--resume", default="auto",
                   help="auto: continue from OUT_DIR/checkpoints when present (default); never; or a PATH")
    p.add_argument("--init", default=None, metavar="EXPORT",
                   help="continue pretraining from this export (two-stage: new data, objective or LR schedule; "
                        "the same architecture); sets train.init")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the config or the data manifest differs from the checkpoint's")
    p.set_defaults(func=run)


def launch_command(args: argparse.Namespace) -> list[str]:
    # torchrun forwards only TERM/INT/HUP/QUIT by default; USR1 is SLURM's usual before-walltime signal,
    # on which every rank checkpoints and exits 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
           "-m", "pretrain", "--config", str(args.config), "--resume", args.resume]
    overrides = [*args.override, *([f"train.init={args.init}"] if getattr(args, "init", None) else [])]
    if overrides:
        cmd += ["--override", *overrides]
    if args.allow_config_change:
        cmd.append("--allow-config-change")
    return cmd


def run(args: argparse.Namespace) -> int:
    import torch  # startup: torch (+7 s) off the maskpot CLI start

    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    overrides = [*args.override, *([f"train.init={args.init}"] if getattr(args, "init", None) else [])]
    cfg = load_config(PretrainConfig, args.config, parse_dotted_overrides(overrides))
    from pretrain import stages  # startup: imports torch (+7 s); kept off the maskpot CLI start
    from pretrain.loop import check_objective_fits_data  # startup: imports torch (+7 s); kept off the maskpot CLI start

    # a missing or broken shard set, incompatible sets, an objective a set cannot serve, or an --init export
    # of another architecture: fails before any rank starts
    mixture.check_objective_per_set(cfg, mixture.load_sets(cfg), check_objective_fits_data)
    stages.check_init(cfg)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    return subprocess.run(launch_command(args), env=env).returncode
