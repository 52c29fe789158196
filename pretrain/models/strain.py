"""Stress of an energy-centric model by the strain derivative (any model of the maskpot contract).

A symmetric strain ε (one 3×3 per structure, zero) deforms positions and cell: r → r (I + ε), and so every
periodic shift vector (integer combination of the cell rows) → shift (I + ε). Autograd of E(ε) at ε = 0 gives
    virial W = −∂E/∂ε,   stress σ = (1/V) ∂E/∂ε = −W/V   (eV/Å³, ASE's sign: negative under compression)
and forces −∂E/∂r from the same backward pass. ε is symmetrised before use, so ∂E/∂ε is symmetric and
rotations of the cell do not enter. Force-centric models (forces from a decoder) have no energy whose
strain derivative is consistent with their forces: asking them for stress is a ValueError.
"""
from __future__ import annotations

import torch

from data_shards import keys as K


def check_energy_centric(model: torch.nn.Module) -> None:
    if getattr(model, "force_centric", False):
        raise ValueError(f"stress needs an energy-centric model (forces = −∂E/∂r, e.g. egnn, mace); "
                         f"{type(model).__name__} is force-centric: its forces do not derive from its energy")


def cell_volumes(batch) -> torch.Tensor:
    """(B,) |det cell| in Å³; ValueError naming the structures without a 3D cell."""
    cell = batch[K.CELL].reshape(-1, 3, 3).double()
    volume = torch.linalg.det(cell).abs()
    flat = (volume <= 1e-9).nonzero().flatten().tolist()
    if flat:
        raise ValueError(f"stress needs a periodic cell with a volume; structure(s) {flat} of the batch have "
                         f"a zero or flat cell")
    return volume


def energy_forces_stress(model: torch.nn.Module, batch, create_graph: bool = False) -> dict[str, torch.Tensor]:
    """{PRED_ENERGY (B,), PRED_FORCES (N, 3), PRED_STRESS (B, 3, 3) eV/Å³, PRED_VIRIAL (B, 3, 3) eV}.

    `create_graph=True` keeps the graph for a stress (or force) loss. The batch is not changed.
    """
    check_energy_centric(model)
    volume = cell_volumes(batch)
    num_graphs = int(batch.num_graphs) if K.BATCH in batch else 1
    pos = batch[K.POSITIONS]
    graph_index = batch[K.BATCH] if K.BATCH in batch else torch.zeros(len(pos), dtype=torch.long, device=pos.device)
    src = batch[K.EDGE_INDEX][0]
    with torch.enable_grad():
        pos = pos.detach().requires_grad_(True)
        strain = torch.zeros(num_graphs, 3, 3, dtype=pos.dtype, device=pos.device, requires_grad=True)
        deform = torch.eye(3, dtype=pos.dtype, device=pos.device) + 0.5 * (strain + strain.transpose(1, 2))
        strained = batch.clone()
        strained[K.POSITIONS] = torch.einsum("ni,nij->nj", pos, deform.index_select(0, graph_index))
        shifts = batch[K.SHIFT_VECTORS].to(pos.dtype)
        strained[K.SHIFT_VECTORS] = torch.einsum("ei,eij->ej", shifts, deform.index_select(0, graph_index[src]))
        cell = batch[K.CELL].reshape(-1, 3, 3).to(pos.dtype)
        strained[K.CELL] = torch.bmm(cell, deform)
        energy = model(strained, compute_forces=False)[K.PRED_ENERGY]
        d_pos, d_strain = torch.autograd.grad(energy.sum(), (pos, strain), create_graph=create_graph)
    stress = d_strain.double() / volume[:, None, None]
    return {K.PRED_ENERGY: energy if create_graph else energy.detach(), K.PRED_FORCES: -d_pos,
            K.PRED_STRESS: stress, K.PRED_VIRIAL: -d_strain.double()}
