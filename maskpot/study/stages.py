"""`maskpot study`: the reproduction study, in stages that resume.

corpus (TIP3P, OpenMM) → shards (Ray) → one DeepSpeed pretraining per model × objective → finetunes of
every variant (scratch and each pretrained export) × label budget × seed on DFT water, TIP3P labels and
rMD17 ethanol, all with the same finetune budget → tables, plots and summary.md (maskpot.study.report).

A stage whose output exists is skipped, so rerunning the same command after an interruption finishes
only what is missing (a pretraining killed midway resumes from its last checkpoint). Every finetune is
one MLflow run in one experiment, tagged with its setting, variant, budget, seed and pretraining lineage.
"""
from __future__ import annotations

import argparse
import dataclasses
from importlib import resources
from pathlib import Path

import yaml

from data_shards.config_io import parse_dotted_overrides, to_dict
from maskpot.study import ablation as study_ablation
from maskpot.study import grid
from maskpot.study.config import (
    ETHANOL_VARIANTS,
    VARIANTS,
    PretrainStageConfig,
    StudyConfig,
    load_study,
)
from maskpot.study.finetunes import (  # ablation and tests import these from here too
    FinetuneJob,
    Timings,
    _banner,
    finetune_config,
    run_finetunes,
)
from maskpot.study.grid import describe_plan

SETTINGS = ("dft_water", "tip3p", "ethanol")
TIMINGS_FILE = "timings.json"


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "study", help="the reproduction study: corpus → pretraining variants → finetunes × budgets × seeds → report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="study YAML (default: the shipped configs/study/water.yaml, package data maskpot.configs)")
    p.add_argument("--scale", default="small",
                   help="a scale defined in the YAML: tiny (CI, ~3 min, no claims), small (~90 min on 2 cores, "
                        "the numbers in REPORT.md), full (the whole grid: many hours, or a GPU), paper "
                        "(258-water boxes, paper epochs: a GPU cluster). Default small")
    p.add_argument("--out", default=None, help="run folder (default: out_dir from the YAML, with the scale)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. finetune.jobs=1 seeds=[0] dft_water.budgets=[30]")
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
    cfg = load_study(resolve_config_path(args.config), args.scale, parse_dotted_overrides(args.override))
    out = Path(args.out or f"{cfg.out_dir}_{cfg.scale}").resolve()
    names = study_ablation.resolve_names(cfg, args.ablation) if args.ablation else []
    if args.plan:
        print(study_ablation.describe(cfg, names) if names else describe_plan(cfg, out))
        return 0
    from maskpot.study import report as study_report

    if not args.report_only:
        if names:
            study_ablation.run_ablations(cfg, out, names)
        else:
            run_study(cfg, out)
    summary = study_report.write_report(out)
    print(summary, flush=True)
    return 0


def run_study(cfg: StudyConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    timings = Timings(out / TIMINGS_FILE)
    print(describe_plan(cfg, out), flush=True)
    # the order of describe_plan: the headline DFT-water rows first, then the other settings and experiments
    corpus = timings.stage("corpus", lambda: stage_corpus(cfg, out))
    exports = timings.stage("pretrain", lambda: stage_pretrain_water(cfg, out, corpus))
    if cfg.dft_water.enabled:
        dft = stage_dft_shards(cfg, out)
        jobs = water_jobs(cfg, out, "dft_water", dft, cfg.variants, cfg.dft_water.budgets, exports,
                          cfg.headline_pretrain_seeds())
        timings.stage("finetune", lambda: run_finetunes(cfg, jobs, "headline finetunes (DFT water)"))
    if cfg.tip3p.enabled:
        jobs = water_jobs(cfg, out, "tip3p", stage_tip3p_labels(cfg, out), cfg.tip3p.variants,
                          [cfg.tip3p.budget], exports)
        timings.stage("finetune_tip3p", lambda: run_finetunes(cfg, jobs, "TIP3P finetunes"))
    if cfg.dft_water.enabled:
        grid.run_experiments(cfg, out, timings, corpus, dft)
    if cfg.ethanol.enabled:
        jobs = timings.stage("ethanol_pretrain", lambda: ethanol_jobs(cfg, out))
        timings.stage("finetune_ethanol", lambda: run_finetunes(cfg, jobs, "ethanol finetunes"))


def stage_corpus(cfg: StudyConfig, out: Path) -> Path:
    from data_shards.build import build_shards
    from data_shards.tip3p import generate_tip3p

    c = cfg.corpus
    shards = out / "shards" / "corpus"
    if not (shards / "manifest.json").is_file():
        _banner(f"TIP3P corpus: {c.frames} frames × {c.molecules} H2O, seed {c.seed}")
        xyz = generate_tip3p(out / "data", n_molecules=c.molecules, n_frames=c.frames, seed=c.seed,
                             steps_between_frames=c.steps_between_frames)
        _banner("sharding the corpus with Ray")
        build_shards([str(xyz)], str(shards), shard_size=c.shard_size,
                     split_fractions=(1.0 - c.val_fraction, c.val_fraction, 0.0), require_labels=False)
    return shards


def stage_dft_shards(cfg: StudyConfig, out: Path) -> Path:
    from data_shards.build import build_shards

    shards = out / "shards" / "dft_water"
    if not (shards / "manifest.json").is_file():
        root = Path(cfg.dft_water.path)
        if not (root / "data_0").is_dir() and (root / "data" / "data_0").is_dir():
            root = root / "data"
        systems = [root / f"data_{i}" for i in range(4)]
        missing = [str(s) for s in systems if not (s / "type.raw").is_file()]
        if missing:
            raise FileNotFoundError(f"dft_water.path {cfg.dft_water.path}: DeePMD systems missing: {missing} "
                                    f"(set dft_water.enabled=false to skip this setting)")
        _banner(f"sharding DFT water from {root}")
        build_shards([f"train={systems[0]}", f"train={systems[1]}", f"val={systems[2]}", f"test={systems[3]}"],
                     str(shards), shard_size=80)
    return shards


def stage_tip3p_labels(cfg: StudyConfig, out: Path) -> Path:
    from data_shards.build import build_shards
    from data_shards.tip3p import generate_tip3p

    shards = out / "shards" / "tip3p_labels"
    if not (shards / "manifest.json").is_file():
        c = cfg.corpus
        _banner(f"labelled TIP3P trajectory: {cfg.tip3p.labelled_frames} frames, seed {c.seed + 1}")
        xyz = generate_tip3p(out / "data", n_molecules=c.molecules, n_frames=cfg.tip3p.labelled_frames,
                             seed=c.seed + 1, steps_between_frames=c.steps_between_frames)
        build_shards([str(xyz)], str(shards), shard_size=100, split_fractions=(0.6, 0.2, 0.2))
    return shards


def pretrain_one(cfg: StudyConfig, run_dir: Path, manifest_dir: Path, model: str, params: dict,
                 objective: dict, steps: int, batch_size: int, stage: PretrainStageConfig | None = None,
                 init: Path | None = None) -> Path:
    """One DeepSpeed pretraining (resumed if a checkpoint exists); returns its export folder.
    `stage` (default: the study's pretrain section) gives the learning rates, ranks, ZeRO stage and seed;
    `init` an export to continue from (two-stage pretraining, pretrain train.init)."""
    from pretrain.cli import run as run_pretrain

    export = run_dir / "export"
    if (export / "model.json").is_file():
        return export
    p = stage or cfg.pretrain
    config = {
        "data": {"manifest_dir": str(manifest_dir), "batch_size": batch_size, "shuffle_buffer": 256},
        "model": {"name": model, "params": params},
        "objective": objective,
        "optim": {"lr": p.lr, "warmup_steps": max(steps // 20, 1), "min_lr": p.min_lr},
        "deepspeed": {"zero_stage": p.zero_stage, "precision": "fp32"},
        "train": {"max_steps": steps, "log_every": max(steps // 20, 1), "val_every": max(steps // 5, 1),
                  "val_batches": 4, "checkpoint_every": max(steps // 4, 1), "out_dir": str(run_dir),
                  "seed": p.seed, **({"init": str(init)} if init else {})},
        # the pretraining is a run of the study's experiment; its finetunes nest under it (finetune_config)
        "tracking": {"enabled": True, "uri": f"sqlite:///{out_root(run_dir) / 'mlflow.db'}",
                     "experiment": cfg.experiment, "run_name": f"pretrain/{run_dir.name}",
                     "tags": {"study.scale": cfg.scale, "study.stage": "pretrain", "study.model": model}},
    }
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    _banner(f"pretraining {run_dir.name}: {steps} steps on {p.nproc} ranks\n"
            f"    maskpot pretrain --config {path} --nproc {p.nproc}")
    code = run_pretrain(argparse.Namespace(config=str(path), nproc=p.nproc, override=[], resume="auto", init=None,
                                           allow_config_change=False))
    if code != 0:
        raise RuntimeError(f"pretraining {run_dir.name} failed with exit code {code}; see the output above")
    return export


def out_root(run_dir: Path) -> Path:
    """The study folder of a pretraining run folder (STUDY/pretrain/NAME or STUDY/<stage>/pretrain/NAME):
    where the study's mlflow.db is."""
    for parent in run_dir.parents:
        if parent.name == "pretrain":
            return parent.parent
    return run_dir.parent



def water_objective(p: PretrainStageConfig, variant: str) -> dict:
    return {"kind": VARIANTS[variant], "mask_ratio": p.mask_ratio, "noise_sigma": p.noise_sigma}


def pretrain_run_name(cfg: StudyConfig, model: str, variant: str, seed: int) -> str:
    """MODEL_VARIANT for the study's pretrain.seed, MODEL_VARIANT_pSEED for another pretraining seed."""
    return f"{model}_{variant}" + ("" if seed == cfg.pretrain.seed else f"_p{seed}")


def stage_pretrain_water(cfg: StudyConfig, out: Path, corpus: Path) -> dict[tuple[str, str, int], Path]:
    """Every pretraining of the headline rows: model × pretrained variant × pretraining seed (the first
    seed of every variant first, so that one full set of rows can finish before the other seeds)."""
    exports = {}
    seeds = [cfg.pretrain.seed] + [s for s in cfg.headline_pretrain_seeds() if s != cfg.pretrain.seed] \
        if cfg.dft_water.enabled else [cfg.pretrain.seed]
    for seed in seeds:
        stage = dataclasses.replace(cfg.pretrain, seed=seed)
        for model, params in cfg.models.items():
            for variant in cfg.pretrain_variants():
                run = out / "pretrain" / pretrain_run_name(cfg, model, variant, seed)
                exports[(model, variant, seed)] = pretrain_one(
                    cfg, run, corpus, model, params, water_objective(cfg.pretrain, variant), cfg.pretrain.steps,
                    cfg.pretrain.batch_size, stage=stage)
    return exports


def water_jobs(cfg: StudyConfig, out: Path, setting: str, shards: Path, variants: list[str], budgets: list[int],
               exports: dict, pretrain_seeds: list[int] | None = None) -> list[FinetuneJob]:
    """Scratch once per finetune seed; a pretrained variant once per finetune seed × pretraining seed."""
    jobs = []
    for model, params in cfg.models.items():
        for budget in budgets:
            for variant in variants:
                pseeds = [None] if VARIANTS[variant] is None else pretrain_seeds or [cfg.pretrain.seed]
                for pseed in pseeds:
                    init = exports.get((model, variant, cfg.pretrain.seed if pseed is None else pseed))
                    tag = None if pseed in (None, cfg.pretrain.seed) else pseed
                    jobs += [finetune_config(cfg, out, setting, shards, model, params, variant, budget, seed, init,
                                             pretrain_seed=tag) for seed in cfg.seeds]
    return jobs


def ethanol_jobs(cfg: StudyConfig, out: Path) -> list[FinetuneJob]:
    from data_shards.build import build_shards

    e = cfg.ethanol
    shards = out / "shards" / "ethanol"
    root = Path(e.path)
    if not (shards / "manifest.json").is_file():
        missing = [str(root / n) for n in ("train.xyz", "test_MD.xyz") if not (root / n).is_file()]
        if missing:
            raise FileNotFoundError(f"ethanol.path {e.path}: missing {missing} (set ethanol.enabled=false to skip)")
        _banner(f"sharding rMD17 ethanol from {root}: train.xyz 900 train + 100 val, test_MD.xyz test")
        build_shards([str(root / "train.xyz"), f"test={root / 'test_MD.xyz'}"], str(shards), shard_size=250,
                     split_fractions=(0.9, 0.1, 0.0))
    jobs = []
    for model, params in cfg.models.items():
        params = {**params, "cutoff": e.cutoff}
        for variant in e.variants:
            init = None
            if ETHANOL_VARIANTS[variant] is not None:
                objective = {**ETHANOL_VARIANTS[variant], "h_mask_p": cfg.pretrain.h_mask_p,
                             "noise_sigma": cfg.pretrain.noise_sigma}
                init = pretrain_one(cfg, out / "pretrain" / f"ethanol_{model}_{variant}", shards, model, params,
                                    objective, e.pretrain_steps, cfg.pretrain.batch_size * 4)
            jobs += [finetune_config(cfg, out, "ethanol", shards, model, params, variant, budget, seed, init)
                     for budget in e.budgets for seed in cfg.seeds]
    return jobs
