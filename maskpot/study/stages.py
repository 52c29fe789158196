"""`maskpot study`: the reproduction study, in stages that resume.

corpus (TIP3P, OpenMM) → shards (Ray) → one DeepSpeed pretraining per model × objective → finetunes of
every variant (scratch and each pretrained export) × label budget × seed on DFT water, TIP3P labels and
rMD17 ethanol, all with the same finetune budget → tables, plots and summary.md (maskpot.study.report).

A stage whose output exists is skipped, so rerunning the same command after an interruption finishes
only what is missing (a pretraining killed midway resumes from its last checkpoint). Every finetune is
one MLflow run in one experiment, tagged with its setting, variant, budget, seed and pretraining lineage.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from data_shards.config_io import to_dict
from maskpot.dft_water import dft_water_inputs
from maskpot.study import grid
from maskpot.study.config import ETHANOL_VARIANTS, VARIANTS, StudyConfig
from maskpot.study.finetunes import (
    FinetuneJob,
    Timings,
    banner,
    finetune_config,
    pretrain_seed_tag,
    run_finetunes,
    run_name,
    wanted,
)
from maskpot.study.grid import describe_plan  # the plan printed first; tests import it from here too
from maskpot.study.pretraining import exported, pretrain_one, pretrain_run_name, stage_corpus, water_objective

SETTINGS = ("dft_water", "tip3p", "ethanol")
TIMINGS_FILE = "timings.json"


def run_study(cfg: StudyConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    timings = Timings(out / TIMINGS_FILE)
    print(describe_plan(cfg, out), flush=True)
    # the order of describe_plan: the headline DFT-water rows first, then the other settings and experiments
    needed = headline_pretrainings(cfg)
    corpus = out / "shards" / "corpus"
    # pretrained finetunes replay the corpus when finetune.replay is set
    if cfg.finetune.replay or any(not exported(out / "pretrain" / pretrain_run_name(cfg, *key)) for key in needed):
        corpus = timings.stage("corpus", lambda: stage_corpus(cfg, out))
    exports = timings.stage("pretrain", lambda: stage_pretrain_water(cfg, out, corpus, needed))
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
        grid.run_experiments(cfg, out, timings, dft)
    if cfg.ethanol.enabled:
        jobs = timings.stage("ethanol_pretrain", lambda: ethanol_jobs(cfg, out))
        timings.stage("finetune_ethanol", lambda: run_finetunes(cfg, jobs, "ethanol finetunes"))


def stage_dft_shards(cfg: StudyConfig, out: Path) -> Path:
    from data_shards.build import build_shards  # startup: imports torch (+7 s); kept off the maskpot CLI start

    shards = out / "shards" / "dft_water"
    if not (shards / "manifest.json").is_file():
        inputs = dft_water_inputs(cfg.dft_water.path, "dft_water.path",
                                  hint="set dft_water.enabled=false to skip this setting")
        banner(f"sharding DFT water from {cfg.dft_water.path}")
        build_shards(inputs, str(shards), shard_size=80)
    return shards


def stage_tip3p_labels(cfg: StudyConfig, out: Path) -> Path:
    from data_shards.build import build_shards  # startup: imports torch (+7 s); kept off the maskpot CLI start
    from data_shards.tip3p import generate_tip3p  # startup: OpenMM + ase (+3 s) off the maskpot CLI start

    shards = out / "shards" / "tip3p_labels"
    if not (shards / "manifest.json").is_file():
        c = cfg.corpus
        banner(f"labelled TIP3P trajectory: {cfg.tip3p.labelled_frames} frames, seed {c.seed + 1}")
        xyz = generate_tip3p(out / "data", n_molecules=c.molecules, n_frames=cfg.tip3p.labelled_frames,
                             seed=c.seed + 1, steps_between_frames=c.steps_between_frames)
        build_shards([str(xyz)], str(shards), shard_size=100, split_fractions=(0.6, 0.2, 0.2))
    return shards


def headline_pretrainings(cfg: StudyConfig) -> list[tuple[str, str, int]]:
    """(model, variant, pretraining seed) of every pretraining a selected headline or TIP3P finetune reads, the
    first seed of every variant first (so that one full set of rows can finish before the other seeds)."""
    own = cfg.pretrain.seed
    seeds = [own] + [s for s in cfg.headline_pretrain_seeds() if s != own] if cfg.dft_water.enabled else [own]

    def read(model: str, variant: str, pseed: int) -> bool:
        dft = cfg.dft_water.enabled and variant in cfg.variants and any(
            wanted(cfg, f"dft_water/{run_name(model, variant, b, s, pretrain_seed_tag(pseed, own))}")
            for b in cfg.dft_water.budgets for s in cfg.seeds)
        return dft or (cfg.tip3p.enabled and pseed == own and variant in cfg.tip3p.variants and any(
            wanted(cfg, f"tip3p/{run_name(model, variant, cfg.tip3p.budget, s)}") for s in cfg.seeds))

    return [(model, variant, pseed) for pseed in seeds for model in cfg.models for variant in cfg.pretrain_variants()
            if read(model, variant, pseed)]


def stage_pretrain_water(cfg: StudyConfig, out: Path, corpus: Path,
                         needed: list[tuple[str, str, int]]) -> dict[tuple[str, str, int], Path]:
    """The exports of the headline pretrainings `needed` (model, variant, seed; headline_pretrainings)."""
    exports = {}
    for model, variant, seed in needed:
        run = out / "pretrain" / pretrain_run_name(cfg, model, variant, seed)
        exports[(model, variant, seed)] = pretrain_one(
            cfg, run, corpus, model, cfg.models[model], water_objective(cfg.pretrain, variant), cfg.pretrain.steps,
            cfg.pretrain.batch_size, stage=dataclasses.replace(cfg.pretrain, seed=seed))
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
                    # a pretrained variant without an export: no selected finetune reads it (headline_pretrainings)
                    jobs += [finetune_config(cfg, out, setting, shards, model, params, variant, budget, seed, init,
                                             pretrain_seed=pretrain_seed_tag(pseed, cfg.pretrain.seed))
                             for seed in cfg.seeds]
    return jobs


def ethanol_jobs(cfg: StudyConfig, out: Path) -> list[FinetuneJob]:
    from data_shards.build import build_shards  # startup: imports torch (+7 s); kept off the maskpot CLI start

    e = cfg.ethanol
    shards = out / "shards" / "ethanol"
    root = Path(e.path)
    if not (shards / "manifest.json").is_file():
        missing = [str(root / n) for n in ("train.xyz", "test_MD.xyz") if not (root / n).is_file()]
        if missing:
            raise FileNotFoundError(f"ethanol.path {e.path}: missing {missing} (set ethanol.enabled=false to skip)")
        banner(f"sharding rMD17 ethanol from {root}: train.xyz 900 train + 100 val, test_MD.xyz test")
        build_shards([str(root / "train.xyz"), f"test={root / 'test_MD.xyz'}"], str(shards), shard_size=250,
                     split_fractions=(0.9, 0.1, 0.0))
    jobs = []
    for model, params in cfg.models.items():
        params = {**params, "cutoff": e.cutoff}
        for variant in e.variants:
            init = None
            variant_objective = ETHANOL_VARIANTS[variant]
            if variant_objective is not None:
                objective = {**variant_objective, "h_mask_p": cfg.pretrain.h_mask_p,
                             "noise_sigma": cfg.pretrain.noise_sigma}
                init = pretrain_one(cfg, out / "pretrain" / f"ethanol_{model}_{variant}", shards, model, params,
                                    objective, e.pretrain_steps, cfg.pretrain.batch_size * 4)
            jobs += [finetune_config(cfg, out, "ethanol", shards, model, params, variant, budget, seed, init)
                     for budget in e.budgets for seed in cfg.seeds]
    return jobs
