"""Finetuning checkpoints: OUT_DIR/checkpoint/{state.json, tensors.safetensors}, nothing pickled.

Written on SIGUSR1/SIGTERM (at the next step boundary, then the run stops with exit 0) and every
`train.checkpoint_every` steps. It holds everything the rest of the run depends on: model, EMA, optimizer,
LR schedule, RNG, the training (and replay) stream position, the best model so far with its figures, the
early-stopping count, the learning curve and validation history, and the MLflow run id with the journal
entries not yet sent. `--resume auto` (the default) continues from it exactly: the same batches, losses and
best-model choice as an uninterrupted run, logged into the same MLflow run.

A new checkpoint is written next to the old one and swapped in by renames, so a kill while writing leaves
the previous one loadable.
"""
from __future__ import annotations

import ast
import json
import logging
import random
import shutil
import signal
import threading
import types
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel

from data_shards.config_io import config_hash
from data_shards.epochs import EpochBatches
from finetune.forcefield import metrics as M
from pretrain.checkpoint import PREEMPT_SIGNALS, PreemptionFlag
from pretrain.nonfinite import NonFiniteGuard

if TYPE_CHECKING:   # the loop's parts, built by finetune.loop (they import this module)
    from finetune.adapt import EarlyStopping
    from finetune.replay import Replay
    from finetune.tracking import Tracker
    from finetune.training import Best

CHECKPOINT_DIR, STATE_FILE, TENSORS_FILE = "checkpoint", "state.json", "tensors.safetensors"
FORMAT_VERSION = 1
RESUME_MODES = ("auto", "never")
STEP_SLEEP_ENV = "MASKPOT_TEST_STEP_SLEEP_S"  # tests: seconds to sleep per step, to signal a run mid-way


@contextmanager
def preemption_signals(pending: Callable[[], str | None] | None = None):
    """SIGUSR1/SIGTERM only set a flag (`.signal`) while the loop runs; the previous handlers come back after.

    `pending`: the name of a stop signal the caller's own handler caught before the loop's was installed
    (during the run's setup), or None; the flag starts raised with it, so the loop stops after its first step.
    Off the main thread (signals cannot be caught there) the flag simply never rises."""
    if threading.current_thread() is not threading.main_thread():
        yield types.SimpleNamespace(signal=None)
        return
    saved = {s: signal.getsignal(s) for s in PREEMPT_SIGNALS}
    try:
        flag = PreemptionFlag()   # installed first: a signal from here on raises the flag itself
        caught_before = pending() if pending is not None else None
        if caught_before and flag.signal is None:
            flag.signal = signal.Signals[caught_before]
        yield flag
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def endless_batches(stream, what: str = "the training stream") -> EpochBatches:
    """The finetuning's batches: one process, epoch after epoch, resumable by `seek`."""
    return EpochBatches(stream, empty=f"{what} yielded no batch")


def nonfinite_guard() -> NonFiniteGuard:
    """Finetuning's non-finite loss guard: warnings on the "finetune" logger, the fix to try in its error."""
    return NonFiniteGuard(advice="; lower optim.lr or raise optim.warmup_steps", log=logging.getLogger("finetune"))


@dataclass
class LoopState:
    """What the finetuning loop changes as it goes (finetune.loop builds it): all of it is checkpointed."""
    model: torch.nn.Module
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: EpochBatches
    replay: Replay | None
    tracker: Tracker
    best: Best
    stopper: EarlyStopping
    history: list = field(default_factory=list)
    train_curve: list = field(default_factory=list)
    nonfinite: NonFiniteGuard = field(default_factory=nonfinite_guard)  # checkpointed: skipped, run


@dataclass
class Checkpoint:
    state: dict                        # state.json
    tensors: dict[str, torch.Tensor]   # tensors.safetensors, keys "<part>.<name>"

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        start = len(prefix) + 1
        return {k[start:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def optimizer_parts(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) of an optimizer's state_dict."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict] = {}
    for index, values in sd["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def load_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["plain"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the global RandomState is an MT19937: the legacy tuple
    kind, keys, pos, has_gauss, gauss = np_state
    plain = {"python": repr(random.getstate()), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict, device: torch.device) -> None:
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    random.setstate(ast.literal_eval(plain["python"]))
    kind, keys, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def save_checkpoint(out_dir: Path, cfg, state: dict, tensors: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write `state` (JSON) and `tensors` ({part: {name: tensor}}) as OUT_DIR/checkpoint, swapped in by renames."""
    final = Path(out_dir) / CHECKPOINT_DIR
    new, old = final.with_name(CHECKPOINT_DIR + ".new"), final.with_name(CHECKPOINT_DIR + ".old")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    flat = {}
    for part, values in tensors.items():
        flat.update(_prefixed(part, values))
    save_file(flat, str(new / TENSORS_FILE))
    record = {"format_version": FORMAT_VERSION, "config_sha256": config_hash(cfg), **state}
    (new / STATE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out_dir: Path, cfg) -> Checkpoint | None:
    """The checkpoint in OUT_DIR (or the previous one, if a swap was cut short), None if there is none.

    ValueError when it belongs to another config (the run would not continue the same training)."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        folder = Path(out_dir) / name
        if (folder / STATE_FILE).is_file() and (folder / TENSORS_FILE).is_file():
            break
    else:
        return None
    state = json.loads((folder / STATE_FILE).read_text())
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{folder / STATE_FILE}: format_version {state['format_version']} is newer than this "
                         "maskpot reads; upgrade maskpot or pass --resume never")
    if state["config_sha256"] != config_hash(cfg):
        raise ValueError(f"refusing to resume from {folder}: it was written by another finetune config "
                         f"(sha256 {state['config_sha256'][:12]}… → now {config_hash(cfg)[:12]}…); pass "
                         "--resume never to start over in this folder, or use another train.out_dir")
    return Checkpoint(state, load_file(str(folder / TENSORS_FILE)))


def finished_results(path: Path, cfg) -> dict | None:
    """results.json of a finished run of this same config, else None."""
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if results.get("config_sha256") == config_hash(cfg) else None


def remove_checkpoint(out_dir: Path) -> None:
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old", CHECKPOINT_DIR + ".new"):
        shutil.rmtree(Path(out_dir) / name, ignore_errors=True)


def capture(step: int, loop, device: torch.device) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(state, tensors) of the finetuning loop `loop` (finetune.resume.LoopState) after optimizer step `step`."""
    opt_tensors, opt_meta = optimizer_parts(loop.optimizer)
    rng_tensors, rng_plain = rng_state(device)
    best = loop.best
    tensors = {"model": loop.model.state_dict(), "optimizer": opt_tensors, "rng": rng_tensors}
    if loop.ema is not None:
        tensors["ema"] = loop.ema.state_dict()
    if best.state is not None:
        tensors["best"] = best.state
        tensors["best_arrays"] = {k: torch.from_numpy(np.ascontiguousarray(v))
                                  for k, v in best.figures[M.ARRAYS].items()}
    state = {"step": step, "optimizer": opt_meta, "scheduler": loop.scheduler.state_dict(), "rng": rng_plain,
             "train_position": loop.batches.position(),
             "replay": ({"position": loop.replay.batches.position(), "losses": loop.replay.losses}
                        if loop.replay is not None else None),
             "best": {"step": best.step, "force_rmse": best.force_rmse, "score": best.score,
                      "figures": M.without_arrays(best.figures) if best.figures else None},
             "early_stopping_stale": loop.stopper.stale, "early_stopping_fired_at": loop.stopper.fired_at,
             "history": loop.history, "train_curve": loop.train_curve,
             "skipped": loop.nonfinite.skipped, "nonfinite_run": loop.nonfinite.run,
             "tracking": loop.tracker.snapshot()}
    return state, tensors


def restore(ckpt: Checkpoint, loop, device: torch.device) -> int:
    """Put the checkpoint's state into `loop` (built as for a fresh run); returns the step it was taken after."""
    s = ckpt.state
    loop.model.load_state_dict(ckpt.part("model"))
    if loop.ema is not None:
        loop.ema.load_state_dict(ckpt.part("ema"))
    load_optimizer(loop.optimizer, ckpt.part("optimizer"), s["optimizer"])
    loop.scheduler.load_state_dict(s["scheduler"])
    loop.batches.seek(*s["train_position"])
    if loop.replay is not None:
        loop.replay.batches.seek(*s["replay"]["position"])
        loop.replay.losses[:] = s["replay"]["losses"]
    b = s["best"]
    loop.best.step, loop.best.force_rmse, loop.best.score = b["step"], b["force_rmse"], b["score"]
    if b["figures"] is not None:
        arrays = {k: v.numpy() for k, v in ckpt.part("best_arrays").items()}
        loop.best.figures, loop.best.state = {**b["figures"], M.ARRAYS: arrays}, ckpt.part("best")
    loop.stopper.stale = s["early_stopping_stale"]
    loop.stopper.fired_at = s.get("early_stopping_fired_at")   # absent from checkpoints before annealing tails
    loop.history[:] = s["history"]
    loop.train_curve[:] = [tuple(x) for x in s["train_curve"]]
    loop.nonfinite.skipped, loop.nonfinite.run = s["skipped"], s["nonfinite_run"]
    set_rng_state(ckpt.part("rng"), s["rng"], device)
    return int(s["step"])
