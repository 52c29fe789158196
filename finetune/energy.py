"""Energy handling a few-shot finetune can trust: loss scale, offset refit, split checks, model selection.

- `energy_loss_scale`: the energy term of the loss is divided by the per-atom energy spread after E0 of
  the training split (manifest `energy_per_atom_std`), not by the force scale: for a small molecule the
  first is ~10 meV/atom and the second ~1 eV, so with the force scale the energy was barely constrained.
- `refit_energy_offset`: before the first step, E0 is shifted (least squares over the element counts,
  minimum norm) so that the model's mean energy error on the labelled training frames is zero; a
  pretrained export otherwise starts 0.2-1.2 eV/atom off.
- `distant_splits`: a validation or test split whose per-atom energies after E0 sit many training
  standard deviations away (another energy zero, e.g. another DFT code or functional) gets a warning.
- `selection_score`: the number the best model is chosen by (force, energy or weighted).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
import torch

from data_shards import keys as K
from finetune.forcefield import metrics as M

log = logging.getLogger("finetune")

SELECT_METRICS = ("force", "energy", "weighted")
ENERGY_NORMALISATIONS = ("annealed", "energy_std", "force_scale")
MIN_ENERGY_STD = 1e-4          # eV/atom: floor of the energy term's scale (identical energies would give 0)
DISTANT_SIGMAS = 100.0         # a split this many training std away is on another energy zero
REFIT_MAX_BATCHES = 64         # batches of training frames the offset is refitted on (all of a few-shot set)


def energy_loss_scale(manifest: dict, mode: str, force_scale: float, progress: float = 1.0) -> float:
    """eV/atom the per-atom energy error is divided by in the loss at `progress` (step / max_steps).

    energy_std: the training split's per-atom energy spread after E0; force_scale: the force RMS (eV/Å);
    annealed: geometric from the force scale at step 0 to the energy spread at the last step (as DeePMD
    moves its loss prefactors), so forces are learnt first and energies pinned by the end.
    """
    if mode not in ENERGY_NORMALISATIONS:
        raise ValueError(f"loss.energy_normalisation {mode!r} is not one of {list(ENERGY_NORMALISATIONS)}")
    std = (manifest.get("stats") or {}).get("energy_per_atom_std")
    if mode == "force_scale" or std is None or not math.isfinite(std):
        return force_scale
    std = max(float(std), MIN_ENERGY_STD)
    if mode == "energy_std":
        return std
    p = min(max(progress, 0.0), 1.0)
    return force_scale ** (1.0 - p) * std ** p


def selection_score(figures: dict, metric: str, energy_scale: float, force_scale: float,
                    energy_weight: float, force_weight: float) -> float:
    """Lower is better. weighted = (energy_weight · E_rmse/σ_E + force_weight · F_rmse/σ_F) / (sum of weights),
    σ_E the energy term's scale (eV/atom), σ_F the force scale (eV/Å): the loss's own balance."""
    if metric == "force":
        return figures[M.FORCE_RMSE]
    if metric == "energy":
        return figures[M.ENERGY_RMSE]
    energy = figures[M.ENERGY_RMSE] / (M.MILLI * energy_scale)
    force = figures[M.FORCE_RMSE] / (M.MILLI * force_scale)
    return (energy_weight * energy + force_weight * force) / (energy_weight + force_weight)


def _composition(species: torch.Tensor, graph: torch.Tensor, num_graphs: int, elements: list[int]) -> np.ndarray:
    counts = np.zeros((num_graphs, len(elements)))
    sp, gr = species.cpu().numpy(), graph.cpu().numpy()
    for j, z in enumerate(elements):
        np.add.at(counts[:, j], gr[sp == z], 1.0)
    return counts


def refit_energy_offset(model: torch.nn.Module, batches: Iterable, device: torch.device,
                        max_batches: int = REFIT_MAX_BATCHES, quiet: bool = False) -> dict:
    """Shift the model's E0 so its energy residuals on `batches` have least-squares zero mean per element
    count (minimum norm: one composition gives one shift per atom). Returns {"shift": {Z: eV},
    "mean_error_before_mev_per_atom", "frames"}."""
    was_training = model.training
    model.eval()
    rows, residuals, natoms = [], [], []
    elements = sorted(int(z) for z in range(1, K.MAX_Z + 1) if float(model.e0[z]) != 0.0)
    try:
        for index, batch in enumerate(batches):
            if index >= max_batches:
                break
            batch = batch.to(device)
            out = model(batch, compute_forces=False)
            present = sorted(set(elements) | {int(z) for z in torch.unique(batch[K.SPECIES]).tolist()})
            elements = present
            rows.append((batch[K.SPECIES].detach(), batch.batch.detach(), int(batch.num_graphs)))
            residuals.append((batch[K.ENERGY].double() - out[K.PRED_ENERGY].detach().double()).cpu().numpy())
            natoms.append(batch[K.NATOMS].double().cpu().numpy())
    finally:
        model.train(was_training)
    if not residuals:
        return {"shift": {}, "mean_error_before_mev_per_atom": None, "frames": 0}
    a = np.concatenate([_composition(s, g, n, elements) for s, g, n in rows])
    r = np.concatenate(residuals)
    shift, *_ = np.linalg.lstsq(a, r, rcond=None)
    with torch.no_grad():
        for z, value in zip(elements, shift):
            model.e0[z] += float(value)
    before = float(np.mean(-r / np.concatenate(natoms)))
    (log.debug if quiet else log.info)(
        "energy offset refitted on %d training frames: mean error was %.1f meV/atom; E0 shifted by %s eV", len(r),
        M.MILLI * before, {K.CHEMICAL_SYMBOLS[z]: round(float(v), 4) for z, v in zip(elements, shift)})
    return {"shift": {str(z): float(v) for z, v in zip(elements, shift)},
            "mean_error_before_mev_per_atom": M.MILLI * before, "frames": len(r)}


def split_energy_mean(batches: Iterable, e0: dict[int, float]) -> tuple[float, int]:
    """(mean per-atom energy after subtracting Σ E0[Z], structures) of a labelled stream."""
    total, count = 0.0, 0
    for batch in batches:
        species = batch[K.SPECIES].cpu().numpy()
        ref = np.zeros(int(batch.num_graphs))
        np.add.at(ref, batch.batch.cpu().numpy(), np.array([e0.get(int(z), 0.0) for z in species]))
        per_atom = (batch[K.ENERGY].double().cpu().numpy() - ref) / batch[K.NATOMS].double().cpu().numpy()
        total, count = total + float(per_atom.sum()), count + len(per_atom)
    return (total / count if count else math.nan), count


def distant_splits(manifest: dict, streams: dict[str, Iterable]) -> dict[str, float]:
    """{split: distance in training std} for each split of `streams` whose per-atom energies after E0 lie
    more than DISTANT_SIGMAS training standard deviations from the training mean; each gets a warning."""
    stats = manifest.get("stats") or {}
    mean, std = stats.get("energy_per_atom_mean"), stats.get("energy_per_atom_std")
    if mean is None or std is None:
        return {}
    e0 = {int(z): float(v) for z, v in (stats.get("e0") or {}).items()}
    far = {}
    for split, stream in streams.items():
        value, count = split_energy_mean(stream, e0)
        if not count:
            continue
        sigmas = abs(value - mean) / max(std, 1e-12)
        if sigmas > DISTANT_SIGMAS:
            far[split] = sigmas
            log.warning("split %r: its per-atom energies after E0 average %.4g eV/atom, %.3g training standard "
                        "deviations (%.3g meV/atom) from the training split's %.4g eV/atom: probably another "
                        "energy zero (code, functional, pseudopotentials); its energy errors will be dominated by "
                        "the offset (`maskpot evaluate` reports the offset-corrected energy RMSE beside the raw one)",
                        split, value, sigmas, M.MILLI * std, mean)
    return far


def model_normalisation(model: torch.nn.Module) -> dict:
    """The model's own {"energy_scale", "e0"} for its export (E0 after the refit, not the manifest's)."""
    return {"energy_scale": float(model.energy_scale),
            "e0": {str(z): float(model.e0[z]) for z in range(1, K.MAX_Z + 1) if float(model.e0[z]) != 0.0}}
