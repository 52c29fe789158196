"""The study's pretrainings: one DeepSpeed run (`maskpot pretrain`) per model × objective × corpus × seed,
written as a pretrain YAML next to its run folder and resumed from its last checkpoint when interrupted.

Shared by the main grid (maskpot.study.stages), the experiments (maskpot.study.grid) and the ablations
(maskpot.study.ablation).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from data_shards.config_io import from_dict
from maskpot.study.config import VARIANTS, PretrainStageConfig, StudyConfig
from maskpot.study.finetunes import banner, finetune_config
from pretrain import cli as pretrain_cli


def pretrain_one(cfg: StudyConfig, run_dir: Path, manifest_dir: Path, model: str, params: dict,
                 objective: dict, steps: int, batch_size: int, stage: PretrainStageConfig | None = None,
                 init: Path | None = None) -> Path:
    """One DeepSpeed pretraining (resumed if a checkpoint exists); returns its export folder.
    `stage` (default: the study's pretrain section) gives the learning rates, ranks, ZeRO stage and seed;
    `init` an export to continue from (two-stage pretraining, pretrain train.init)."""
    export = run_dir / "export"
    if exported(run_dir):
        return export
    p = stage or cfg.pretrain
    config = pretrain_config(cfg, run_dir, manifest_dir, model, params, objective, steps, batch_size, p, init)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    banner(f"pretraining {run_dir.name}: {steps} steps on {p.nproc} ranks\n"
           f"    maskpot pretrain --config {path} --nproc {p.nproc}")
    code = pretrain_cli.run(argparse.Namespace(config=str(path), nproc=p.nproc, override=[], resume="auto",
                                               allow_config_change=False, init=None))
    if code != 0:
        raise RuntimeError(f"pretraining {run_dir.name} failed with exit code {code}; see the output above")
    return export


def pretrain_config(cfg: StudyConfig, run_dir: Path, manifest_dir: Path, model: str, params: dict,
                    objective: dict, steps: int, batch_size: int, p: PretrainStageConfig,
                    init: Path | None = None) -> dict:
    """The PretrainConfig mapping of one study pretraining (written as YAML next to its run folder)."""
    return {
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


def check_run_configs(cfg: StudyConfig, out: Path) -> None:
    """Validate every pretraining and finetuning config the study will write, through PretrainConfig and
    FinetuneConfig, before any corpus is generated: `mask_ratio: 1.5` or a misspelt model parameter fails
    now (ConfigError naming the run and the key), not after an hour of corpus generation and sharding."""
    from finetune.config import FinetuneConfig  # startup: imports torch (+7 s); kept off the maskpot CLI start
    from pretrain.config import PretrainConfig  # startup: imports torch (+7 s); kept off the maskpot CLI start

    stages = [("", cfg.pretrain, cfg.finetune)] + [(f" (ablation {n})", *cfg.ablation_stages(n)) for n in cfg.ablations]
    for model, params in cfg.models.items():
        for where, p, f in stages:
            for variant in cfg.variants:
                if variant != "scratch":
                    run_dir = out / "pretrain" / f"{model}_{variant}"
                    from_dict(PretrainConfig, pretrain_config(cfg, run_dir, out / "shards" / "corpus", model, params,
                                                              water_objective(p, variant), p.steps, p.batch_size, p),
                              where=f"study pretraining {model}_{variant}{where}")
            job = finetune_config(cfg, out, "dft_water", out / "shards" / "dft_water", model, params, "scratch",
                                  max(cfg.dft_water.budgets, default=1), cfg.seeds[0], None, f)
            from_dict(FinetuneConfig, job.config, where=f"study finetuning {model}{where}")


def out_root(run_dir: Path) -> Path:
    """The study folder of a pretraining run folder (STUDY/pretrain/NAME or STUDY/<stage>/pretrain/NAME):
    where the study's mlflow.db is."""
    for parent in run_dir.parents:
        if parent.name == "pretrain":
            return parent.parent
    return run_dir.parent


def water_objective(p: PretrainStageConfig, variant: str) -> dict:
    return {"kind": VARIANTS[variant], "mask_ratio": p.mask_ratio, "noise_sigma": p.noise_sigma}


def corpus_pretraining(cfg: StudyConfig, out: Path, model: str, params: dict, variant: str,
                       corpus: Path | None = None) -> Path:
    """The export of `variant`'s main pretraining on the TIP3P corpus (study pretrain seed), run first if missing:
    the corpus-only arm of the experiments and the first stage of every two-stage pretraining. `corpus`: its
    shards when the caller has made them; by default stage_corpus makes them, only if the export is missing."""
    run = out / "pretrain" / pretrain_run_name(cfg, model, variant, cfg.pretrain.seed)
    if corpus is None:
        corpus = out / "shards" / "corpus" if exported(run) else stage_corpus(cfg, out)
    return pretrain_one(cfg, run, corpus, model, params, water_objective(cfg.pretrain, variant), cfg.pretrain.steps,
                        cfg.pretrain.batch_size)


def exported(run_dir: Path) -> bool:
    """Whether the pretraining in `run_dir` has finished (written its export)."""
    return (run_dir / "export" / "model.json").is_file()


def stage_corpus(cfg: StudyConfig, out: Path) -> Path:
    """The shards of the TIP3P corpus (cfg.corpus), generated and sharded first if missing."""
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


def pretrain_run_name(cfg: StudyConfig, model: str, variant: str, seed: int) -> str:
    """MODEL_VARIANT for the study's pretrain.seed, MODEL_VARIANT_pSEED for another pretraining seed."""
    return f"{model}_{variant}" + ("" if seed == cfg.pretrain.seed else f"_p{seed}")
