"""Periodic radius graphs (vesin) and batching into torch_geometric `Batch` objects.

A sample is a dict of numpy arrays keyed by `data_shards.keys` (one structure: SPECIES (n,),
POSITIONS (n,3), CELL (3,3), PBC (3,), optional ENERGY scalar, FORCES (n,3), and any per-atom
pretext fields such as MASK_FLAG / MASK_TARGET / NOISE_TARGET added by transforms).
"""
from __future__ import annotations

import numpy as np
import torch
import vesin
from torch_geometric.data import Batch, Data

from data_shards import keys as K
from data_shards.frame import check_extent

PER_ATOM_FLOAT = (K.POSITIONS, K.FORCES, K.MASK_TARGET, K.NOISE_TARGET)
PER_ATOM_INT = (K.SPECIES, K.MASK_FLAG)


def neighbour_list(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float):
    """Directed pairs (i, j), i != j or a periodic image, with |r_ij| < cutoff.

    Returns edge_index (2, E) int64 and shift_vectors (E, 3) float64 in Å such that
    r_ij = positions[j] - positions[i] + shift_vectors.
    """
    pbc = np.asarray(pbc, dtype=bool)
    cell = np.asarray(cell, dtype=np.float64)
    problem = check_extent(positions, cell, pbc)  # vesin dies with SIGFPE on a far-away atom
    if problem is not None:
        raise ValueError(f"cannot build a neighbour list: {problem}")
    box = cell if pbc.any() else np.zeros((3, 3))
    nl = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, shifts = nl.compute(np.asarray(positions, dtype=np.float64), box, pbc.tolist(), "ijS")
    edge_index = np.stack([i, j]).astype(np.int64)
    shift_vectors = shifts.astype(np.float64) @ box
    return edge_index, shift_vectors


def sample_to_data(sample: dict, cutoff: float, dtype: torch.dtype = torch.float32) -> Data:
    """One structure → a `Data` with its radius graph. Labels are copied when present."""
    pos = np.asarray(sample[K.POSITIONS])
    cell = np.asarray(sample[K.CELL], dtype=np.float64).reshape(3, 3)
    pbc = np.asarray(sample[K.PBC], dtype=bool).reshape(3)
    edge_index, shift_vectors = neighbour_list(pos, cell, pbc, cutoff)
    n = pos.shape[0]
    data = Data(
        edge_index=torch.from_numpy(edge_index),
        num_nodes=n,
    )
    data[K.SHIFT_VECTORS] = torch.from_numpy(shift_vectors).to(dtype)
    data[K.CELL] = torch.from_numpy(cell).to(dtype).unsqueeze(0)
    data[K.PBC] = torch.from_numpy(pbc).unsqueeze(0)
    data[K.NATOMS] = torch.tensor([n], dtype=torch.long)
    for key in PER_ATOM_FLOAT:
        if sample.get(key) is not None:
            data[key] = torch.as_tensor(np.asarray(sample[key]), dtype=dtype)
    for key in PER_ATOM_INT:
        if sample.get(key) is not None:
            data[key] = torch.as_tensor(np.asarray(sample[key]), dtype=torch.long)
    if sample.get(K.ENERGY) is not None:
        # float64: absolute DFT energies (~ -3e4 eV) need more than float32's 7 digits
        data[K.ENERGY] = torch.tensor([float(sample[K.ENERGY])], dtype=torch.float64)
    return data


def collate(datas: list[Data]) -> Batch:
    """Concatenate structures; edge_index is offset per structure and `batch` maps atoms to structures."""
    return Batch.from_data_list(datas)
