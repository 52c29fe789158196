"""The finetuning loop (one process, plain torch): energies + forces, validation, best model, test.

`run_finetune(cfg)`: the model comes from `cfg.init` (a pretrain export or fp32 training checkpoint, see
finetune.init_checkpoint; its architecture wins) or is built fresh; its normalisation (E0 per element,
energy scale) is refitted from the finetune manifest.
AdamW with warm-up and cosine decay; the loss is `energy_force_loss` on per-atom energies and forces
(forces by autograd with create_graph). Validation at step 0, every `eval_every` steps and at the end;
the weights with the lowest validation force RMSE are kept (a worse evaluation never replaces them),
evaluated on the test split, exported to OUT_DIR/export and logged to MLflow. `train.early_stopping_patience`
ends training after that many validations without a new best; `adapt:` (finetune.adapt) freezes the
backbone, sets per-part learning rates, re-initialises the heads, handles elements new to the export;
`replay:` (finetune.replay) adds the pretext loss of pretraining structures to every step.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
import yaml
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from data_shards import keys as K
from data_shards.config_io import config_hash, to_dict
from data_shards.manifest import (
    QUARANTINE_NAME,
    file_sha256,
    load_manifest,
    rereference_transform,
)
from data_shards.progress import progress
from data_shards.stream import ShardStream
from data_shards.units import MAX_FORCE_RMS
from finetune import adapt as A
from finetune import energy as E
from finetune import replay as R
from finetune import resume as RS
from finetune.config import FinetuneConfig, flatten_config
from finetune.forcefield import metrics as M
from finetune.forcefield import plots
from finetune.init_checkpoint import load_init, read_init_meta, weights_file
from finetune.tracking import Tracker, lineage_tags
from pretrain.engine import lr_factor
from pretrain.export import normalisation_from_stats, save_export
from pretrain.loop import check_cutoff_fits_data
from pretrain.models import build_model
from pretrain.objectives import energy_force_loss

log = logging.getLogger("finetune")

MAX_CONSECUTIVE_NONFINITE = 50
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.yaml"
EXPORT_DIR = "export"
EXPORT_LAST_DIR = "export_last"    # the weights of the last step, beside the best-by-validation `export`
MODEL_ARTIFACT = "model"


@dataclass
class Inputs:
    """What `check_inputs` found: the manifest, its hash, the init export's meta (or None)."""
    manifest: dict
    manifest_sha256: str
    init_meta: dict | None
    init_sha256: str | None
    test_split: str          # "" when there is nothing to test on
    new_species: list[int]   # elements of the data the init export has no species for (allowed by config)
    replay: R.ReplayPlan | None = None


def check_inputs(cfg: FinetuneConfig) -> Inputs:
    """Every check that needs the files, before anything is trained or written."""
    d = cfg.data
    manifest = load_manifest(d.manifest_dir)
    where = Path(d.manifest_dir) / "manifest.json"
    samples = {s: manifest["splits"].get(s, {}).get("samples", 0) for s in ("train", "val", "test")}
    if not any(samples.values()):
        raise ValueError(f"{where}: the shards hold no samples" + quarantine_hint(Path(d.manifest_dir), manifest))
    if not manifest.get("labelled"):
        raise ValueError(f"{where}: the shards are not labelled (energies and forces are needed to finetune)")
    if not samples[d.train_split]:
        raise ValueError(f"{where}: training split {d.train_split!r} is empty (splits: {samples})"
                         + quarantine_hint(Path(d.manifest_dir), manifest))
    check_label_units(manifest, where)
    if not samples[d.val_split]:
        raise ValueError(f"{where}: validation split {d.val_split!r} is empty (splits: {samples}); rebuild the "
                         f"shards with a validation fraction or a val=PATH input, or set data.val_split")
    if d.train_frames is not None and d.train_frames > samples[d.train_split]:
        raise ValueError(f"data.train_frames {d.train_frames} exceeds the {samples[d.train_split]} frames of "
                         f"split {d.train_split!r} in {where}")
    test_split = d.test_split
    if test_split and not samples[test_split]:
        log.warning("test split %r of %s is empty: no test evaluation", test_split, where)
        test_split = ""
    init_meta = init_sha = None
    new_species: list[int] = []
    if cfg.init is not None:
        init_meta = read_init_meta(cfg.init)   # missing files, newer format_version: clear errors here
        init_sha = file_sha256(weights_file(cfg.init))
        new_species = A.check_new_species(manifest["elements"], init_meta, cfg.init, cfg.adapt.allow_new_species)
    replay = R.check_replay(cfg, init_meta) if cfg.replay.manifest_dir is not None else None
    return Inputs(manifest, file_sha256(where), init_meta, init_sha, test_split, new_species, replay)


def quarantine_hint(manifest_dir: Path, manifest: dict) -> str:
    """'; N frames were quarantined, e.g. …' when the build set frames aside (wrong units, bad geometry)."""
    count = manifest.get("totals", {}).get("quarantined", 0)
    if not count:
        return ""
    first = ""
    path = manifest_dir / QUARANTINE_NAME
    if path.is_file():
        with path.open() as f:
            rec = json.loads(f.readline() or "{}")
        if rec:
            first = f", e.g. {rec.get('source')} frame {rec.get('frame')} field {rec.get('field')}: {rec.get('reason')}"
    return f"; {count} frame(s) were quarantined when the shards were built ({path}){first}"


def check_label_units(manifest: dict, where: Path) -> None:
    """Refuse labels whose magnitude says they are not in eV and eV/Å (shards built before the per-frame
    units check, or with it bypassed): they would train a model in the wrong units."""
    stats = manifest.get("stats") or {}
    rms = stats.get("force_rms")
    if rms is not None and not rms <= MAX_FORCE_RMS:
        raise ValueError(f"{where}: force RMS of the labelled frames is {rms:.4g} eV/Å, above {MAX_FORCE_RMS:g} "
                         f"eV/Å: the labels are not in eV/Å (kcal/mol/Å are 23× and meV/Å 1000× larger); rebuild "
                         f"the shards with the right `maskpot shards build --units` or convert the files to eV/Å")


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
        arch = {"model": meta["model"], "params": meta["params"], "cutoff": float(meta["cutoff"])}
        if (cfg.model.name, cfg.model.arch_params()) != (arch["model"], arch["params"]):
            log.warning("note: the model section (%s %s) is ignored; the init export %s defines the "
                        "architecture (%s %s)", cfg.model.name, cfg.model.params, cfg.init, arch["model"],
                        arch["params"])
        A.adapt_loaded_model(model, cfg.adapt, inputs.new_species, cfg.init)
    norm = normalisation_from_stats(inputs.manifest)
    model.set_normalisation(norm["energy_scale"], {int(z): v for z, v in norm["e0"].items()})
    return model, arch


def tracking_tags(cfg: FinetuneConfig, inputs: Inputs) -> dict:
    tags = {"maskpot.version": _version(), "maskpot.config_sha256": config_hash(cfg),
            "maskpot.manifest_sha256": inputs.manifest_sha256, "maskpot.init": cfg.init or "scratch"}
    if inputs.init_meta is not None:
        tags["maskpot.init_sha256"] = inputs.init_sha256
        for key, value in flatten_config(inputs.init_meta["lineage"]).items():
            tags[f"maskpot.init.lineage.{key}"] = value
        # the pretraining's MLflow run: `source_run_id` tag and a link in the run description
        tags.update(lineage_tags(inputs.init_meta["lineage"], cfg.tracking.resolved_uri(cfg.train.out_dir)))
    return tags


def _version() -> str:
    try:
        return metadata.version("maskpot")
    except metadata.PackageNotFoundError:
        return "unknown"


def make_stream(cfg: FinetuneConfig, split: str, cutoff: float, training: bool, limit: int | None = None
                ) -> ShardStream:
    d = cfg.data
    rereference = rereference_transform(load_manifest(d.manifest_dir))   # per-data-set E0 → the model's table
    return ShardStream(d.manifest_dir, split, d.batch_size, cutoff, num_workers=d.num_workers,
                       shuffle_buffer=d.shuffle_buffer if training else 0, seed=cfg.train.seed,
                       limit=d.train_frames if training else limit,
                       transform=rereference if rereference.active else None)


def make_scheduler(cfg: FinetuneConfig, optimizer):
    o, total = cfg.optim, cfg.train.max_steps

    def factor(step: int) -> float:
        if o.schedule == "constant":
            return min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps else 1.0
        return lr_factor(step, o.lr, o.min_lr, o.warmup_steps, total)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Best:
    step: int = -1
    force_rmse: float = math.inf        # of the kept model
    figures: dict | None = None
    state: dict | None = None
    score: float = math.inf             # the selection metric's value (train.select); lower is better
    scorer: Callable[[dict], float] = lambda figures: figures[M.FORCE_RMSE]

    def offer(self, step: int, figures: dict, model: torch.nn.Module) -> bool:
        """Keep `model`'s weights if they beat the best so far (strictly); never replace by a worse one."""
        value = self.scorer(figures)
        if not value < self.score:
            return False
        self.step, self.score, self.force_rmse, self.figures = step, value, figures[M.FORCE_RMSE], figures
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True


def run_finetune(cfg: FinetuneConfig, resume: str = "auto") -> dict:
    """Train, keep the best model, test it, export it, track it; returns the content of results.json.

    `resume`: auto continues from OUT_DIR/checkpoint when there is one (finetune.resume), never ignores it.
    A run stopped by SIGUSR1/SIGTERM returns {"preempted": signal name, "step": …, "checkpoint": …}.
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
        with RS.preemption_signals() as preempt:
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
    t = cfg.train
    train_stream = make_stream(cfg, cfg.data.train_split, arch["cutoff"], training=True)
    val_stream = make_stream(cfg, cfg.data.val_split, arch["cutoff"], training=False)
    optimizer = torch.optim.AdamW(A.optimizer_groups(model, cfg.optim, cfg.adapt), lr=cfg.optim.lr)
    freeze = A.BackboneFreeze(model, cfg.adapt.freeze_backbone_steps)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=False)
           if t.ema_decay else None)
    scored = ema.module if ema is not None else model   # the weights that are validated, kept, exported
    energy_scale = float(model.energy_scale)
    energy_term_scale = E.energy_loss_scale(inputs.manifest, cfg.loss.energy_normalisation, energy_scale)  # at end
    E.distant_splits(inputs.manifest, {s: make_stream(cfg, s, arch["cutoff"], False)
                                       for s in (cfg.data.val_split, inputs.test_split) if s})
    replay = R.Replay(cfg, inputs.replay, arch["cutoff"]) if inputs.replay is not None else None
    refit_stream = (make_stream(cfg, cfg.data.train_split, arch["cutoff"], False, limit=cfg.data.train_frames)
                    if cfg.loss.refit_energy_offset else None)
    best = Best(scorer=lambda figures: E.selection_score(
        figures, t.select, energy_term_scale, energy_scale, cfg.loss.energy_weight, cfg.loss.force_weight))
    L = RS.LoopState(model, ema, optimizer, make_scheduler(cfg, optimizer), RS.EndlessBatches(train_stream), replay,
                     tracker, best, A.EarlyStopping(t.early_stopping_patience))
    scheduler, stopper, history, train_curve = L.scheduler, L.stopper, L.history, L.train_curve
    last_step, stopped_early = t.max_steps, False
    started = time.perf_counter()

    def validate(step: int) -> bool:
        """True: early stopping says stop here."""
        if refit_stream is not None:   # re-centre the energy zero on the training frames (forces don't fix it)
            E.refit_energy_offset(scored, refit_stream, device, quiet=True)
            model.e0.copy_(scored.e0)
        figures = M.evaluate(scored, val_stream, cfg.data.val_batches, device)
        improved = best.offer(step, figures, scored)
        history.append({"step": step, **M.without_arrays(figures), "best": improved})
        tracker.log_metrics({"val/energy_rmse_mev_per_atom": figures[M.ENERGY_RMSE],
                             "val/force_rmse_mev_per_a": figures[M.FORCE_RMSE],
                             "val/best_force_rmse_mev_per_a": best.force_rmse, **system_metrics(started, step)},
                            step)
        tracker.flush()
        bar.set_postfix(loss=f"{train_curve[-1][1]:.4g}" if train_curve else "-",
                        val_F=f"{figures[M.FORCE_RMSE]:.1f} meV/Å")
        return stopper.should_stop(improved)

    bar = progress(total=t.max_steps, desc="finetune", unit="step")
    start = RS.restore(checkpoint, L, device) if checkpoint is not None else 0
    step_sleep = float(os.environ.get(RS.STEP_SLEEP_ENV) or 0)
    if checkpoint is None:
        validate(0)
    bar.update(start)
    model.train()
    for step in range(start + 1, t.max_steps + 1):
        freeze.before_step(step)
        batch = next(L.batches).to(device)
        out = model(batch, compute_forces=True)
        loss = energy_force_loss(out[K.PRED_ENERGY], batch[K.ENERGY], out[K.PRED_FORCES], batch[K.FORCES],
                                 batch[K.NATOMS], cfg.loss.energy_weight, cfg.loss.force_weight,
                                 cfg.loss.kind, energy_scale, cfg.loss.huber_delta,
                                 E.energy_loss_scale(inputs.manifest, cfg.loss.energy_normalisation, energy_scale,
                                                     step / t.max_steps))
        replay_loss = replay.loss(model, device) if replay is not None else None
        total = loss if replay_loss is None else loss + cfg.replay.weight * replay_loss
        if not torch.isfinite(total):
            L.skipped, L.nonfinite_run = L.skipped + 1, L.nonfinite_run + 1
            log.warning("step %d: non-finite loss, batch skipped (%d so far)", step, L.skipped)
            if L.nonfinite_run >= MAX_CONSECUTIVE_NONFINITE:
                raise FloatingPointError(f"{L.nonfinite_run} consecutive non-finite losses: training diverged; "
                                         f"lower optim.lr or raise optim.warmup_steps")
            continue
        L.nonfinite_run = 0
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_mult"]   # optim.lr · schedule
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        train_curve.append((step, loss.item()))
        logged = {"train/loss": loss.item(), "train/lr": lr}
        if replay is not None:
            logged["train/replay_loss"] = replay.record(replay_loss)
        tracker.log_metrics(logged, step)
        bar.set_postfix(loss=f"{loss.item():.4g}",
                        val_F=f"{history[-1][M.FORCE_RMSE]:.1f} meV/Å", refresh=False)
        bar.update(1)  # one redraw per step
        if step % t.eval_every == 0 or step == t.max_steps:
            if validate(step) and step < t.max_steps:
                last_step, stopped_early = step, True
                log.info("step %d: early stop, no better validation force RMSE in the last %d validations "
                         "(best %.2f meV/Å at step %d)", step, stopper.patience, best.force_rmse, best.step)
                break
            model.train()
        elif step % t.log_every == 0:
            tracker.flush()
        time.sleep(step_sleep)
        stop = preempt.signal
        if stop or (t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps):
            where = RS.save_checkpoint(out_dir, cfg, *RS.capture(step, L, device))
        if stop:
            bar.close()
            freeze.release()
            name = signal.Signals(stop).name
            log.warning("%s: stopped after step %d, checkpoint written to %s (continue with --resume auto)",
                        name, step, where)
            return {"preempted": name, "step": step, "checkpoint": str(where)}
    bar.close()
    freeze.release()
    train_seconds = time.perf_counter() - started

    if best.state is None:
        raise FloatingPointError(f"no validation gave a finite {t.select} score ({[h[M.FORCE_RMSE] for h in history]} "
                                 f"meV/Å); lower optim.lr or check the data")
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
    figures = [plots.learning_curve(train_curve, history, out_dir / "learning_curve.png"),
               *plots.parity_plots(shown[M.ARRAYS], shown, out_dir,
                                   inputs.test_split or cfg.data.val_split)]
    for path in figures:
        tracker.log_artifact(path)
    tracker.log_artifact(export_dir, MODEL_ARTIFACT)
    return {
        "best_step": best.step,
        "best_val": M.without_arrays(best.figures),
        "test": M.without_arrays(test) if test is not None else None,
        "test_split": inputs.test_split or None,
        "history": history,
        "final_train_loss": train_curve[-1][1] if train_curve else None,
        "steps": last_step, "max_steps": t.max_steps, "stopped_early": stopped_early,
        "stopped_at_step": last_step if stopped_early else None, "skipped_nonfinite": L.skipped,
        "train_frames": train_stream.num_samples,
        "train_seconds": train_seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "init": cfg.init, "init_sha256": inputs.init_sha256,
        "manifest_sha256": inputs.manifest_sha256, "config_sha256": config_hash(cfg),
        "export_dir": str(export_dir), "export_last_dir": str(last_dir), "select": t.select,
        "best_score": best.score, "energy_loss_scale_ev_per_atom": energy_term_scale,
        "device": str(device), "ema_decay": t.ema_decay,
        "adapt": {**to_dict(cfg.adapt), "new_species": inputs.new_species,
                  "head_parameters": sum(p.numel() for _, p in A.split_parameters(model)[A.HEAD])},
        "replay": replay.summary() if replay is not None else None,
    }


def _export(model, cfg: FinetuneConfig, inputs: Inputs, arch: dict, best_step: int, out_dir: Path,
            name: str = EXPORT_DIR) -> Path:
    init_lineage = inputs.init_meta["lineage"] if inputs.init_meta else {}
    species = {int(z) for z in inputs.manifest["elements"]} | set((inputs.init_meta or {}).get("species", []))
    meta = {
        **arch, "species": sorted(species), "normalisation": E.model_normalisation(model),
        "lineage": {"config_sha256": config_hash(cfg), "manifest_sha256": inputs.manifest_sha256,
                    "maskpot_version": _version(),
                    "pretrain_objective": init_lineage.get("pretrain_objective"),
                    "steps": best_step, "stage": "finetune",
                    "init_sha256": inputs.init_sha256, "init_lineage": init_lineage or None},
    }
    return save_export(model, out_dir / name, meta)



def system_metrics(started: float, step: int) -> dict:
    """Cheap process figures logged with each validation (MLflow `system/*`)."""

    elapsed = max(time.perf_counter() - started, 1e-9)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"system/peak_rss_mb": peak_kib / 1024.0, "system/steps_per_s": step / elapsed}


def _json(data) -> str:
    return json.dumps(data, indent=2, default=float) + "\n"
