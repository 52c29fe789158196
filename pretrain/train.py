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
import sys
import time
from pathlib import Path

import torch

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(PretrainConfig, args.config, parse_dotted_overrides(args.override))
    preempt = ckpt.PreemptionFlag()
    try:
        rank, world_size = init_distributed(cfg.train.device)
    except D.LaunchError as err:  # a setup that cannot work: one line, before any work
        print(f"pretrain: error: {err}", file=sys.stderr, flush=True)
        return 2
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

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, cfg.model.params)
    if cfg.train.init is not None:   # two-stage: the export's weights, the new data's normalisation
        stages.load_init_weights(model, cfg.train.init)
    norm = normalisation_from_stats(manifest)
    model.set_normalisation(norm["energy_scale"], {int(z): v for z, v in norm["e0"].items()})
    engine = build_engine(cfg, model, out_dir)
    ema = WeightEMA(engine, cfg.optim.ema_decay) if cfg.optim.ema_decay else None

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

    step_sleep = float(os.environ.get(STEP_SLEEP_ENV, 0))
    preempted = False
    while state.step < cfg.train.max_steps and not preempted:
        started = time.perf_counter()
        loss = train_step(engine, cfg, batches, state)
        if ema is not None:
            ema.update(engine)
        state.step += 1
        state.epoch, state.batches_in_epoch = batches.position()
        if isinstance(batches, mixture.MixedBatches):
            state.sets = batches.sets_state()
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.update(1)
        metrics.train(state, loss, engine.get_lr()[0], time.perf_counter() - started)
        time.sleep(step_sleep)
        last = state.step == cfg.train.max_steps
        improved = False
        if validate and (state.step % cfg.train.val_every == 0 or last):
            improved = keep_if_best(state, validate(engine, ema), metrics)
            if improved:
                write_export(engine, cfg, manifest, manifest_hash, state.step, out_dir, rank, ema,
                             run_tracking.lineage(tracker))
        stop_signal = agreed_signal(preempt.signal)
        preempted = stop_signal != 0
        if improved or preempted or last or (cfg.train.checkpoint_every
                                             and state.step % cfg.train.checkpoint_every == 0):
            ckpt.save_checkpoint(engine, out_dir, state, cfg, manifest_hash, cfg.train.keep_last,
                                 best=improved, ema=ema)
        if preempted:
            metrics.preempted(state, stop_signal)
            if rank == 0:
                log.warning("preempted at step %d, checkpoint written (%s; continue with --resume auto)",
                            state.step, signal.Signals(stop_signal).name)

    if state.best_step < 0 and not preempted:  # no validation (or never a finite one): export the final weights
        write_export(engine, cfg, manifest, manifest_hash, state.step, out_dir, rank, ema,
                     run_tracking.lineage(tracker))
    bar.close()
    metrics.close()
    run_tracking.finish(tracker, out_dir, preempted)
    D.destroy()
    return 0
