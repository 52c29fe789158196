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
)
from maskpot.study.grid import describe_plan  # the plan printed first; tests import it from here too
from maskpot.study.pretraining import pretrain_one, pretrain_run_name, water_objective

SETTINGS = ("dft_water", "tip3p", "ethanol")
TIMINGS_FILE = "timings.json"


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
    from data_shards.build import build_shards  # startup: imports torch (+7 s); kept off the maskpot CLI start
    from data_shards.tip3p import generate_tip3p  # startup: OpenMM + ase (+3 s) off the maskpot CLI start

    c = cfg.corpus
    shards = out / "shards" / "corpus"
    if not (shards / "manifest.json").is_file():
        banner(f"TIP3P corpus: {c.frames} frames × {c.molecules} H2O, seed {c.seed}")
        xyz = generate_tip3p(out / "data", n_molecules=c.molecules, n_frames=c.frames, seed=c.seed,
                             steps_between_frames=c.steps_between_frames)
        banner("sharding the corpus with Ray")
        build_shards([str(xyz)], str(shards), shard_size=c.shard_size,
                     split_fractions=(1.0 - c.val_fraction, c.val_fraction, 0.0), require_labels=False)
    return shards


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
