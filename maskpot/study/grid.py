"""The study's grid beyond the headline rows, and its plan (`maskpot study --plan`), in the order it runs.

Order: corpus → headline pretrainings (first pretraining seed of every variant, then the other seeds) →
headline finetunes on DFT water (scratch and every variant × budget × seeds) → TIP3P → two-stage →
scaling curve → diversity → ethanol. Every stage resumes: a generated corpus finishes only its missing
trajectories, shards and pretrainings with an export are skipped (a killed pretraining resumes from its
checkpoint), and a finetune with both read-outs in results.json is never redone.

Experiment runs are named VARIANT@TAG on DFT water, next to the main runs:
- scaling: VARIANT@corpusN, pretrained for pretrain.steps on the first N frames of a corpus generated with
  sampled conditions (`maskpot generate corpus`, data_shards.corpus), the same steps for every N, once per
  pretraining seed (pretrain_seeds; another seed than pretrain.seed is VARIANT@corpusN_pSEED, runs ..._sSpP);
- diversity: VARIANT@singleN (one condition) against VARIANT@corpusN (sampled conditions, the same N);
- two-stage: VARIANT@twostage (the main corpus export, then two_stage.steps on the DFT train positions),
  VARIANT@dft_positions (the paper recipe: pretrain.steps on the DFT train positions only — the
  same runs as the `dft_positions` ablation, which it reuses), the main VARIANT
  (corpus only) and scratch.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path

from data_shards.config_io import from_dict
from data_shards.corpus.conditions import CorpusConfig as Conditions
from data_shards.corpus.conditions import plan
from maskpot.study.config import ABLATION_MARK, VARIANTS, StudyConfig
from maskpot.study.finetunes import banner, finetune_config, pretrain_seed_tag, run_finetunes, run_name, wanted
from maskpot.study.pretraining import corpus_pretraining, pretrain_one, pretrain_run_name, water_objective

GENERATED = Path("data") / "generated"


def conditions(mapping: dict, frames: int):
    """data_shards.corpus CorpusConfig of `frames` frames from a conditions mapping (no `trajectories`)."""
    fpt = from_dict(Conditions, {**mapping, "trajectories": 1}).frames_per_trajectory
    return from_dict(Conditions, {**mapping, "trajectories": frames // fpt})


def stage_generated(cfg: StudyConfig, out: Path, name: str, mapping: dict, sizes: list[int]) -> dict[int, Path]:
    """Generate corpus `name` with max(sizes) frames (resumable), shard its first N frames for each size N."""
    from data_shards.build import build_shards  # startup: imports torch (+7 s); kept off the maskpot CLI start
    from data_shards.corpus.generate import generate_corpus  # startup: OpenMM (+1 s) off the maskpot CLI start

    full = conditions(mapping, max(sizes))
    gen = out / GENERATED / name
    shards = {n: out / "shards" / f"{name}{n}" for n in sizes}
    if not all((s / "manifest.json").is_file() for s in shards.values()):
        banner(f"generating corpus {name}: {full.trajectories} trajectories × {full.frames_per_trajectory} "
               f"frames (sampled conditions, one Ray task per trajectory)")
        generate_corpus(full, gen, progress=False)
    files = [str(gen / t.file_name) for t in plan(full)]
    for n, path in shards.items():
        if not (path / "manifest.json").is_file():
            banner(f"sharding the first {n} frames of corpus {name}")
            build_shards(files[:n // full.frames_per_trajectory], str(path), shard_size=cfg.corpus.shard_size,
                         split_fractions=(1.0 - cfg.corpus.val_fraction, cfg.corpus.val_fraction, 0.0),
                         require_labels=False)
    return shards


def _pretrain_and_jobs(cfg, out, dft, corpora: dict[str, Path], variants, budgets, models) -> list:
    """Pretrain each variant on each corpus (tag → shards) with every headline pretraining seed, and finetune it
    on DFT water as VARIANT@TAG (VARIANT@TAG_pSEED and runs ..._sSEEDpPSEED for another seed than pretrain.seed:
    the error bars of the scaling curve). Under `only`, a pretraining none of whose finetunes is selected is not
    run, and its finetunes are left out."""
    jobs = []
    for model, params in (models or cfg.models).items():
        for tag, shards in corpora.items():
            for variant, pseed in ((v, p) for v in variants for p in cfg.headline_pretrain_seeds()):
                run = f"{variant}{ABLATION_MARK}{tag}"
                tag_seed = pretrain_seed_tag(pseed, cfg.pretrain.seed)
                if not any(wanted(cfg, f"dft_water/{run_name(model, run, budget, seed, tag_seed)}")
                           for budget in budgets for seed in cfg.seeds):
                    continue
                init = pretrain_one(cfg, out / "pretrain" / pretrain_run_name(cfg, model, run, pseed), shards, model,
                                    params, water_objective(cfg.pretrain, variant), cfg.pretrain.steps,
                                    cfg.pretrain.batch_size, stage=dataclasses.replace(cfg.pretrain, seed=pseed))
                jobs += [finetune_config(cfg, out, "dft_water", dft, model, params, run, budget, seed, init,
                                         pretrain_seed=tag_seed) for budget in budgets for seed in cfg.seeds]
    return jobs


def _main_jobs(cfg, out, dft, variants, budgets, models) -> list:
    """The main runs (scratch, corpus-only VARIANT) an experiment compares with, at its budgets."""
    jobs = []
    for model, params in (models or cfg.models).items():
        for variant in ["scratch", *variants]:
            init = None if VARIANTS[variant] is None else \
                corpus_pretraining(cfg, out, model, params, variant)
            jobs += [finetune_config(cfg, out, "dft_water", dft, model, params, variant, budget, seed, init)
                     for budget in budgets for seed in cfg.seeds]
    return jobs


def two_stage_jobs(cfg: StudyConfig, out: Path, dft: Path) -> list:
    t = cfg.two_stage
    jobs = _main_jobs(cfg, out, dft, t.variants, t.budgets, {})
    second = dataclasses.replace(cfg.pretrain, lr=t.lr, min_lr=min(cfg.pretrain.min_lr, t.lr))
    for model, params in cfg.models.items():
        for variant in t.variants:
            # DeePMD lists all O before all H: molecules by nearest oxygen
            objective = {**water_objective(cfg.pretrain, variant), "water_grouping": "nearest_oxygen"}
            corpus_export = corpus_pretraining(cfg, out, model, params, variant)
            runs = {"twostage": (t.steps, second, corpus_export),
                    "dft_positions": (cfg.pretrain.steps, cfg.pretrain, None)}
            for tag, (steps, stage, init) in runs.items():
                export = pretrain_one(cfg, out / "pretrain" / f"{model}_{variant}{ABLATION_MARK}{tag}", dft, model,
                                      params, objective, steps, cfg.pretrain.batch_size, stage=stage, init=init)
                jobs += [finetune_config(cfg, out, "dft_water", dft, model, params, f"{variant}{ABLATION_MARK}{tag}",
                                         budget, seed, export) for budget in t.budgets for seed in cfg.seeds]
    return jobs


def scaling_jobs(cfg: StudyConfig, out: Path, dft: Path) -> list:
    s = cfg.scaling
    corpora = stage_generated(cfg, out, "corpus", s.conditions, s.sizes)
    jobs = _main_jobs(cfg, out, dft, [], s.budgets, s.models)
    return jobs + _pretrain_and_jobs(cfg, out, dft, {f"corpus{n}": p for n, p in corpora.items()}, s.variants,
                                     s.budgets, s.models)


def diversity_jobs(cfg: StudyConfig, out: Path, dft: Path) -> list:
    d, n = cfg.diversity, cfg.diversity.frames
    sampled = stage_generated(cfg, out, "corpus", cfg.scaling.conditions, cfg.scaling.sizes)[n]
    single = stage_generated(cfg, out, "single", cfg.diversity_conditions(), [n])[n]
    return _main_jobs(cfg, out, dft, [], d.budgets, {}) + _pretrain_and_jobs(
        cfg, out, dft, {f"single{n}": single, f"corpus{n}": sampled}, d.variants, d.budgets, {})


def experiments(cfg: StudyConfig) -> list[tuple[str, object]]:
    """(name, job builder) of the enabled experiments, in the order they run."""
    wanted = [("two_stage", two_stage_jobs, cfg.two_stage.enabled), ("scaling", scaling_jobs, bool(cfg.scaling.sizes)),
              ("diversity", diversity_jobs, bool(cfg.diversity.frames))]
    return [(name, fn) for name, fn, on in wanted if on]


def run_experiments(cfg: StudyConfig, out: Path, timings, dft: Path) -> None:
    for name, build in experiments(cfg):
        built = timings.stage(f"{name}_pretrain", lambda build=build: build(cfg, out, dft))
        jobs = list({j.run_dir: j for j in built}.values())
        timings.stage(f"{name}_finetune", lambda jobs=jobs, name=name: run_finetunes(cfg, jobs, f"{name} finetunes"))


def _readouts(cfg: StudyConfig) -> str:
    f = cfg.finetune
    if not f.converge_steps:
        return f"one read-out per finetune: {f.steps} steps"
    anneal = f", then {f.anneal_steps} steps of LR annealing" if f.anneal_steps else ""
    return (f"two read-outs per finetune: {f.steps} steps, and at convergence (early stop after {f.patience} "
            f"validations without a better val force RMSE, every {f.val_every} steps{anneal}; "
            f"cap {f.converge_steps} steps)")


def planned_runs(cfg: StudyConfig) -> list[tuple[str, list[str]]]:
    """(stage, its finetunes' names SETTING/RUN) of the main grid, in the order it runs, without building
    anything: what `--only` selects from and what `--plan` counts. A run shared by two stages (the scratch
    baseline, the corpus-only arm) is listed under each; the runners finish it once."""
    pseeds, own = cfg.headline_pretrain_seeds(), cfg.pretrain.seed

    def names(setting, models, variants, budgets, pretrain_seeds=(own,)) -> list[str]:
        return [f"{setting}/{run_name(model, variant, budget, seed, pretrain_seed_tag(pseed, own))}"
                for model in models for budget in budgets for variant in variants
                for pseed in ([own] if VARIANTS.get(variant.split(ABLATION_MARK)[0]) is None else pretrain_seeds)
                for seed in cfg.seeds]

    models = list(cfg.models)
    stages = []
    if cfg.dft_water.enabled:
        stages.append(("headline", names("dft_water", models, cfg.variants, cfg.dft_water.budgets, pseeds)))
    if cfg.tip3p.enabled:
        stages.append(("tip3p", names("tip3p", models, cfg.tip3p.variants, [cfg.tip3p.budget])))
    for name, _ in experiments(cfg) if cfg.dft_water.enabled else []:
        if name == "two_stage":
            t = cfg.two_stage
            arms = ["scratch", *t.variants] + [f"{v}{ABLATION_MARK}{tag}" for v in t.variants
                                                for tag in ("twostage", "dft_positions")]
            stages.append((name, names("dft_water", models, arms, t.budgets)))
            continue
        s, d = cfg.scaling, cfg.diversity
        tags = [f"corpus{n}" for n in s.sizes] if name == "scaling" else [f"single{d.frames}", f"corpus{d.frames}"]
        exp_models = list(s.models or cfg.models) if name == "scaling" else models
        exp_variants, budgets = (s.variants, s.budgets) if name == "scaling" else (d.variants, d.budgets)
        stages.append((name, names("dft_water", exp_models, ["scratch"], budgets) + names(
            "dft_water", exp_models, [f"{v}{ABLATION_MARK}{t}" for t in tags for v in exp_variants], budgets, pseeds)))
    if cfg.ethanol.enabled:
        stages.append(("ethanol", names("ethanol", models, cfg.ethanol.variants, cfg.ethanol.budgets)))
    return stages


def check_only(cfg: StudyConfig) -> None:
    """Every `only` glob must match some finetune of the main grid: a mistyped one fails before any work (it
    would select nothing, silently, after the corpus was generated)."""
    runs = sorted({n for _, stage in planned_runs(cfg) for n in stage})
    unmatched = [p for p in cfg.only if not any(fnmatch.fnmatchcase(r, p) for r in runs)]
    if unmatched:
        raise ValueError(f"--only {unmatched}: no finetune of this study is named like that (pretraining seed "
                         f"{cfg.pretrain.seed} has no p suffix); its names: {', '.join(runs)}")


def describe_plan(cfg: StudyConfig, out: Path) -> str:
    """The grid, in the order it runs (headline rows first), with run counts (and those `only` selects)."""
    models, seeds, pseeds = list(cfg.models), cfg.seeds, cfg.headline_pretrain_seeds()
    pre = cfg.pretrain_variants()
    lines = [f"study '{cfg.experiment}', scale {cfg.scale} → {out}",
             f"  finetune budget for every run: {cfg.finetune.steps} steps, batch {cfg.finetune.batch_size}, "
             f"lr {cfg.finetune.lr:g} (cosine to {cfg.finetune.min_lr:g}); finetune seeds {seeds}",
             f"  {_readouts(cfg)}",
             f"1. corpus: {cfg.corpus.frames} TIP3P frames × {cfg.corpus.molecules} H2O (seed {cfg.corpus.seed})"
             " (made only when a selected run needs it)",
             f"2. pretraining: {models} × {pre} × pretraining seeds "
             f"{pseeds if cfg.dft_water.enabled else [cfg.pretrain.seed]} × {cfg.pretrain.steps} steps on "
             f"{cfg.pretrain.nproc} ranks"]
    texts = {"headline": f"HEADLINE dft_water: {cfg.variants} × budgets {cfg.dft_water.budgets} × finetune seeds "
                         f"{seeds} (× pretraining seeds {pseeds} for pretrained variants)",
             "tip3p": f"tip3p: {cfg.tip3p.variants} × budget {cfg.tip3p.budget}",
             "ethanol": f"ethanol: {cfg.ethanol.variants} × budgets {cfg.ethanol.budgets}"}
    seen: set[str] = set()
    chosen: set[str] = set()
    for step, (name, runs) in enumerate(planned_runs(cfg), start=3):
        new = [r for r in dict.fromkeys(runs) if r not in seen]   # a shared baseline counts where it first runs
        seen.update(new)
        picked = [r for r in runs if wanted(cfg, r)]
        chosen.update(picked)
        text = texts.get(name) or _describe_experiment(cfg, name)
        count = f"{len(new)} finetunes" if name in texts else f"{len(new)} new finetunes"
        lines.append(f"{step}. {text} → {count}" + (f", {len(picked)} selected by --only" if cfg.only else ""))
    lines.append(f"  {len(seen)} finetunes (× {2 if cfg.finetune.converge_steps else 1} read-outs), "
                 f"{cfg.finetune.jobs} at a time" + (f"; --only selects {len(chosen)}" if cfg.only else ""))
    return "\n".join(lines)


def _describe_experiment(cfg: StudyConfig, name: str) -> str:
    pseeds = cfg.headline_pretrain_seeds()
    if name == "two_stage":
        t = cfg.two_stage
        return (f"two-stage: {t.variants}@twostage (corpus export + {t.steps} steps on the DFT train positions, "
                f"lr {t.lr:g}) and @dft_positions (paper recipe, {cfg.pretrain.steps} steps) vs corpus-only and "
                f"scratch × budgets {t.budgets}")
    if name == "scaling":
        s = cfg.scaling
        return (f"scaling: {list(s.models or cfg.models)} × {s.variants} × corpus sizes {s.sizes} (sampled "
                f"conditions, {cfg.pretrain.steps} pretraining steps each) × pretraining seeds {pseeds} × budgets "
                f"{s.budgets}")
    d = cfg.diversity
    return (f"diversity at {d.frames} frames: {d.variants} on one condition ({cfg.diversity.single}) vs sampled "
            f"conditions × pretraining seeds {pseeds} × budgets {d.budgets}")
