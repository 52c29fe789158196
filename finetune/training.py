"""The training steps of one finetuning (finetune.loop builds the `Trainer` and tests what it kept).

Each step: energies + forces (autograd, create_graph), `energy_force_loss` (+ the replay's pretext loss), AdamW
with the schedule, the EMA. A non-finite loss skips its batch (`pretrain.nonfinite.NonFiniteGuard`: too many in a row
end the run). Validation at step 0, every `val_every` steps and at the end keeps the best weights (`Best`); early
stopping ends training after `early_stopping_patience` validations without a new best, at once or after an
annealing tail of `early_stopping_anneal_steps` (finetune.adapt.EarlyStopping); SIGUSR1/SIGTERM checkpoint and
stop (finetune.resume).
"""
from __future__ import annotations

import logging
import math
import os
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_shards import keys as K
from data_shards.progress import progress
from data_shards.stream import ShardStream
from finetune import adapt as A
from finetune import energy as E
from finetune import resume as RS
from finetune.config import FinetuneConfig
from finetune.forcefield import metrics as M
from finetune.inputs import Inputs
from pretrain.objectives import energy_force_loss

log = logging.getLogger("finetune")


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


@dataclass
class Trainer:
    """One finetuning's training: `loop` is what a checkpoint holds, the rest what steps it."""
    cfg: FinetuneConfig
    inputs: Inputs
    loop: RS.LoopState
    freeze: A.BackboneFreeze
    scored: torch.nn.Module             # the weights that are validated, kept, exported (the EMA's when on)
    device: torch.device
    train_stream: ShardStream
    val_stream: ShardStream
    refit_stream: ShardStream | None    # loss.refit_energy_offset: the training frames the E0 offset is refitted on
    energy_scale: float                 # the model's (eV)
    energy_term_scale: float            # the energy loss term's scale at the end of training (eV/atom)
    started: float = field(default_factory=time.perf_counter)
    last_step: int = 0                  # where training ended (max_steps unless stopped early)

    def __post_init__(self):
        self.last_step = self.cfg.train.max_steps
        self.bar = progress(total=self.cfg.train.max_steps, desc="finetune", unit="step")

    @property
    def stopped_early(self) -> bool:
        """The early-stopping criterion was met before max_steps (training ended there or after its tail)."""
        fired_at = self.loop.stopper.fired_at
        return fired_at is not None and fired_at < self.cfg.train.max_steps

    def validate(self, step: int) -> bool:
        """Evaluate, keep the weights if best, log; True: early stopping says stop here."""
        L, cfg = self.loop, self.cfg
        if self.refit_stream is not None:   # re-centre the energy zero on the training frames (forces don't fix it)
            E.refit_energy_offset(self.scored, self.refit_stream, self.device, quiet=True)
            L.model.get_buffer("e0").copy_(self.scored.get_buffer("e0"))
        figures = M.evaluate(self.scored, self.val_stream, cfg.train.val_batches, self.device)
        improved = L.best.offer(step, figures, self.scored)
        L.history.append({"step": step, **M.without_arrays(figures), "best": improved})
        L.tracker.log_metrics({"val/energy_rmse_mev_per_atom": figures[M.ENERGY_RMSE],
                               "val/force_rmse_mev_per_a": figures[M.FORCE_RMSE],
                               "val/best_force_rmse_mev_per_a": L.best.force_rmse,
                               **system_metrics(self.started, step)}, step)
        L.tracker.flush()
        self.bar.set_postfix(loss=f"{L.train_curve[-1][1]:.4g}" if L.train_curve else "-",
                             val_F=f"{figures[M.FORCE_RMSE]:.1f} meV/Å")
        return L.stopper.should_stop(improved, step)

    def train(self, start: int, out_dir: Path, preempt) -> dict | None:
        """Steps start+1 … max_steps (or an early stop, after its annealing tail if any); a stop signal
        checkpoints and returns {"preempted": signal name, "step", "checkpoint"}, else None."""
        t, L = self.cfg.train, self.loop
        step_sleep = float(os.environ.get(RS.STEP_SLEEP_ENV) or 0)
        step = start
        while step < L.stopper.end_step(t.max_steps):
            step += 1
            if self._step(step) is None:
                continue
            if step % t.val_every == 0 or step == L.stopper.end_step(t.max_steps):
                if self._validate_and_decide(step):
                    break
                L.model.train()
            elif step % t.log_every == 0:
                L.tracker.flush()
            time.sleep(step_sleep)
            stop = preempt.signal
            if stop or (t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps):
                where = RS.save_checkpoint(out_dir, self.cfg, *RS.capture(step, L, self.device))
            if stop:
                self._end()
                name = signal.Signals(stop).name
                log.warning("%s: stopped after step %d, checkpoint written to %s (continue with --resume auto)",
                            name, step, where)
                return {"preempted": name, "step": step, "checkpoint": str(where)}
        self.last_step = step
        self._end()
        return None

    def _validate_and_decide(self, step: int) -> bool:
        """Validate after `step`; True: training ends here (early stop without an annealing tail)."""
        L, t = self.loop, self.cfg.train
        fired_before = L.stopper.fired_at is not None
        stop_now = self.validate(step) and step < t.max_steps
        if fired_before or not self.stopped_early:
            return stop_now
        best = f"best {L.best.force_rmse:.2f} meV/Å at step {L.best.step}"
        if stop_now:
            log.info("step %d: early stop, no better validation force RMSE in the last %d validations (%s)",
                     step, L.stopper.patience, best)
        else:
            log.info("step %d: no better validation force RMSE in the last %d validations (%s): annealing the LR "
                     "to optim.min_lr over %d more steps, then stop", step, L.stopper.patience, best,
                     L.stopper.end_step(t.max_steps) - step)
        return stop_now

    def _end(self) -> None:
        self.bar.close()
        self.freeze.release()

    def _step(self, step: int) -> float | None:
        """One optimizer step; its training loss, or None when the loss was not finite (batch skipped)."""
        cfg, L, device = self.cfg, self.loop, self.device
        self.freeze.before_step(step)
        batch = next(L.batches).to(device)
        out = L.model(batch, compute_forces=True)
        loss = energy_force_loss(out[K.PRED_ENERGY], batch[K.ENERGY], out[K.PRED_FORCES], batch[K.FORCES],
                                 batch[K.NATOMS], cfg.loss.energy_weight, cfg.loss.force_weight,
                                 cfg.loss.kind, self.energy_scale, cfg.loss.huber_delta,
                                 E.energy_loss_scale(self.inputs.manifest, cfg.loss.energy_normalisation,
                                                     self.energy_scale, step / cfg.train.max_steps))
        replay_loss = L.replay.loss(L.model, device) if L.replay is not None else None
        total = loss if replay_loss is None else loss + cfg.replay.weight * replay_loss
        if L.nonfinite.check(bool(torch.isfinite(total)), step):
            return None
        lr = self._optimizer_step(total)
        L.train_curve.append((step, loss.item()))
        logged = {"train/loss": loss.item(), "train/lr": lr}
        if L.replay is not None and replay_loss is not None:
            logged["train/replay_loss"] = L.replay.record(replay_loss)
        L.tracker.log_metrics(logged, step)
        self.bar.set_postfix(loss=f"{loss.item():.4g}",
                             val_F=f"{L.history[-1][M.FORCE_RMSE]:.1f} meV/Å", refresh=False)
        self.bar.update(1)  # one redraw per step
        return loss.item()

    def _optimizer_step(self, total: torch.Tensor) -> float:
        """Backward, clip, AdamW, schedule, EMA; returns the step's learning rate (optim.lr · schedule)."""
        L, optimizer = self.loop, self.loop.optimizer
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(L.model.parameters(), self.cfg.optim.grad_clip)
        lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_mult"]   # optim.lr · schedule
        optimizer.step()
        L.scheduler.step()
        if L.ema is not None:
            L.ema.update_parameters(L.model)
        return lr


def system_metrics(started: float, step: int) -> dict:
    """Cheap process figures logged with each validation (MLflow `system/*`)."""
    elapsed = max(time.perf_counter() - started, 1e-9)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"system/peak_rss_mb": peak_kib / 1024.0, "system/steps_per_s": step / elapsed}
