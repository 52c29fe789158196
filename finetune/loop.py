"""Finetuning (one process, plain torch): energies + forces, validation, best model, test.

`run_finetune(cfg)` checks the inputs (finetune.inputs), builds the model, trains it (finetune.training:
the steps, validation, best model, early stopping), tests the best weights, exports and tracks them.
The model comes from `cfg.init` (a pretrain export or fp32 training checkpoint, see
finetune.init_checkpoint; its architecture wins) or is built fresh; its normalisation (E0 per element,
energy scale) is refitted from the finetune manifest.
AdamW with warm-up and cosine decay; the loss is `energy_force_loss` on per-atom energies and forces
(forces by autograd with create_graph). The weights with the best validation score are evaluated on the test
split, exported to OUT_DIR/export (the last step's to OUT_DIR/export_last) and logged to MLflow; `adapt:`
(finetune.adapt) freezes the backbone, sets per-part learning rates, re-initialises the heads, handles elements
new to the export; `replay:` (finetune.replay) adds the pretext loss of pretraining structures to every step.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from data_shards.config_io import config_hash, to_dict
from data_shards.manifest import load_manifest, rereference_transform
from data_shards.stream import ShardStream
from data_shards.version import maskpot_version, platform_info
from finetune import adapt as A
from finetune import energy as E
from finetune import replay as R
from finetune import resume as RS
from finetune.config import FinetuneConfig, flatten_config
from finetune.forcefield import metrics as M
from finetune.forcefield import plots
from finetune.init_checkpoint import load_init
from finetune.inputs import Inputs, check_inputs
from finetune.tracking import Tracker, lineage_tags
from finetune.training import Best, Trainer
from pretrain.export import export_cutoff, normalisation_from_stats, save_export
from pretrain.loop import check_cutoff_fits_data
from pretrain.models import build_model

log = logging.getLogger("finetune")

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.yaml"
EXPORT_DIR = "export"
EXPORT_LAST_DIR = "export_last"    # the weights of the last step, beside the best-by-validation `export`
MODEL_ARTIFACT = "model"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but torch sees no CUDA device; use 'cpu' or 'auto'")
    return torch.device(name)


def make_model(cfg: FinetuneConfig, inputs: Inputs) -> tuple[torch.nn.Module, dict]:
    """(model with finetune normalisation, {"model", "params", "cutoff"} of its architecture)."""
    if cfg.init is None:
        model = build_model(cfg.model.name, cfg.model.params)
        arch = {"model": cfg.model.name, "params": cfg.model.arch_params(), "cutoff": cfg.model.cutoff}
    else:
        model, meta = load_init(cfg.init)
        arch = {"model": meta["model"], "params": meta["params"], "cutoff": export_cutoff(meta)}
        if (cfg.model.name, cfg.model.arch_params()) != (arch["model"], arch["params"]):
            log.warning("note: the model section (%s %s) is ignored; the init export %s defines the "
                        "architecture (%s %s)", cfg.model.name, cfg.model.params, cfg.init, arch["model"],
                        arch["params"])
        A.adapt_loaded_model(model, cfg.adapt, inputs.new_species, cfg.init)
    norm = normalisation_from_stats(inputs.manifest)
    model.set_normalisation(norm["energy_scale"], {int(z): v for z, v in norm["e0"].items()})
    return model, arch


def tracking_tags(cfg: FinetuneConfig, inputs: Inputs) -> dict:
    tags: dict[str, object] = {"maskpot.version": maskpot_version(), "maskpot.config_sha256": config_hash(cfg),
                               "maskpot.manifest_sha256": inputs.manifest_sha256, "maskpot.init": cfg.init or "scratch",
                               **{f"maskpot.platform.{k}": v for k, v in platform_info().items()}}
    if inputs.init_meta is not None:
        tags["maskpot.init_sha256"] = inputs.init_sha256
        for key, value in flatten_config(inputs.init_meta["lineage"]).items():
            tags[f"maskpot.init.lineage.{key}"] = value
        # the pretraining's MLflow run: `source_run_id` tag and a link in the run description
        tags.update(lineage_tags(inputs.init_meta["lineage"], cfg.tracking.resolved_uri(cfg.train.out_dir)))
    return tags


def make_stream(cfg: FinetuneConfig, split: str, cutoff: float, training: bool, limit: int | None = None
                ) -> ShardStream:
    d = cfg.data
    rereference = rereference_transform(load_manifest(d.manifest_dir))   # per-data-set E0 → the model's table
    return ShardStream(d.manifest_dir, split, d.batch_size, cutoff, num_workers=d.num_workers,
                       shuffle_buffer=d.shuffle_buffer if training else 0, seed=cfg.train.seed,
                       limit=d.train_frames if training else limit,
                       transform=rereference if rereference.active else None)


def make_scheduler(cfg: FinetuneConfig, optimizer, stopper: A.EarlyStopping | None = None):
    """The optimizer's schedule: optim's warm-up and decay over train.max_steps, and once early stopping fires
    with train.early_stopping_anneal_steps, the annealing tail (`stopper` holds where it started)."""
    def scheduled(step: int) -> float:
        return cfg.optim.lr_multiplier(step, cfg.train.max_steps)

    if stopper is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, scheduled)
    floor = cfg.optim.min_lr / cfg.optim.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: stopper.lr_factor(step, scheduled, floor))


def run_finetune(cfg: FinetuneConfig, resume: str = "auto",
                 pending_stop: Callable[[], str | None] | None = None) -> dict:
    """Train, keep the best model, test it, export it, track it; returns the content of results.json.

    `resume`: auto continues from OUT_DIR/checkpoint when there is one (finetune.resume), never ignores it.
    A run stopped by SIGUSR1/SIGTERM returns {"preempted": signal name, "step": …, "checkpoint": …}.
    `pending_stop`: a caller that catches those signals itself says here which one came during the setup
    (finetune.resume.preemption_signals); the run then stops after its first step.
    """
    if resume not in RS.RESUME_MODES:
        raise ValueError(f"--resume {resume!r} is not one of {list(RS.RESUME_MODES)}")
    device = resolve_device(cfg.train.device)  # CUDA asked for without CUDA: refused before reading anything
    inputs = check_inputs(cfg)
    if cfg.train.resolved_threads():
        torch.set_num_threads(cfg.train.resolved_threads())
    out_dir = Path(cfg.train.out_dir)
    if resume == "auto" and (done := RS.finished_results(out_dir / RESULTS_FILE, cfg)) is not None:
        log.warning("%s: this config already finished there; nothing to do (--resume never trains again)",
                    out_dir / RESULTS_FILE)
        return done   # a requeued job that had finished must not train again
    checkpoint = RS.load_checkpoint(out_dir, cfg) if resume == "auto" else None
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    model, arch = make_model(cfg, inputs)
    check_cutoff_fits_data(arch["model"], arch["cutoff"], cfg.data.manifest_dir, cfg.data.train_split)
    model.to(device)
    refit = (E.refit_energy_offset(model, make_stream(cfg, cfg.data.train_split, arch["cutoff"], False,
                                                      limit=cfg.data.train_frames), device)
             if cfg.loss.refit_energy_offset else None)

    config_path = out_dir / CONFIG_FILE
    config_path.write_text(f"# resolved finetune config; MLflow store: {cfg.tracking.resolved_uri(out_dir)}\n"
                           + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tracker = Tracker(cfg.tracking, out_dir)
    if checkpoint is not None:   # the same MLflow run continues
        tracker.restore(checkpoint.state["tracking"])
        log.warning("resuming from %s at step %d (MLflow run %s)", out_dir / RS.CHECKPOINT_DIR,
                    checkpoint.state["step"], tracker.run_id)
    else:
        params = flatten_config(cfg)
        params.update({f"model.resolved.{k}": v for k, v in flatten_config(arch).items()})
        tracker.start(params, {**tracking_tags(cfg, inputs), **{str(k): v for k, v in cfg.tracking.tags.items()}})
        tracker.log_artifact(config_path)
    try:
        with RS.preemption_signals(pending_stop) as preempt:
            results = _train_and_test(cfg, inputs, model, arch, device, tracker, out_dir, checkpoint, preempt)
        results["energy_offset_refit"] = refit
    except BaseException:
        tracker.finish("FAILED")
        raise
    if "preempted" in results:
        tracker.flush()   # the run stays open: the resumed job continues it
        return results
    if cfg.tracking.registered_model:
        results["registry"] = tracker.register_model(cfg.tracking.registered_model, MODEL_ARTIFACT)
    results["tracking"] = tracker.finish("FINISHED")
    (out_dir / RESULTS_FILE).write_text(_json(results))
    RS.remove_checkpoint(out_dir)   # results.json now says where the run ended
    return results


def _train_and_test(cfg: FinetuneConfig, inputs: Inputs, model, arch: dict, device, tracker: Tracker,
                    out_dir: Path, checkpoint: RS.Checkpoint | None, preempt) -> dict:
    trainer = make_trainer(cfg, inputs, model, arch, device, tracker)
    start = RS.restore(checkpoint, trainer.loop, device) if checkpoint is not None else 0
    if checkpoint is None:
        trainer.validate(0)
    trainer.bar.update(start)
    model.train()
    preempted = trainer.train(start, out_dir, preempt)
    if preempted is not None:
        return preempted
    train_seconds = time.perf_counter() - trainer.started
    return _test_and_export(trainer, arch, out_dir, train_seconds)


def make_trainer(cfg: FinetuneConfig, inputs: Inputs, model, arch: dict, device, tracker: Tracker) -> Trainer:
    """Streams, optimizer, schedule, EMA, replay, the best-model keeper: everything a finetuning steps."""
    t = cfg.train
    train_stream = make_stream(cfg, cfg.data.train_split, arch["cutoff"], training=True)
    val_stream = make_stream(cfg, cfg.data.val_split, arch["cutoff"], training=False)
    optimizer = torch.optim.AdamW(A.optimizer_groups(model, cfg.optim, cfg.adapt), lr=cfg.optim.lr)
    freeze = A.BackboneFreeze(model, cfg.adapt.freeze_backbone_steps)
    decay = cfg.optim.ema_decay
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False) if decay else None
    energy_scale = float(model.energy_scale)
    energy_term_scale = E.energy_loss_scale(inputs.manifest, cfg.loss.energy_normalisation, energy_scale)  # at end
    E.distant_splits(inputs.manifest, {s: make_stream(cfg, s, arch["cutoff"], False)
                                       for s in (cfg.data.val_split, inputs.test_split) if s})
    replay = R.Replay(cfg, inputs.replay, arch["cutoff"]) if inputs.replay is not None else None
    refit_stream = (make_stream(cfg, cfg.data.train_split, arch["cutoff"], False, limit=cfg.data.train_frames)
                    if cfg.loss.refit_energy_offset else None)
    best = Best(scorer=lambda figures: E.selection_score(
        figures, t.select, energy_term_scale, energy_scale, cfg.loss.energy_weight, cfg.loss.force_weight))
    stopper = A.EarlyStopping(t.early_stopping_patience, t.early_stopping_min_steps, t.early_stopping_anneal_steps)
    loop = RS.LoopState(model, ema, optimizer, make_scheduler(cfg, optimizer, stopper),
                        RS.endless_batches(train_stream), replay, tracker, best, stopper)
    return Trainer(cfg, inputs, loop, freeze, ema.module if ema is not None else model, device, train_stream,
                   val_stream, refit_stream, energy_scale, energy_term_scale)


def _test_and_export(trainer: Trainer, arch: dict, out_dir: Path, train_seconds: float) -> dict:
    """The last and the best weights exported, the best tested, plots and the model logged; the results."""
    cfg, inputs, device, scored = trainer.cfg, trainer.inputs, trainer.device, trainer.scored
    best, history, tracker, last_step = trainer.loop.best, trainer.loop.history, trainer.loop.tracker, trainer.last_step
    if best.state is None:
        raise FloatingPointError(f"no validation gave a finite {cfg.train.select} score "
                                 f"({[h[M.FORCE_RMSE] for h in history]} meV/Å); lower optim.lr or check the data")
    last_dir = _export(scored, cfg, inputs, arch, last_step, out_dir, EXPORT_LAST_DIR)
    scored.load_state_dict(best.state)
    test = M.evaluate(scored, make_stream(cfg, inputs.test_split, arch["cutoff"], False), device=device) \
        if inputs.test_split else None
    if test is not None:
        tracker.log_metrics({f"test/{k}": v for k, v in M.without_arrays(test).items()
                             if isinstance(v, float)}, last_step)
    tracker.log_metrics({"best/step": best.step, "best/val_force_rmse_mev_per_a": best.force_rmse}, last_step)

    export_dir = _export(scored, cfg, inputs, arch, best.step, out_dir)
    shown = test or best.figures
    assert shown is not None   # validation at step 0 always offers a best
    figures = [plots.learning_curve(trainer.loop.train_curve, history, out_dir / "learning_curve.png"),
               *plots.parity_plots(shown[M.ARRAYS], shown, out_dir,
                                   inputs.test_split or cfg.data.val_split)]
    for path in figures:
        tracker.log_artifact(path)
    tracker.log_artifact(export_dir, MODEL_ARTIFACT)
    return _results(trainer, test, train_seconds, export_dir, last_dir)


def _results(trainer: Trainer, test: dict | None, train_seconds: float, export_dir: Path, last_dir: Path) -> dict:
    """What results.json holds (run_finetune adds the refit, the registry and the tracking)."""
    cfg, inputs, L, t = trainer.cfg, trainer.inputs, trainer.loop, trainer.cfg.train
    best, model, last_step = L.best, L.model, trainer.last_step
    return {
        "best_step": best.step,
        "best_val": M.without_arrays(best.figures) if best.figures is not None else None,
        "test": M.without_arrays(test) if test is not None else None,
        "test_split": inputs.test_split or None,
        "history": L.history,
        "final_train_loss": L.train_curve[-1][1] if L.train_curve else None,
        "steps": last_step, "max_steps": t.max_steps, "stopped_early": trainer.stopped_early,
        "stopped_at_step": last_step if trainer.stopped_early else None, "skipped_nonfinite": L.nonfinite.skipped,
        # where the early-stopping criterion was met, and the annealing tail's steps after it
        "early_stop_step": L.stopper.fired_at if trainer.stopped_early else None,
        "anneal_steps": last_step - L.stopper.fired_at if L.stopper.fired_at is not None and trainer.stopped_early
        else 0,
        "train_frames": trainer.train_stream.num_samples,
        "train_seconds": train_seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "init": cfg.init, "init_sha256": inputs.init_sha256,
        "manifest_sha256": inputs.manifest_sha256, "config_sha256": config_hash(cfg),
        "export_dir": str(export_dir), "export_last_dir": str(last_dir), "select": t.select,
        "best_score": best.score, "energy_loss_scale_ev_per_atom": trainer.energy_term_scale,
        "device": str(trainer.device), "platform": platform_info(), "ema_decay": cfg.optim.ema_decay,
        "adapt": {**to_dict(cfg.adapt), "new_species": inputs.new_species,
                  "head_parameters": sum(p.numel() for _, p in A.split_parameters(model)[A.HEAD])},
        "replay": L.replay.summary() if L.replay is not None else None,
    }


def _export(model, cfg: FinetuneConfig, inputs: Inputs, arch: dict, best_step: int, out_dir: Path,
            name: str = EXPORT_DIR) -> Path:
    init_lineage = inputs.init_meta["lineage"] if inputs.init_meta else {}
    species = {int(z) for z in inputs.manifest["elements"]} | set((inputs.init_meta or {}).get("species", []))
    meta = {
        "model": arch["model"], "params": arch["params"],   # params hold the cutoff
        "species": sorted(species), "normalisation": E.model_normalisation(model),
        "lineage": {"config_sha256": config_hash(cfg), "manifest_sha256": inputs.manifest_sha256,
                    "maskpot_version": maskpot_version(),
                    "pretrain_objective": init_lineage.get("pretrain_objective"),
                    "steps": best_step, "stage": "finetune",
                    "init_sha256": inputs.init_sha256, "init_lineage": init_lineage or None},
    }
    return save_export(model, out_dir / name, meta)



def _json(data) -> str:
    return json.dumps(data, indent=2, default=float) + "\n"
