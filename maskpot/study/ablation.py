"""Ablations of the study (`maskpot study --ablation NAME`): what changes the gain of pretraining?

Each ablation (`ablations:` in the study YAML, maskpot.study.config.AblationConfig) re-runs some variants
on DFT water with a changed pretraining and/or finetuning, at its own budgets and seeds. What it needs from
the main study (corpus, DFT shards, unchanged pretrainings, unchanged scratch runs) is run or reused; its
own runs are named VARIANT@NAME (an ablation that only swaps `models` adds ordinary runs of those models),
next to the main runs, so that the report (maskpot.study.report) can set
each beside its baseline: scratch@NAME when the finetune budget changed, else the main scratch runs.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import asdict
from pathlib import Path

import yaml

from data_shards.config_io import to_dict
from maskpot.study.config import ABLATION_MARK, VARIANTS, StudyConfig
from maskpot.study.finetunes import Timings, finetune_config, pretrain_seed_tag, run_finetunes, run_name, wanted
from maskpot.study.pretraining import corpus_pretraining, pretrain_one, stage_corpus, water_objective
from maskpot.study.stages import stage_dft_shards


def resolve_names(cfg: StudyConfig, asked: list[str]) -> list[str]:
    """The ablations to run, in YAML order; `all` means every one. Unknown names list the defined ones."""
    names = list(cfg.ablations) if "all" in asked else list(dict.fromkeys(asked))
    unknown = [n for n in names if n not in cfg.ablations]
    if unknown:
        raise ValueError(f"--ablation {unknown}: not defined for scale {cfg.scale!r}; defined: "
                         f"{sorted(cfg.ablations) or 'none'} (or 'all')")
    return names


def ablation_jobs(cfg: StudyConfig, out: Path, name: str, corpus: Path, dft_shards: Path,
                  pretrain: bool = True) -> list:
    """Finetune jobs of ablation `name` and of its baseline; runs the pretrainings they need first. Under
    `only`, a pretraining none of whose finetunes is selected is not run, and its finetunes are left out.
    `pretrain=False`: every job, with no pretraining run and no init (their names, for check_only)."""
    a = cfg.ablations[name]
    pre, fin = cfg.ablation_stages(name)
    on_dft, two_stage = a.pretrain_data == "dft_train", a.pretrain_init == "corpus"
    pre_changed, fin_changed = pre != cfg.pretrain or on_dft or two_stage, fin != cfg.finetune
    scratch_changed = _scratch_view(fin) != _scratch_view(cfg.finetune)   # adapt/replay act on inits only
    # runs are named after the first ablation (YAML order) with the same pretraining / scratch finetune, so
    # ablations that share one reuse it instead of running it again
    pname = _first_alike(cfg, name, lambda n: (cfg.ablation_stages(n)[0], cfg.ablations[n].pretrain_data,
                                               cfg.ablations[n].pretrain_init))
    fname = _first_alike(cfg, name, lambda n: _scratch_view(cfg.ablation_stages(n)[1]))
    baseline = f"scratch{ABLATION_MARK}{fname}" if scratch_changed else "scratch"
    jobs = {}
    for model, params in (a.models or cfg.models).items():
        for variant in dict.fromkeys(["scratch", *a.variants]):  # the baseline always, first
            pretrained = VARIANTS[variant] is not None
            changed = pre_changed or fin_changed or variant not in cfg.variants
            tag = (f"{variant}{ABLATION_MARK}{name}" if changed else variant) if pretrained else baseline
            run = f"{model}_{variant}{ABLATION_MARK}{pname}" if pre_changed else f"{model}_{variant}"
            for pseed in (a.pretrain_seeds or [pre.seed]) if pretrained else [pre.seed]:
                tag_seed = pretrain_seed_tag(pseed, pre.seed)
                if pretrain and pretrained and not _any_selected(cfg, name, model, tag, tag_seed):
                    continue
                init = _pretraining(cfg, out, name, pre, model, params, variant, pseed, run, corpus, dft_shards) \
                    if pretrain and pretrained else None
                for budget in a.budgets:
                    for seed in a.seeds:
                        job = finetune_config(cfg, out, "dft_water", dft_shards, model, params, tag, budget, seed,
                                              init, stage=fin, pretrain_seed=tag_seed)
                        job.config["tracking"]["tags"].update({"study.baseline": baseline,
                                                               "study.pretrain_seed": pseed})
                        jobs[job.run_dir] = job
    return list(jobs.values())


def _any_selected(cfg: StudyConfig, name: str, model: str, tag: str, pretrain_seed: int | None) -> bool:
    """Whether `only` selects a finetune of ablation `name` of MODEL_TAG from pretraining seed `pretrain_seed`."""
    a = cfg.ablations[name]
    return any(wanted(cfg, f"dft_water/{run_name(model, tag, budget, seed, pretrain_seed)}")
               for budget in a.budgets for seed in a.seeds)


def _pretraining(cfg: StudyConfig, out: Path, name: str, pre, model: str, params: dict, variant: str, pseed: int,
                 run: str, corpus: Path, dft_shards: Path) -> Path:
    """The export of ablation `name`'s pretraining (stage `pre`) of `variant` with seed `pseed` (run RUN, or
    RUN_pSEED for a seed other than pre.seed), run first if missing."""
    a = cfg.ablations[name]
    objective = water_objective(pre, variant)
    if a.pretrain_data == "dft_train":   # DeePMD lists all O before all H: molecules by nearest oxygen
        objective["water_grouping"] = "nearest_oxygen"
    first = corpus_pretraining(cfg, out, model, params, variant, corpus) if a.pretrain_init == "corpus" else None
    return pretrain_one(cfg, out / "pretrain" / (run + ("" if pseed == pre.seed else f"_p{pseed}")),
                        dft_shards if a.pretrain_data == "dft_train" else corpus, model, params, objective, pre.steps,
                        pre.batch_size, stage=dataclasses.replace(pre, seed=pseed), init=first)


def check_only(cfg: StudyConfig, out: Path, names: list[str]) -> None:
    """Every `only` glob must match some finetune of ablations `names`: a mistyped one fails before any work
    (it would select nothing, silently)."""
    if not cfg.only:
        return
    runs = [j.name for n in names for j in ablation_jobs(cfg, out, n, out, out, pretrain=False)]
    unmatched = [p for p in cfg.only if not any(fnmatch.fnmatchcase(r, p) for r in runs)]
    if unmatched:
        raise ValueError(f"--only {unmatched}: no finetune of ablation(s) {names} is named like that; "
                         f"their names: {', '.join(runs)}")


def needs_corpus(cfg: StudyConfig, name: str) -> bool:
    """Whether ablation `name` reads the TIP3P corpus: it pretrains on it (or continues its export), or its
    finetunes replay it. The paper recipe (pretrain_data: dft_train) alone needs no corpus."""
    a, (_, fin) = cfg.ablations[name], cfg.ablation_stages(name)
    return a.pretrain_data == "corpus" or a.pretrain_init == "corpus" or bool(fin.replay)


def _first_alike(cfg: StudyConfig, name: str, key) -> str:
    mine = key(name)
    return next(other for other in cfg.ablations if key(other) == mine)


def _scratch_view(stage) -> dict:
    return {k: v for k, v in asdict(stage).items() if k not in ("adapt", "replay")}


def describe(cfg: StudyConfig, names: list[str]) -> str:
    lines = []
    for name in names:
        a = cfg.ablations[name]
        changes = {**{f"pretrain.{k}": v for k, v in a.pretrain.items()},
                   **{f"finetune.{k}": v for k, v in a.finetune.items()},
                   **({"pretrain_data": a.pretrain_data} if a.pretrain_data != "corpus" else {}),
                   **({"pretrain_init": a.pretrain_init} if a.pretrain_init != "none" else {})}
        lines.append(f"  ablation {name}: {list(a.models or cfg.models)} × {a.variants} (+ scratch) × budgets "
                     f"{a.budgets} × seeds {a.seeds}"
                     + (f" × pretraining seeds {a.pretrain_seeds}; " if a.pretrain_seeds else "; ")
                     + f"changes {changes or 'nothing'}" + (f" — {a.note}" if a.note else ""))
    return "\n".join(lines)


def run_ablations(cfg: StudyConfig, out: Path, names: list[str]) -> None:
    if not cfg.dft_water.enabled:
        raise ValueError("ablations run on DFT water: dft_water.enabled must be true")
    check_only(cfg, out, names)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_ablations.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    print(f"study '{cfg.experiment}', scale {cfg.scale}, ablations → {out}\n{describe(cfg, names)}", flush=True)
    timings = Timings(out / "timings_ablations.json")
    corpus = out / "shards" / "corpus"
    if any(needs_corpus(cfg, name) for name in names):
        corpus = timings.stage("corpus", lambda: stage_corpus(cfg, out))
    shards = stage_dft_shards(cfg, out)
    for name in names:
        jobs = timings.stage(f"{name}_pretrain", lambda: ablation_jobs(cfg, out, name, corpus, shards))  # noqa: B023 - run at once
        timings.stage(f"{name}_finetune", lambda: run_finetunes(cfg, jobs))  # noqa: B023 - run at once
