"""Accuracy of energies and forces over a stream of labelled batches.

Units of the reported figures: energies per atom in meV/atom, forces in meV/Å (RMSE and MAE over all
Cartesian components). The raw arrays (eV/atom, eV/Å) come back too, for parity plots.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from data_shards import keys as K
from pretrain.models.strain import energy_forces_stress

MILLI = 1000.0

# keys of the dict `evaluate` returns
ENERGY_RMSE = "energy_rmse_mev_per_atom"
ENERGY_MAE = "energy_mae_mev_per_atom"
ENERGY_OFFSET = "energy_offset_mev_per_atom"                        # mean (pred − ref) per atom
ENERGY_RMSE_CORRECTED = "energy_rmse_offset_corrected_mev_per_atom"  # RMSE after removing that mean
FORCE_RMSE = "force_rmse_mev_per_a"
FORCE_MAE = "force_mae_mev_per_a"
FORCE_RMSE_PER_ELEMENT = "force_rmse_per_element_mev_per_a"   # {"1": ..., "8": ...}
STRESS_RMSE = "stress_rmse_mev_per_a3"   # only when the labels carry stress (energy-centric models)
STRUCTURES = "structures"
ATOMS = "atoms"
ARRAYS = "arrays"   # {"energy_per_atom_ref", "energy_per_atom_pred" (B,), "forces_ref", "forces_pred" (N,3),
#                      "species" (N,)} numpy, eV/atom and eV/Å


def rmse(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - np.asarray(ref, np.float64)) ** 2)))


def mae(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(pred, np.float64) - np.asarray(ref, np.float64))))


def summarize(energy_pred: np.ndarray, energy_ref: np.ndarray, forces_pred: np.ndarray,
              forces_ref: np.ndarray, species: np.ndarray) -> dict:
    """Figures (meV) from per-atom energies (eV/atom, (B,)) and forces (eV/Å, (N, 3)) of the same structures."""
    if energy_pred.shape != energy_ref.shape or forces_pred.shape != forces_ref.shape:
        raise ValueError(f"prediction/reference shapes differ: energies {energy_pred.shape} vs {energy_ref.shape}, "
                         f"forces {forces_pred.shape} vs {forces_ref.shape}")
    if len(species) != len(forces_ref):
        raise ValueError(f"{len(species)} species for {len(forces_ref)} force rows")
    if energy_ref.size == 0:
        raise ValueError("no labelled structures to evaluate")
    energy_error = np.asarray(energy_pred, np.float64) - np.asarray(energy_ref, np.float64)
    per_element = {str(int(z)): MILLI * rmse(forces_pred[species == z], forces_ref[species == z])
                   for z in np.unique(species)}
    return {
        ENERGY_RMSE: MILLI * rmse(energy_pred, energy_ref),
        ENERGY_MAE: MILLI * mae(energy_pred, energy_ref),
        ENERGY_OFFSET: MILLI * float(np.mean(energy_error)),
        ENERGY_RMSE_CORRECTED: MILLI * float(np.std(energy_error)),
        FORCE_RMSE: MILLI * rmse(forces_pred, forces_ref),
        FORCE_MAE: MILLI * mae(forces_pred, forces_ref),
        FORCE_RMSE_PER_ELEMENT: per_element,
        STRUCTURES: int(energy_ref.size),
        ATOMS: int(len(species)),
    }


def evaluate(model: torch.nn.Module, stream: Iterable, max_batches: int | None = None,
             device: torch.device | str = "cpu") -> dict:
    """Energy and force errors of `model` over (the first `max_batches` batches of) `stream`.

    The model is put in eval mode for the pass (forces without create_graph) and its mode restored after.
    Returns the `summarize` figures plus ARRAYS.
    """
    was_training = model.training
    model.eval()
    e_pred, e_ref, f_pred, f_ref, species, s_pred, s_ref = [], [], [], [], [], [], []
    try:
        with torch.no_grad():
            for index, batch in enumerate(stream):
                if max_batches is not None and index >= max_batches:
                    break
                if K.ENERGY not in batch or K.FORCES not in batch:
                    raise ValueError(f"batch {index} of the evaluation stream has no {K.ENERGY}/{K.FORCES} "
                                     f"labels (sources: {sorted(set(getattr(batch, K.SOURCE, [])))})")
                batch = batch.to(device)
                if K.STRESS in batch:   # strain derivative: needs autograd inside no_grad
                    out = energy_forces_stress(model, batch)
                    s_pred.append(out[K.PRED_STRESS].double().cpu().numpy())
                    s_ref.append(batch[K.STRESS].reshape(-1, 3, 3).double().cpu().numpy())
                else:
                    out = model(batch, compute_forces=True)
                natoms = batch[K.NATOMS].double()
                e_pred.append((out[K.PRED_ENERGY].double() / natoms).cpu().numpy())
                e_ref.append((batch[K.ENERGY].double() / natoms).cpu().numpy())
                f_pred.append(out[K.PRED_FORCES].double().cpu().numpy())
                f_ref.append(batch[K.FORCES].double().cpu().numpy())
                species.append(batch[K.SPECIES].cpu().numpy())
    finally:
        model.train(was_training)
    if not e_ref:
        raise ValueError("the evaluation stream yielded no batch")
    arrays = {"energy_per_atom_ref": np.concatenate(e_ref), "energy_per_atom_pred": np.concatenate(e_pred),
              "forces_ref": np.concatenate(f_ref), "forces_pred": np.concatenate(f_pred),
              "species": np.concatenate(species)}
    result = summarize(arrays["energy_per_atom_pred"], arrays["energy_per_atom_ref"], arrays["forces_pred"],
                       arrays["forces_ref"], arrays["species"])
    if s_ref:
        arrays["stress_ref"], arrays["stress_pred"] = np.concatenate(s_ref), np.concatenate(s_pred)
        result[STRESS_RMSE] = MILLI * rmse(arrays["stress_pred"], arrays["stress_ref"])
    result[ARRAYS] = arrays
    return result


def without_arrays(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != ARRAYS}
