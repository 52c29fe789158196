"""`maskpot study`: the command line of the reproduction study (see maskpot.study.stages for what runs).

Above both stages (the main grid) and ablation (the `--ablation` runs), so neither imports the other's caller.
"""
from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from data_shards.config_io import parse_dotted_overrides
from maskpot.study import ablation as study_ablation
from maskpot.study import grid, stages
from maskpot.study.config import load_study
from maskpot.study.pretraining import check_run_configs


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "study", help="the reproduction study: corpus → pretraining variants → finetunes × budgets × seeds → report",
        description=stages.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="study YAML (default: the shipped configs/study/water.yaml, package data maskpot.configs)")
    p.add_argument("--scale", default="small",
                   help="a scale defined in the YAML: tiny (CI, ~3 min, no claims), small (the numbers in "
                        "REPORT.md: days on 2 cores; --plan lists its runs, --override selects some), full "
                        "(the whole grid: a GPU), paper (258-water boxes, paper epochs: a GPU cluster). "
                        "Default small")
    p.add_argument("--out", default=None, help="run folder (default: out_dir from the YAML, with the scale)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. finetune.jobs=1 seeds=[0] dft_water.budgets=[30]")
    p.add_argument("--only", nargs="+", default=[], metavar="GLOB",
                   help="run only the finetunes whose name SETTING/RUN matches a shell glob, e.g. "
                        "'dft_water/egnn_mask@dft_positions_n30_s*p1' (pretraining seed 0 has no p suffix); "
                        "only the pretrainings (and the corpus) they need run; a glob that matches no finetune "
                        "of the grid (or of --ablation's) is refused before any work; --plan counts the selected "
                        "runs; the report covers every finished run")
    p.add_argument("--reread-converged", action="store_true",
                   help="read out again at convergence the finished finetunes (of those --only selects) whose "
                        "at-convergence read-out ran under another stopping rule than the config's (cap "
                        "finetune.converge_steps, patience, patience_min_steps, anneal_steps); each old read-out "
                        "is kept as RUN/converged.previousK, the fixed-budget read-out is reused. Repeating the "
                        "command re-reads nothing more; an interrupted re-read resumes")
    p.add_argument("--plan", action="store_true", help="print the stages and run counts, run nothing")
    p.add_argument("--report-only", action="store_true", help="rebuild tables and plots from finished runs")
    p.add_argument("--ablation", action="append", default=[], metavar="NAME",
                   help="run ablation NAME from the YAML's `ablations` instead of the main grid (repeatable; "
                        "'all' for every one): only the stages it needs, on DFT water, its runs named "
                        "VARIANT@NAME in the same run folder; the report gains report/ablations.md")
    p.set_defaults(func=run)


def resolve_config_path(path: str | None) -> Path:
    """`path`, or the shipped study config (package data) when none is given."""
    if path is None:
        return Path(str(resources.files("maskpot.configs") / "study" / "water.yaml"))
    return Path(path)


def run(args: argparse.Namespace) -> int:
    overrides = parse_dotted_overrides(args.override)
    if args.only:
        overrides["only"] = list(args.only)
    if args.reread_converged:
        overrides["reread_converged"] = True
    cfg = load_study(resolve_config_path(args.config), args.scale, overrides)
    out = Path(args.out or f"{cfg.out_dir}_{cfg.scale}").resolve()
    check_run_configs(cfg, out)
    names = study_ablation.resolve_names(cfg, args.ablation) if args.ablation else []
    if not names:
        grid.check_only(cfg)   # the ablations check their own runs (run_ablations)
    if args.plan:
        print(study_ablation.describe(cfg, names) if names else stages.describe_plan(cfg, out))
        return 0
    from maskpot.study import (
        report as study_report,  # startup: imports torch + matplotlib (+9 s); kept off the maskpot CLI start
    )

    if not args.report_only:
        if names:
            study_ablation.run_ablations(cfg, out, names)
        else:
            stages.run_study(cfg, out)
    summary = study_report.write_report(out)
    print(summary, flush=True)
    return 0
