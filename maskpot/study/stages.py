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
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import yaml

from data_shards.config_io import from_dict, to_dict
from maskpot.study.config import (
    ABLATION_MARK,
    ETHANOL_VARIANTS,
    VARIANTS,
    FinetuneStageConfig,
    PretrainStageConfig,
    StudyConfig,
)
from pretrain import cli as pretrain_cli

SETTINGS = ("dft_water", "tip3p", "ethanol")
TIMINGS_FILE = "timings.json"


@dataclass(frozen=True)
class FinetuneJob:
    setting: str
    model: str
    variant: str
    budget: int
    seed: int
    config: dict                        # a FinetuneConfig mapping
    run_dir: str

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.model}_{self.variant}_n{self.budget}_s{self.seed}"


def run_study(cfg: StudyConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    timings = Timings(out / TIMINGS_FILE)
    print(describe_plan(cfg, out), flush=True)
    corpus = timings.stage("corpus", lambda: stage_corpus(cfg, out))
    exports = timings.stage("pretrain", lambda: stage_pretrain_water(cfg, out, corpus))
    jobs: list[FinetuneJob] = []
    if cfg.dft_water.enabled:
        jobs += water_jobs(cfg, out, "dft_water", stage_dft_shards(cfg, out), cfg.variants,
                           cfg.dft_water.budgets, exports)
    if cfg.tip3p.enabled:
        jobs += water_jobs(cfg, out, "tip3p", stage_tip3p_labels(cfg, out), cfg.tip3p.variants,
                           [cfg.tip3p.budget], exports)
    if cfg.ethanol.enabled:
        jobs += timings.stage("ethanol_pretrain", lambda: ethanol_jobs(cfg, out))
    timings.stage("finetune", lambda: run_finetunes(cfg, jobs))


class Timings:
    """Wall time per stage, accumulated over resumed invocations, in timings.json."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def stage(self, name: str, fn):
        t0 = time.perf_counter()
        result = fn()
        self.data[name] = self.data.get(name, 0.0) + time.perf_counter() - t0
        self.path.write_text(json.dumps(self.data, indent=2, sort_keys=True))
        return result


def describe_plan(cfg: StudyConfig, out: Path) -> str:
    n_models, n_seeds = len(cfg.models), len(cfg.seeds)
    lines = [f"study '{cfg.experiment}', scale {cfg.scale} → {out}",
             f"  corpus: {cfg.corpus.frames} TIP3P frames × {cfg.corpus.molecules} H2O (seed {cfg.corpus.seed})",
             f"  pretraining: {n_models} model(s) {list(cfg.models)} × {cfg.pretrain_variants()} "
             f"× {cfg.pretrain.steps} steps on {cfg.pretrain.nproc} ranks",
             f"  finetune budget for every run: {cfg.finetune.steps} steps, batch {cfg.finetune.batch_size}, "
             f"lr {cfg.finetune.lr:g} (cosine to {cfg.finetune.min_lr:g}); seeds {cfg.seeds}"]
    total = 0
    if cfg.dft_water.enabled:
        n = n_models * len(cfg.variants) * len(cfg.dft_water.budgets) * n_seeds
        total += n
        lines.append(f"  dft_water: {cfg.variants} × budgets {cfg.dft_water.budgets} → {n} finetunes")
    if cfg.tip3p.enabled:
        n = n_models * len(cfg.tip3p.variants) * n_seeds
        total += n
        lines.append(f"  tip3p: {cfg.tip3p.variants} × budget {cfg.tip3p.budget} → {n} finetunes")
    if cfg.ethanol.enabled:
        n = n_models * len(cfg.ethanol.variants) * len(cfg.ethanol.budgets) * n_seeds
        total += n
        lines.append(f"  ethanol: {cfg.ethanol.variants} × budgets {cfg.ethanol.budgets} → {n} finetunes")
    lines.append(f"  {total} finetunes, {cfg.finetune.jobs} at a time")
    return "\n".join(lines)


def _banner(text: str) -> None:
    print(f"\n=== study: {text}", flush=True)


def stage_corpus(cfg: StudyConfig, out: Path) -> Path:
    from data_shards.build import build_shards  # startup: imports torch (+7 s); kept off the maskpot CLI start
    from data_shards.tip3p import generate_tip3p  # startup: OpenMM + ase (+3 s) off the maskpot CLI start

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
    from data_shards.build import build_shards  # startup: imports torch (+7 s); kept off the maskpot CLI start

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
    from data_shards.build import build_shards  # startup: imports torch (+7 s); kept off the maskpot CLI start
    from data_shards.tip3p import generate_tip3p  # startup: OpenMM + ase (+3 s) off the maskpot CLI start

    shards = out / "shards" / "tip3p_labels"
    if not (shards / "manifest.json").is_file():
        c = cfg.corpus
        _banner(f"labelled TIP3P trajectory: {cfg.tip3p.labelled_frames} frames, seed {c.seed + 1}")
        xyz = generate_tip3p(out / "data", n_molecules=c.molecules, n_frames=cfg.tip3p.labelled_frames,
                             seed=c.seed + 1, steps_between_frames=c.steps_between_frames)
        build_shards([str(xyz)], str(shards), shard_size=100, split_fractions=(0.6, 0.2, 0.2))
    return shards


def pretrain_one(cfg: StudyConfig, run_dir: Path, manifest_dir: Path, model: str, params: dict,
                 objective: dict, steps: int, batch_size: int, stage: PretrainStageConfig | None = None) -> Path:
    """One DeepSpeed pretraining (resumed if a checkpoint exists); returns its export folder.
    `stage` (default: the study's pretrain section) gives the learning rates, ranks and ZeRO stage."""
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
                  "seed": p.seed},
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
    code = pretrain_cli.run(argparse.Namespace(config=str(path), nproc=p.nproc, override=[], resume="auto",
                                           allow_config_change=False, init=None))
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


def pretraining_run_id(init: Path | None) -> str | None:
    """The MLflow run of the pretraining that wrote the export `init` (its lineage), to nest finetunes under."""
    if init is None or not (Path(init) / "model.json").is_file():
        return None
    return (json.loads((Path(init) / "model.json").read_text()).get("lineage") or {}).get("mlflow_run_id")


def water_objective(p: PretrainStageConfig, variant: str) -> dict:
    return {"kind": VARIANTS[variant], "mask_ratio": p.mask_ratio, "noise_sigma": p.noise_sigma}


def stage_pretrain_water(cfg: StudyConfig, out: Path, corpus: Path) -> dict[tuple[str, str], Path]:
    exports = {}
    for model, params in cfg.models.items():
        for variant in cfg.pretrain_variants():
            exports[(model, variant)] = pretrain_one(cfg, out / "pretrain" / f"{model}_{variant}", corpus, model,
                                                     params, water_objective(cfg.pretrain, variant),
                                                     cfg.pretrain.steps, cfg.pretrain.batch_size)
    return exports


def finetune_config(cfg: StudyConfig, out: Path, setting: str, manifest_dir: Path, model: str, params: dict,
                    variant: str, budget: int, seed: int, init: Path | None,
                    stage: FinetuneStageConfig | None = None) -> FinetuneJob:
    """`stage` (default: the study's finetune section) is the finetune budget; a pretrained water variant
    replays the corpus with its own pretext objective when the stage has a `replay` section."""
    f = stage or cfg.finetune
    run_dir = out / "finetune" / setting / f"{model}_{variant}_n{budget}_s{seed}"
    tags = {"study.scale": cfg.scale, "study.setting": setting, "study.model": model, "study.variant": variant,
            "study.budget": budget, "study.seed": seed}
    if ABLATION_MARK in variant:
        tags["study.ablation"] = variant.split(ABLATION_MARK, 1)[1]
    replay = ({"replay": {"manifest_dir": str(out / "shards" / "corpus"), **f.replay}}
              if init and f.replay and setting != "ethanol" else {})
    config = {
        "data": {"manifest_dir": str(manifest_dir), "train_frames": budget, "batch_size": f.batch_size,
                 "shuffle_buffer": 256, "val_batches": f.val_batches},
        "model": {"name": model, "params": params},
        "init": str(init) if init else None,
        **({"adapt": dict(f.adapt)} if init and f.adapt else {}),
        **replay,
        "optim": {"lr": f.lr, "warmup_steps": f.warmup_steps, "min_lr": f.min_lr},
        "loss": {"energy_weight": f.energy_weight, "force_weight": f.force_weight},
        "train": {"max_steps": f.steps, "eval_every": f.eval_every, "log_every": max(f.eval_every // 2, 1),
                  "seed": seed, "out_dir": str(run_dir), "device": "cpu"},
        "tracking": {"uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": cfg.experiment,
                     "run_name": f"{setting}/{model}_{variant}_n{budget}_s{seed}", "tags": tags,
                     "parent_run_id": pretraining_run_id(init)},
    }
    return FinetuneJob(setting, model, variant, budget, seed, config, str(run_dir))


def water_jobs(cfg: StudyConfig, out: Path, setting: str, shards: Path, variants: list[str], budgets: list[int],
               exports: dict) -> list[FinetuneJob]:
    return [finetune_config(cfg, out, setting, shards, model, params, variant, budget, seed,
                            exports.get((model, variant)))
            for model, params in cfg.models.items() for variant in variants
            for budget in budgets for seed in cfg.seeds]


def ethanol_jobs(cfg: StudyConfig, out: Path) -> list[FinetuneJob]:
    from data_shards.build import build_shards  # startup: imports torch (+7 s); kept off the maskpot CLI start

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
            variant_objective = ETHANOL_VARIANTS[variant]
            if variant_objective is not None:
                objective = {**variant_objective, "h_mask_p": cfg.pretrain.h_mask_p,
                             "noise_sigma": cfg.pretrain.noise_sigma}
                init = pretrain_one(cfg, out / "pretrain" / f"ethanol_{model}_{variant}", shards, model, params,
                                    objective, e.pretrain_steps, cfg.pretrain.batch_size * 4)
            jobs += [finetune_config(cfg, out, "ethanol", shards, model, params, variant, budget, seed, init)
                     for budget in e.budgets for seed in cfg.seeds]
    return jobs


def _finetune_worker(job: FinetuneJob, threads: int) -> dict:
    import torch  # startup: torch (+7 s) off the maskpot CLI start

    torch.set_num_threads(threads)
    from finetune.config import FinetuneConfig  # startup: imports torch (+7 s); kept off the maskpot CLI start
    from finetune.loop import run_finetune  # startup: imports torch (+7 s); kept off the maskpot CLI start

    Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(job.run_dir).parent / f"{Path(job.run_dir).name}.yaml").write_text(
        yaml.safe_dump(job.config, sort_keys=False))
    t0 = time.perf_counter()
    config = {**job.config, "train": {"threads": threads, **job.config.get("train", {})}}  # the pool's share
    results = run_finetune(from_dict(FinetuneConfig, config))
    return {"name": job.name, "seconds": time.perf_counter() - t0, "test": results.get("test")}


def run_finetunes(cfg: StudyConfig, jobs: list[FinetuneJob]) -> None:
    todo = [j for j in jobs if not (Path(j.run_dir) / "results.json").is_file()]
    _banner(f"finetuning: {len(jobs) - len(todo)} of {len(jobs)} runs already finished, {len(todo)} to go, "
            f"{cfg.finetune.jobs} at a time")
    if not todo:
        return
    _prepare_tracking(cfg, todo[0])
    threads = max(1, (os.cpu_count() or 1) // cfg.finetune.jobs)
    env_before = os.environ.get("TQDM_DISABLE")
    if cfg.finetune.jobs > 1:
        os.environ["TQDM_DISABLE"] = "1"  # interleaved bars from parallel runs are unreadable; one line per run
    try:
        if cfg.finetune.jobs == 1:
            for i, job in enumerate(todo, 1):
                _report(i, len(todo), _finetune_worker(job, threads))
            return
        with ProcessPoolExecutor(cfg.finetune.jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_finetune_worker, job, threads) for job in todo]
            for i, fut in enumerate(as_completed(futures), 1):
                _report(i, len(todo), fut.result())
    finally:
        if env_before is None:
            os.environ.pop("TQDM_DISABLE", None)


def _report(i: int, n: int, result: dict) -> None:
    test = result.get("test") or {}
    figures = (f"test F {test.get('force_rmse_mev_per_a', float('nan')):.1f} meV/Å, "
               f"E {test.get('energy_rmse_mev_per_atom', float('nan')):.2f} meV/atom") if test else "no test split"
    print(f"[{i}/{n}] {result['name']}: {figures} ({result['seconds']:.0f} s)", flush=True)


def _prepare_tracking(cfg: StudyConfig, job: FinetuneJob) -> None:
    """Create the sqlite store and the experiment once, before parallel runs race to migrate the schema."""
    if not job.config["tracking"]["uri"].startswith("sqlite:"):
        return
    from mlflow import MlflowClient  # startup: mlflow (+12 s over torch) only when tracking is on

    from finetune.tracking import ARTIFACTS_DIR  # startup: imports torch (+7 s); kept off the maskpot CLI start

    uri = job.config["tracking"]["uri"]
    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(cfg.experiment) is None:
        artifacts = Path(uri.removeprefix("sqlite:///")).parent / ARTIFACTS_DIR
        client.create_experiment(cfg.experiment, artifact_location=artifacts.resolve().as_uri())
