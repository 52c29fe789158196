"""`maskpot finetune` (sub-command of the top-level CLI) and `python -m finetune`: the same options."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from data_shards.cli_errors import exit_2_on_user_error
from data_shards.config_io import load_config, merge, parse_dotted_overrides
from data_shards.progress import quiet_libraries
from pretrain.tracking_links import ui_command


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
                    "sqlite:///OUT_DIR/mlflow.db). Prints the val/test error table and the command that opens the "
                    "MLflow runs table; every figure is in OUT_DIR/results.json.")
    add_arguments(p)
    p.set_defaults(func=run)


def load_finetune_config(args: argparse.Namespace):
    from finetune.config import FinetuneConfig  # startup: imports torch (+7 s); kept off the maskpot CLI start

    overrides = parse_dotted_overrides(args.override)
    if args.init is not None:
        overrides = merge(overrides, {"init": args.init})
    return load_config(FinetuneConfig, args.config, overrides)


def run(args: argparse.Namespace) -> int:
    from finetune.loop import (  # startup: imports torch (+7 s); kept off the maskpot CLI start
        RESULTS_FILE,
        run_finetune,
    )

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    cfg = load_finetune_config(args)
    results = run_finetune(cfg, args.resume)
    if "preempted" in results:  # checkpointed on a signal: exit 0, a requeued job continues (--resume auto)
        print(json.dumps(results))
        return 0
    print(result_table(results, Path(cfg.train.out_dir) / RESULTS_FILE))
    return 0


def _cell(figures: dict | None, key: str) -> str:
    value = (figures or {}).get(key)
    return "n/a" if value is None else f"{value:.2f}"


def result_table(results: dict, results_path: Path) -> str:
    """What a finetune prints: best step, val/test errors as a table, where the files and the MLflow run are
    (all figures are in OUT_DIR/results.json)."""
    rows = [("val (best)", results.get("best_val")), ("test", results.get("test"))]
    lines = [f"finetune: best step {results['best_step']}",
             "| split      | energy RMSE (meV/atom) | force RMSE (meV/Å) | force MAE (meV/Å) |",
             "|------------|------------------------|--------------------|-------------------|"]
    lines += [f"| {name:<10} | {_cell(f, 'energy_rmse_mev_per_atom'):>22} | {_cell(f, 'force_rmse_mev_per_a'):>18} | "
              f"{_cell(f, 'force_mae_mev_per_a'):>17} |" for name, f in rows if f is not None]
    lines.append(f"export: {results['export_dir']}   all figures: {results_path}")
    tracking = results.get("tracking") or {}
    if tracking.get("run_id"):
        command = ui_command(tracking["tracking_uri"], tracking["experiment_id"])
        lines.append(f"MLflow run {tracking['run_id']}: {command}")
    elif tracking.get("pending_file"):
        lines.append(f"MLflow store unreachable: the run is buffered in {tracking['pending_file']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m finetune --config FILE [--init EXPORT] [--override k=v ...]`; user errors exit 2."""
    parser = argparse.ArgumentParser(prog="python -m finetune", description="Finetune on energies and forces.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return exit_2_on_user_error("finetune", lambda: run(args))
