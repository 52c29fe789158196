"""`maskpot pretrain`: validate the config here, then launch one process per rank with torchrun."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from data_shards.config_io import load_config, parse_dotted_overrides
from pretrain import distributed as D
from pretrain import mixture, stages
from pretrain.config import PretrainConfig


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="masked (or denoising) pretraining with DeepSpeed, one process per rank",
        description="Validates the config, then runs N ranks of `python -m pretrain` (pretrain.launch, rendezvous "
                    "on 127.0.0.1). "
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
    # pretrain.launch, not torchrun: torchrun's rendezvous store listens on every interface; ours on
    # 127.0.0.1 only. It forwards TERM/INT/HUP/QUIT and USR1 (SLURM's before-walltime signal) to the ranks.
    cmd = [sys.executable, "-m", "pretrain.launch", "--nproc", str(args.nproc), "--",
           "-m", "pretrain", "--config", str(args.config), "--resume", args.resume]
    overrides = [*args.override, *([f"train.init={args.init}"] if getattr(args, "init", None) else [])]
    if overrides:
        cmd += ["--override", *overrides]
    if args.allow_config_change:
        cmd.append("--allow-config-change")
    return cmd


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    overrides = [*args.override, *([f"train.init={args.init}"] if getattr(args, "init", None) else [])]
    cfg = load_config(PretrainConfig, args.config, parse_dotted_overrides(overrides))
    from pretrain.loop import check_cutoff_fits_data, check_objective_fits_data  # startup: ase+safetensors+torch+vesin

    # a missing or broken shard set, incompatible sets, an objective a set cannot serve, a graph radius that
    # leaves atoms without neighbours, or an --init export of another architecture: fails before any rank starts
    sets = mixture.load_sets(cfg)
    mixture.check_objective_per_set(cfg, sets, check_objective_fits_data)
    for shard_set in sets:
        check_cutoff_fits_data(cfg.model.name, cfg.model.cutoff, shard_set.manifest_dir, cfg.data.train_split)
    stages.check_init(cfg)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    device = check_local_launch(cfg.train.device, args.nproc)
    if device.type == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    return subprocess.run(launch_command(args), env=env).returncode


def check_local_launch(device_name: str, nproc: int):
    """LaunchError (exit 2) before torchrun starts when `nproc` local ranks on `device_name` cannot work."""

    device = D.resolve_device(device_name, local_rank=0)
    D.check_launch(device, D.choose_backend(device), env=dict(os.environ, LOCAL_WORLD_SIZE=str(nproc),
                                                              MASTER_ADDR="127.0.0.1"))
    return device
