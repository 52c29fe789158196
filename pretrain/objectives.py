"""Pretext and supervised losses. Each returns a scalar tensor that can be backpropagated."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from data_shards import keys as K

if TYPE_CHECKING:
    from pretrain.config import ObjectiveConfig

LOSS_KINDS = ("l1", "l2", "huber")
COSINE_EPS = 1e-8


def cosine_mask_loss(pred_vectors: torch.Tensor, target: torch.Tensor, flag: torch.Tensor,
                     pooled: bool = False) -> torch.Tensor:
    """1 − cosine between predicted vectors and unit targets on flagged atoms.

    Per atom (default): 1 − mean_i cos(p_i, d_i). Pooled (the paper's formula): one cosine between the
    concatenated vectors, 1 − Σ p_i·d_i / (‖P‖ ‖D‖), which weights atoms by the size of their prediction.
    No flagged atom gives 0 (still attached to the graph, so backward works).
    """
    if pred_vectors.shape != target.shape or pred_vectors.shape[:1] != flag.shape:
        raise ValueError(f"shapes differ: pred {tuple(pred_vectors.shape)}, target {tuple(target.shape)}, "
                         f"flag {tuple(flag.shape)}; expected (N, 3), (N, 3), (N,)")
    selected = flag.bool()
    if not selected.any():
        return pred_vectors.sum() * 0.0
    p = pred_vectors[selected]
    d = target[selected].to(p.dtype)
    if pooled:
        dot = (p * d).sum()
        return 1.0 - dot / (p.norm() * d.norm()).clamp_min(COSINE_EPS)
    return 1.0 - F.cosine_similarity(p, d, dim=-1, eps=COSINE_EPS).mean()


def denoise_loss(pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the predicted and the applied displacement (Å²)."""
    if pred.shape != noise.shape:
        raise ValueError(f"shapes differ: pred {tuple(pred.shape)}, noise {tuple(noise.shape)}")
    return F.mse_loss(pred, noise.to(pred.dtype))


def pretext_loss(objective: ObjectiveConfig, pred: torch.Tensor, batch) -> torch.Tensor:
    """The pretext loss of `objective` on the model's vector output `pred` (N, 3): the cosine mask loss on the
    flagged atoms and/or the denoising MSE, summed, from the targets the objective's transform put in `batch`.
    Zero (not attached to the graph) for an objective with neither, e.g. "supervised"."""
    loss = pred.new_zeros(())
    if objective.uses_mask:
        loss = loss + cosine_mask_loss(pred, batch[K.MASK_TARGET], batch[K.MASK_FLAG], pooled=objective.pooled_cosine)
    if objective.uses_denoise:
        loss = loss + denoise_loss(pred, batch[K.NOISE_TARGET])
    return loss


def _elementwise(diff: torch.Tensor, kind: str, huber_delta: float) -> torch.Tensor:
    if kind == "l1":
        return diff.abs()
    if kind == "l2":
        return diff * diff
    return F.huber_loss(diff, torch.zeros_like(diff), reduction="none", delta=huber_delta)


def energy_force_loss(pred_energy: torch.Tensor, energy: torch.Tensor, pred_forces: torch.Tensor,
                      forces: torch.Tensor, natoms: torch.Tensor, energy_weight: float = 1.0,
                      force_weight: float = 1.0, kind: str = "l1", energy_scale: float = 1.0,
                      huber_delta: float = 1.0, energy_term_scale: float | None = None) -> torch.Tensor:
    """energy_weight · mean_b ρ((Ê_b − E_b) / n_b / σ_E) + force_weight · mean ρ((F̂ − F) / σ).

    σ = `energy_scale` (eV) makes both terms dimensionless (the reference: L1 on (E − μ)/σ and on F/σ);
    σ_E = `energy_term_scale` (eV/atom, default σ), e.g. the per-atom energy spread after E0 so that the
    energy term is not negligible when that spread is far below the force scale. ρ is `kind` ("l1", "l2"
    or "huber" with `huber_delta` in those units). The energy difference is taken in float64 (absolute
    energies ~ -3e4 eV) before it is cast to the forces' dtype.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind {kind!r} is not one of {list(LOSS_KINDS)}")
    if not energy_scale > 0:
        raise ValueError(f"energy_scale must be > 0 eV, got {energy_scale}")
    if pred_energy.shape != energy.shape or pred_energy.shape != natoms.shape:
        raise ValueError(f"energy shapes differ: pred {tuple(pred_energy.shape)}, target "
                         f"{tuple(energy.shape)}, natoms {tuple(natoms.shape)}; expected (B,)")
    if pred_forces.shape != forces.shape:
        raise ValueError(f"force shapes differ: pred {tuple(pred_forces.shape)}, target {tuple(forces.shape)}")
    sigma_e = energy_scale if energy_term_scale is None else energy_term_scale
    if not sigma_e > 0:
        raise ValueError(f"energy_term_scale must be > 0 eV/atom, got {energy_term_scale}")
    per_atom = (pred_energy.double() - energy.double()) / natoms.double()
    energy_term = _elementwise((per_atom / sigma_e).to(pred_forces.dtype), kind, huber_delta).mean()
    force_term = _elementwise((pred_forces - forces.to(pred_forces.dtype)) / energy_scale, kind,
                              huber_delta).mean()
    return energy_weight * energy_term + force_weight * force_term
