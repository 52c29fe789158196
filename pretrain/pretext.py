"""The pretext tasks, one registry: what each `objective.kind` does to a sample, which losses it trains,
and what data it needs. A new pretext task is one entry here (plus its transform in transforms.py).

Every use reads this table: config validation (`objective.kind`), the sample transform of the pretraining
stream and of the finetune replay, the pretext loss (`objectives.pretext_loss`), and the data checks that
refuse an objective the data cannot serve before any rank starts.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pretrain import transforms as T


@dataclass(frozen=True)
class PretextTask:
    what: str                            # one line for users
    transform: Callable[[Any, int], Any] | None   # (ObjectiveConfig, seed) → sample transform; None: untouched
    mask: bool = False                   # cosine loss toward the deleted H on the flagged atoms
    denoise: bool = False                # MSE toward the displacement that undoes the noise
    water_only: bool = False             # molecules O,H,H: the data may hold only O and H
    needs_labels: bool = False           # energies and forces (supervised pretraining)


PRETEXT_TASKS: dict[str, PretextTask] = {
    "mask": PretextTask(
        "delete one H from a fraction (mask_ratio) of the waters; the survivors point at it (the paper)",
        lambda o, seed: T.WaterMasking(o.mask_ratio, seed, grouping=o.water_grouping), mask=True, water_only=True),
    "denoise": PretextTask(
        "displace every atom by Gaussian noise (noise_sigma Å); predict the displacement back",
        lambda o, seed: T.Denoising(o.noise_sigma, seed), denoise=True),
    "mask+denoise": PretextTask(
        "water masking on a noised frame; both losses",
        lambda o, seed: T.MaskDenoise(o.mask_ratio, o.noise_sigma, seed, grouping=o.water_grouping),
        mask=True, denoise=True, water_only=True),
    "hmask": PretextTask(
        "generic H masking for any molecule: each H deleted with probability h_mask_p",
        lambda o, seed: T.HydrogenMasking(o.h_mask_p, seed, radius=o.h_mask_radius, target=o.h_mask_target),
        mask=True),
    "supervised": PretextTask(
        "energies and forces of a labelled corpus (a supervised baseline, not a pretext task)", None,
        needs_labels=True),
}
SELF_SUPERVISED = tuple(k for k, task in PRETEXT_TASKS.items() if not task.needs_labels)
