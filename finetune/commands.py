"""`maskpot finetune` (sub-command of the top-level CLI) and `python -m finetune`: the same options."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from data_shards.config_io import load_config, merge, parse_dotted_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="finetune YAML (see configs/finetune/tiny.yaml)")
    p.add_argument("--init", default=None, metavar="EXPORT",
                   help="pretrain export folder to start from (overrides `init` in the config); "
                        "its architecture replaces the config's model section")
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="e.g. train.max_steps=50 data.train_frames=30 tracking.uri=http://127.0.0.1:5000")
    p.add_argument("--resume", default="auto", choices=["auto", "never"],
                   help="auto (default): continue from OUT_DIR/checkpoint when there is one (written on "
                        "SIGUSR1/SIGTERM and every train.checkpoint_every steps); never: start over")


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="train energies + forces from a pretrain export (or from scratch), tracked in MLflow",
        description="Single-process finetuning. Output: OUT_DIR/results.json, OUT_DIR/export/ (the best model "
                    "by validation force RMSE), plots, and an MLflow run (default store "
                    "sqlite:///OUT_DIR/mlflow.db; browse with `mlflow ui --backend-store-uri ...`).")
    add_arguments(p)
    p.set_defaults(func=run)


def load_finetune_config(args: argparse.Namespace):
    from finetune.config import FinetuneConfig

    overrides = parse_dotted_overrides(args.override)
    if args.init is not None:
        overrides = merge(overrides, {"init": args.init})
    return load_config(FinetuneConfig, args.config, overrides)


def run(args: argparse.Namespace) -> int:
    from finetune.loop import run_finetune

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    results = run_finetune(load_finetune_config(args), args.resume)
    if "preempted" in results:  # checkpointed on a signal: exit 0, a requeued job continues (--resume auto)
        print(json.dumps(results))
        return 0
    summary = {"best_step": results["best_step"], "best_val": results["best_val"], "test": results["test"],
               "export_dir": results["export_dir"], "mlflow": results["tracking"]}
    print(json.dumps(summary, indent=2, default=float))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m finetune --config FILE [--init EXPORT] [--override k=v ...]`; user errors exit 2."""
    parser = argparse.ArgumentParser(prog="python -m finetune", description="Finetune on energies and forces.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2
