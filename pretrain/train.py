"""The pretraining loop, one process per rank: `python -m pretrain --config run.yaml` under torchrun (what
`maskpot pretrain` runs) or the deepspeed launcher (`deepspeed --num_gpus 2 --module pretrain --config ...`,
which on CPU needs DS_ACCELERATOR=cpu).

Each optimizer step takes `gradient_accumulation_steps` batches per rank; a batch whose loss is not
finite on any rank is skipped on every rank. Ranks always consume the same number of batches per epoch,
so no collective can hang on a rank that ran out of data.

SIGTERM or SIGUSR1 (SLURM `--signal=USR1@120`, or torchrun forwarding SIGTERM) stops the run at the next
step boundary on every rank: a checkpoint is written and the process exits 0; `--resume auto` continues
exactly. Each rank writes its pid to OUT_DIR/rank{r}.pid (for signalling workers torchrun does not
forward a signal to).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_shards.cli_errors import user_error
from data_shards.config_io import load_config, parse_dotted_overrides, to_dict
from data_shards.progress import progress
from pretrain import checkpoint as ckpt
from pretrain import distributed as D
from pretrain import mixture, run_tracking, stages
from pretrain.config import PretrainConfig
from pretrain.engine import WeightEMA, build_engine, init_distributed
from pretrain.export import normalisation_from_stats
from pretrain.loop import (
    STEP_SLEEP_ENV,
    LockstepBatches,
    MetricsLog,
    agreed_signal,
    check_cutoff_fits_data,
    check_objective_fits_data,
    keep_if_best,
    make_stream,
    make_validator,
    quiet_libraries,
    train_step,
    write_export,
)
from pretrain.models import build_model
from pretrain.tracking import Tracker

log = logging.getLogger("pretrain")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain", description="One rank of masked pretraining.")
    p.add_argument("--config", required=True)
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", default="auto", help="auto (default) | never | PATH to checkpoints or a tag")
    p.add_argument("--allow-config-change", action="store_true")
    # the deepspeed launcher passes --local_rank=N unless --no_local_rank; LOCAL_RANK (env) says the same
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


@dataclass
class Run:
    """One rank's pretraining, built by `build_run`: what `train` steps and `close` finishes."""
    cfg: PretrainConfig
    rank: int
    out_dir: Path
    manifest: dict
    manifest_hash: str
    tracker: Tracker | None         # rank 0 with tracking enabled, else None
    engine: Any                     # DeepSpeed engine (untyped)
    ema: WeightEMA | None
    state: ckpt.TrainState
    batches: LockstepBatches | mixture.MixedBatches
    validate: Callable | None       # make_validator's callable, None without a validation split
    metrics: MetricsLog
    bar: Any                        # tqdm bar (or the periodic-line stand-in off a TTY)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(PretrainConfig, args.config, parse_dotted_overrides(args.override))
    preempt = ckpt.PreemptionFlag()
    try:
        rank, world_size = init_distributed(cfg.train.device)
    except D.LaunchError as err:  # a setup that cannot work: one line, before any work
        return user_error("pretrain", err)
    run = build_run(cfg, args, rank, world_size)
    preempted = train(run, preempt)
    close(run, preempted)
    return 0


def build_run(cfg: PretrainConfig, args: argparse.Namespace, rank: int, world_size: int) -> Run:
    """Checks on the data, run folder, tracking, model and engine (resumed from a checkpoint), batches."""
    quiet_libraries(rank)
    out_dir = Path(cfg.train.out_dir)
    sets = mixture.load_sets(cfg)
    manifest = sets[0].manifest
    mixture.check_objective_per_set(cfg, sets, check_objective_fits_data)
    for shard_set in sets:
        check_cutoff_fits_data(cfg.model.name, cfg.model.cutoff, shard_set.manifest_dir, cfg.data.train_split)
    stages.check_init(cfg)
    manifest_hash = mixture.sets_sha256(sets)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.pid").write_text(f"{os.getpid()}\n")
    if rank == 0:
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    tracker = run_tracking.start(cfg, rank, world_size, out_dir, manifest_hash)   # rank 0, tracking.enabled
    engine, ema = _build_engine(cfg, manifest, out_dir)
    state = ckpt.TrainState()
    candidates = ckpt.resume_candidates(args.resume, out_dir)
    if candidates is not None:
        ckpt_dir, tags = candidates
        tag, state = ckpt.load_newest_loadable(engine, ckpt_dir, tags, cfg, manifest_hash,
                                               args.allow_config_change, ema)
        log.warning("rank %d resumed from %s at step %d", rank, ckpt_dir / tag, state.step)
    batches = mixture.make_batches(cfg, sets, rank, world_size, state, LockstepBatches, make_stream)
    validate = make_validator(cfg, manifest, rank, world_size)
    metrics = MetricsLog(out_dir / "metrics.jsonl", rank, cfg)
    metrics.sink = (lambda record: run_tracking.log_record(tracker, record)) if tracker else None
    bar = progress(total=cfg.train.max_steps, initial=state.step, desc="pretrain",
                   **({"disable": True} if rank else {}))  # rank 0 honours TQDM_DISABLE
    return Run(cfg, rank, out_dir, manifest, manifest_hash, tracker, engine, ema, state, batches, validate,
               metrics, bar)


def _build_engine(cfg: PretrainConfig, manifest: dict, out_dir: Path) -> tuple[Any, WeightEMA | None]:
    """(DeepSpeed engine over a fresh or `train.init` model with the data's normalisation, weight EMA)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, cfg.model.params)
    if cfg.train.init is not None:   # two-stage: the export's weights, the new data's normalisation
        stages.load_init_weights(model, cfg.train.init)
    norm = normalisation_from_stats(manifest)
    model.set_normalisation(norm["energy_scale"], {int(z): v for z, v in norm["e0"].items()})
    engine = build_engine(cfg, model, out_dir)
    return engine, WeightEMA(engine, cfg.optim.ema_decay) if cfg.optim.ema_decay else None


def train(run: Run, preempt: ckpt.PreemptionFlag) -> bool:
    """Optimizer steps to train.max_steps or a stop signal agreed by every rank; True: preempted."""
    cfg, state = run.cfg, run.state
    step_sleep = float(os.environ.get(STEP_SLEEP_ENV, 0))
    preempted = False
    while state.step < cfg.train.max_steps and not preempted:
        started = time.perf_counter()
        loss = train_step(run.engine, cfg, run.batches, state)
        if run.ema is not None:
            run.ema.update(run.engine)
        state.step += 1
        state.epoch, state.batches_in_epoch = run.batches.position()
        if isinstance(run.batches, mixture.MixedBatches):
            state.sets = run.batches.sets_state()
        run.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        run.bar.update(1)
        run.metrics.train(state, loss, run.engine.get_lr()[0], time.perf_counter() - started)
        time.sleep(step_sleep)
        last = state.step == cfg.train.max_steps
        improved = _validate(run) if run.validate and (state.step % cfg.train.val_every == 0 or last) else False
        stop_signal = agreed_signal(preempt.signal)
        preempted = stop_signal != 0
        if improved or preempted or last or (cfg.train.checkpoint_every
                                             and state.step % cfg.train.checkpoint_every == 0):
            ckpt.save_checkpoint(run.engine, run.out_dir, state, cfg, run.manifest_hash, cfg.train.keep_last,
                                 best=improved, ema=run.ema)
        if preempted:
            run.metrics.preempted(state, stop_signal)
            if run.rank == 0:
                log.warning("preempted at step %d, checkpoint written (%s; continue with --resume auto)",
                            state.step, signal.Signals(stop_signal).name)
    return preempted


def _validate(run: Run) -> bool:
    """Validate; a new best is exported. True: it was a new best."""
    assert run.validate is not None    # train() validates only when there is a validation split
    improved = keep_if_best(run.state, run.validate(run.engine, run.ema), run.metrics)
    if improved:
        _export(run)
    return improved


def _export(run: Run) -> None:
    write_export(run.engine, run.cfg, run.manifest, run.manifest_hash, run.state.step, run.out_dir, run.rank,
                 run.ema, run_tracking.lineage(run.tracker))


def close(run: Run, preempted: bool) -> None:
    """Export the final weights when no validation kept any, close the logs, the MLflow run, the group."""
    if run.state.best_step < 0 and not preempted:  # no validation (or never a finite one): export the final weights
        _export(run)
    run.bar.close()
    run.metrics.close()
    run_tracking.finish(run.tracker, run.out_dir, preempted)
    D.destroy()
