"""The pretraining loop's parts, one process per rank: lockstep batches, the step, validation, export,
metrics. `pretrain/train.py` holds `main()`, which builds them and runs the loop."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from data_shards import keys as K
from data_shards.config_io import (
    config_hash,
)
from data_shards.epochs import EpochBatches
from data_shards.progress import quiet_libraries as quiet_warnings
from data_shards.stream import ShardStream
from data_shards.version import maskpot_version
from pretrain import checkpoint as ckpt
from pretrain import distributed as D
from pretrain import objectives
from pretrain.config import ObjectiveConfig, PretrainConfig
from pretrain.engine import (
    WeightEMA,
    to_model_precision,
)
from pretrain.export import fp32_state_dict, normalisation_from_stats, save_export
from pretrain.models import build_model
from pretrain.nonfinite import NonFiniteGuard
from pretrain.objectives import energy_force_loss
from pretrain.pretext import SELF_SUPERVISED
from pretrain.stages import init_lineage

STEP_SLEEP_ENV = "MASKPOT_TEST_STEP_SLEEP_S"  # tests: seconds to sleep per step, to signal a run mid-way
log = logging.getLogger("pretrain")


def keep_if_best(state: ckpt.TrainState, validation: dict, metrics: MetricsLog) -> bool:
    """`validation`: {"val_loss": pretext loss, probe figures when the corpus has labels}."""
    val_loss = validation["val_loss"]
    improved = val_loss < state.best_val
    if improved:
        state.best_val, state.best_step = val_loss, state.step
    metrics.validation(state, validation)
    return improved


def check_objective_fits_data(cfg: PretrainConfig, manifest: dict) -> None:
    """Refuse, before any rank starts, an objective the data set cannot serve (from its manifest)."""
    kind, where = cfg.objective.kind, f"the manifest in {cfg.data.manifest_dir}"
    if cfg.objective.task.needs_labels and not manifest.get("labelled"):
        raise ValueError(f"objective.kind {kind!r} needs energies and forces, but {where} says labelled: "
                         f"false; use one of the self-supervised kinds {list(SELF_SUPERVISED)}")
    elements = {int(z) for z in manifest.get("elements", {})}
    if not elements or not cfg.objective.uses_mask:
        return
    if HYDROGEN not in elements:
        raise ValueError(f"objective.kind {kind!r} deletes H atoms, but {where} lists no H (elements "
                         f"{sorted(elements)}); use 'denoise' for this data set")
    if cfg.objective.task.water_only and elements != {HYDROGEN, OXYGEN}:
        raise ValueError(f"objective.kind {kind!r} is water masking (molecules O,H,H) but {where} also holds "
                         f"elements {sorted(elements - {HYDROGEN, OXYGEN})}; use 'hmask' (generic H masking) "
                         "for other molecules")


HYDROGEN, OXYGEN = 1, 8
CUTOFF_OPTIONS = {"mace": "r_max"}  # the name of the graph radius in model.params, when not "cutoff"
NEIGHBOUR_PROBE_RADIUS = 8.0  # Å, radius of the graph used to find the data's nearest-neighbour distance


def nearest_neighbour_distance(manifest_dir: str, split: str, frames: int = 4) -> float | None:
    """Shortest interatomic distance (Å, periodic images included) in the first `frames` structures of
    `split`; None when the split is empty or no pair is closer than NEIGHBOUR_PROBE_RADIUS."""
    stream = ShardStream(manifest_dir, split, frames, NEIGHBOUR_PROBE_RADIUS, limit=frames)
    batch = next(iter(stream), None)
    if batch is None or batch[K.EDGE_INDEX].shape[1] == 0:
        return None
    src, dst = batch[K.EDGE_INDEX]
    pos = batch[K.POSITIONS].double()
    return float((pos[dst] - pos[src] + batch[K.SHIFT_VECTORS].double()).norm(dim=-1).min())


def check_cutoff_fits_data(model_name: str, cutoff: float, manifest_dir: str, split: str) -> None:
    """A graph radius at or below the data's nearest-neighbour distance gives no atom a neighbour."""
    nearest = nearest_neighbour_distance(manifest_dir, split)
    if nearest is not None and cutoff <= nearest:
        option = f"model.params.{CUTOFF_OPTIONS.get(model_name, 'cutoff')}"
        raise ValueError(f"{option} {cutoff} Å is not larger than the nearest-neighbour distance {nearest:.3f} Å "
                         f"of split {split!r} in {manifest_dir}: no atom would have a neighbour; use "
                         f"{option} > {nearest:.3f} Å")


def quiet_libraries(rank: int) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    quiet_warnings()
    from deepspeed.utils import logger as ds_logger  # startup: deepspeed+mlflow+torch
    ds_logger.setLevel(logging.WARNING)


def make_transform(cfg: PretrainConfig, seed: int):
    return objective_transform(cfg.objective, seed)


def objective_transform(o: ObjectiveConfig, seed: int):
    """The pretext transform of objective `o` (None for "supervised": labels reach the loss untouched)."""
    make = o.task.transform
    return make(o, seed) if make is not None else None


def make_stream(cfg: PretrainConfig, split: str, rank: int, world_size: int, seed: int | None = None,
                pretext: bool = True):
    """Batches of `split`; pretext=False: untransformed, labels kept (the linear probe)."""
    d = cfg.data
    seed = cfg.train.seed if seed is None else seed
    return ShardStream(d.manifest_dir, split, d.batch_size, cfg.model.cutoff, rank=rank, world_size=world_size,
                       num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer if split == d.train_split else 0,
                       seed=seed, transform=make_transform(cfg, seed) if pretext else None, limit=d.limit)


def agreed_signal(signum: int | None) -> int:
    """The (highest) preemption signal any rank received, 0 if none: every rank gets the same answer."""
    return int(D.all_reduce_scalar(float(signum or 0), "max"))


all_ranks = D.agree  # true on every rank iff true on all


class Batches(Protocol):
    """What a training step draws from: `LockstepBatches`, or `mixture.MixedBatches` over several sets."""

    def next(self) -> Any: ...

    def position(self) -> tuple[int, int]: ...


class LockstepBatches(EpochBatches):
    """Batches of one split, epoch after epoch; an epoch ends for every rank when any rank runs dry."""

    def __init__(self, stream, epoch: int = 0, skip: int = 0):
        super().__init__(stream, epoch, skip, agree=all_ranks,
                         empty="the training split yields no batch on at least one rank: use fewer ranks, "
                               "a smaller data.batch_size, or more shards")


def pretext_loss(cfg: PretrainConfig, engine, batch) -> torch.Tensor:
    batch = to_model_precision(batch, engine)
    out = engine(batch, compute_forces=True)
    pred = out[K.PRED_FORCES].float()
    if cfg.objective.task.needs_labels:   # supervised pretraining: energies and forces
        o = cfg.objective
        return energy_force_loss(out[K.PRED_ENERGY], batch[K.ENERGY], pred, batch[K.FORCES], batch[K.NATOMS],
                                 energy_weight=o.energy_weight, force_weight=o.force_weight,
                                 energy_scale=float(engine.module.energy_scale))
    return objectives.pretext_loss(cfg.objective, pred, batch)


def agree_on_loss(loss: torch.Tensor) -> tuple[bool, float]:
    """(finite on every rank, mean over ranks) with one all-reduce."""
    value = loss.detach().float().cpu()
    finite = bool(torch.isfinite(value))
    t = D.all_reduce(torch.tensor([1.0 if finite else 0.0, value.item() if finite else 0.0], dtype=torch.float64))
    world = D.world_size()
    return t[0].item() == world, t[1].item() / world


def train_step(engine, cfg: PretrainConfig, batches: Batches, state: ckpt.TrainState) -> float:
    """One optimizer step; returns the rank-mean loss of its micro batches."""
    losses: list[float] = []
    # a fresh guard per step: its run counts the non-finite micro batches of this step's accumulation
    guard = NonFiniteGuard(skipped=state.skipped_nonfinite, where=" on some rank", log=log)
    while len(losses) < cfg.deepspeed.gradient_accumulation_steps:
        loss = pretext_loss(cfg, engine, batches.next())
        finite, mean_loss = agree_on_loss(loss)
        if not finite:
            state.skipped_nonfinite = guard.skip(state.step + 1)
            continue
        engine.backward(loss)
        engine.step()
        losses.append(mean_loss)
    return sum(losses) / len(losses)


def make_validator(cfg: PretrainConfig, manifest: dict, rank: int, world_size: int):
    """A callable engine → {"val_loss": mean validation pretext loss, linear-probe figures (labelled data,
    train.linear_probe)}, or None when validation is off."""
    split = cfg.data.val_split
    if not cfg.train.val_every or not split or not manifest.get("splits", {}).get(split, {}).get("samples"):
        if rank == 0 and cfg.train.val_every:
            log.warning("no validation: split %r is empty or absent; exporting the final weights", split)
        return None
    stream = make_stream(cfg, split, rank, world_size, seed=cfg.train.seed + 1)
    probe = None
    if cfg.train.linear_probe and manifest.get("labelled"):
        from pretrain.probe import make_probe  # startup: torch

        probe = make_probe(make_stream(cfg, split, rank, world_size, seed=cfg.train.seed + 1, pretext=False),
                           cfg.train.val_batches, sorted(int(z) for z in manifest.get("elements", {})))

    def validate(engine, ema: WeightEMA | None = None) -> dict:
        if ema is not None:
            with ema.swapped_in(engine):
                return validate(engine)
        engine.eval()
        stream.set_epoch(0)  # fixed masks: the same epoch and seed every time
        batches = iter(stream)
        total = torch.zeros(2, dtype=torch.float64)
        for _ in range(cfg.train.val_batches):
            batch = next(batches, None)
            if not all_ranks(batch is not None):
                break
            total += torch.tensor([pretext_loss(cfg, engine, batch).detach().item(), 1.0], dtype=torch.float64)
        total = D.all_reduce(total)
        result = {"val_loss": total[0].item() / max(total[1].item(), 1.0)}
        if probe is not None:
            result.update(probe(engine))
        engine.train()
        return result

    return validate


def write_export(engine, cfg: PretrainConfig, manifest: dict, manifest_hash: str, step: int,
                 out_dir: Path, rank: int, ema: WeightEMA | None = None, lineage: dict | None = None) -> None:
    """Collective (fp32 master weights are gathered); rank 0 writes out_dir/export/ (EMA weights if on)."""
    state = ema.state_dict(engine) if ema is not None else fp32_state_dict(engine)
    if rank != 0:
        return
    model = build_model(cfg.model.name, cfg.model.params)
    model.load_state_dict(state)
    meta = {"model": cfg.model.name, "params": cfg.model.arch_params(),   # params hold the cutoff
            "species": sorted(int(z) for z in manifest.get("elements", {})),
            "normalisation": normalisation_from_stats(manifest),
            "lineage": {"config_sha256": config_hash(cfg), "manifest_sha256": manifest_hash,
                        "maskpot_version": maskpot_version(),
                        "pretrain_objective": cfg.objective.kind, "steps": step,
                        "ema_decay": cfg.optim.ema_decay, **({"data_sets": cfg.data.sets} if cfg.data.sets else {}),
                        **init_lineage(cfg), **(lineage or {})}}
    save_export(model, out_dir / "export", meta)


class MetricsLog:
    """Rank 0 appends one json line per logged step (and per validation) to metrics.jsonl."""

    def __init__(self, path: Path, rank: int, cfg: PretrainConfig):
        self.file = path.open("a") if rank == 0 else None
        self.every = cfg.train.log_every
        self.structures_per_step = (cfg.data.batch_size * D.world_size()
                                    * cfg.deepspeed.gradient_accumulation_steps)
        self.losses: list[float] = []
        self.seconds = 0.0
        # rank 0 with tracking: each record also goes to MLflow (pretrain/run_tracking.py)
        self.sink: Callable[[dict], None] | None = None

    def _write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.sink is not None:
            self.sink(record)

    def train(self, state: ckpt.TrainState, loss: float, lr: float, seconds: float) -> None:
        self.losses.append(loss)
        self.seconds += seconds
        if state.step % self.every:
            return
        steps_per_s = len(self.losses) / self.seconds
        self._write({"step": state.step, "epoch": state.epoch, "loss": sum(self.losses) / len(self.losses),
                     "lr": lr, "steps_per_s": steps_per_s, "skipped_nonfinite": state.skipped_nonfinite,
                     "structures_per_s": steps_per_s * self.structures_per_step})
        self.losses, self.seconds = [], 0.0

    def validation(self, state: ckpt.TrainState, validation: dict) -> None:
        self._write({"step": state.step, **validation, "best_val": state.best_val, "best_step": state.best_step})

    def preempted(self, state: ckpt.TrainState, signum: int) -> None:
        self._write({"step": state.step, "preempted": True, "signal": signum})

    def close(self) -> None:
        if self.file:
            self.file.close()
