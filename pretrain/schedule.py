"""The learning-rate schedule every loop uses (pretraining under DeepSpeed, finetuning): a pure function of the step.

`cosine`: linear warm-up over `warmup_steps`, then a half-cosine from `lr` to `min_lr` at `decay_steps`
(null: the run's `train.max_steps`). `constant`: the same warm-up, then `lr`.
"""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "constant")


def lr_factor(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Multiplier of `lr` after `step` optimizer steps: linear warm-up, then half-cosine to min_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    floor = min_lr / lr
    span = max(1, decay_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_factor(schedule: str, step: int, lr: float, min_lr: float, warmup_steps: int,
                    decay_steps: int) -> float:
    """Multiplier of `lr` after `step` optimizer steps under `schedule` (one of SCHEDULES)."""
    if schedule == "constant":
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    assert schedule == "cosine", schedule   # OptimConfig validated it
    return lr_factor(step, lr, min_lr, warmup_steps, decay_steps)
