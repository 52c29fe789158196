"""Small water systems as sample dicts (keyed by `data_shards.keys`) for model, transform and loss tests.

Molecules are stored in O,H,H order. Geometry: O-H 0.9572 Å, H-O-H 104.52° (TIP3P), random orientations.
"""
from __future__ import annotations

import hashlib

import ase
import numpy as np
import torch
from ase.calculators.singlepoint import SinglePointCalculator

from data_shards import keys as K
from data_shards.graph import collate, sample_to_data
from data_shards.tip3p import random_rotation

OH_BOND = 0.9572      # Å
HOH_ANGLE = np.deg2rad(104.52)
WATER_SPECIES = (8, 1, 1)
LIQUID_VOLUME_PER_MOLECULE = 29.9  # Å^3, water at 1 g/cm^3


def water_molecule(oxygen: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """(3, 3) positions O, H, H with O at `oxygen`."""
    half = HOH_ANGLE / 2
    local = np.array([
        [0.0, 0.0, 0.0],
        [OH_BOND * np.sin(half), OH_BOND * np.cos(half), 0.0],
        [-OH_BOND * np.sin(half), OH_BOND * np.cos(half), 0.0],
    ])
    return np.asarray(oxygen, dtype=np.float64) + local @ rotation.T


def make_sample(species, positions, cell=None, pbc=(False, False, False), source="test", frame_index=0,
                energy=None, forces=None) -> dict:
    species = np.asarray(species, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64)
    key = hashlib.sha256(species.tobytes() + positions.tobytes() + cell.tobytes()).hexdigest()[:16]
    sample = {
        K.SPECIES: species, K.POSITIONS: positions, K.CELL: cell, K.PBC: np.asarray(pbc, dtype=bool),
        K.SAMPLE_KEY: key, K.SOURCE: source, K.FRAME_INDEX: frame_index,
    }
    if energy is not None:
        sample[K.ENERGY] = float(energy)
    if forces is not None:
        sample[K.FORCES] = np.asarray(forces, dtype=np.float64)
    return sample


def water_dimer(seed: int = 0) -> dict:
    """Two molecules, O-O 2.9 Å, no cell."""
    rng = np.random.default_rng(seed)
    first = water_molecule([0.0, 0.0, 0.0], random_rotation(rng))
    second = water_molecule([2.9, 0.1, -0.2], random_rotation(rng))
    return make_sample(WATER_SPECIES * 2, np.concatenate([first, second]), source="water_dimer")


def water_box(n_molecules: int = 32, seed: int = 0, box_length: float | None = None,
              labelled: bool = False, min_distance: float = 1.3) -> dict:
    """A periodic cubic box at liquid density: molecules on a jittered grid, random orientations.

    Atoms of different molecules stay at least `min_distance` Å apart (minimum image).
    With `labelled`, ENERGY and FORCES hold random numbers of realistic size (for loss/timing only).
    """
    rng = np.random.default_rng(seed)
    length = box_length or (n_molecules * LIQUID_VOLUME_PER_MOLECULE) ** (1 / 3)
    per_side = int(np.ceil(n_molecules ** (1 / 3) - 1e-9))
    grid = np.stack(np.meshgrid(*[np.arange(per_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    sites = grid[rng.choice(len(grid), n_molecules, replace=False)] * (length / per_side)
    molecules: list[np.ndarray] = []
    for site in sites:
        for _ in range(200):
            mol = water_molecule(site + rng.uniform(-0.2, 0.2, 3), random_rotation(rng))
            if not molecules or _min_image_distance(mol, np.concatenate(molecules), length) > min_distance:
                break
        else:
            raise RuntimeError(f"could not place {n_molecules} molecules in a {length:.2f} Å box")
        molecules.append(mol)
    positions = np.concatenate(molecules) % length
    n = len(positions)
    energy = forces = None
    if labelled:
        energy = -470.0 * n_molecules + rng.normal()
        forces = rng.normal(scale=0.8, size=(n, 3))
    return make_sample(WATER_SPECIES * n_molecules, positions, np.eye(3) * length, (True, True, True),
                       source=f"water_box_{n_molecules}_seed{seed}", energy=energy, forces=forces)


def _min_image_distance(a: np.ndarray, b: np.ndarray, length: float) -> float:
    diff = a[:, None, :] - b[None, :, :]
    diff -= length * np.round(diff / length)
    return float(np.sqrt((diff**2).sum(-1)).min())


def to_batch(samples: list[dict], cutoff: float, dtype: torch.dtype = torch.float64):
    """Samples → a torch_geometric Batch with radius graphs (what the streaming loader produces)."""
    return collate([sample_to_data(s, cutoff, dtype) for s in samples])


def water_atoms(n_frames: int, n_waters: int = 4, box: float = 6.5, seed: int = 0) -> list[ase.Atoms]:
    """Periodic water-like boxes with random labels (unique positions, so unique sample keys)."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(n_waters ** (1 / 3)))
    grid = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)][:n_waters])
    frames = []
    for _ in range(n_frames):
        oxygen = (grid + 0.5) * box / side + rng.normal(0, 0.1, (n_waters, 3))
        directions = rng.normal(size=(n_waters, 2, 3))
        hydrogens = oxygen[:, None] + 0.96 * directions / np.linalg.norm(directions, axis=-1, keepdims=True)
        positions = np.concatenate([oxygen[:, None], hydrogens], axis=1).reshape(-1, 3)
        atoms = ase.Atoms("OHH" * n_waters, positions=positions, cell=np.eye(3) * box, pbc=True)
        atoms.calc = SinglePointCalculator(atoms, energy=float(-14.0 * n_waters + rng.normal(0, 0.1)),
                                           forces=rng.normal(0, 0.8, (3 * n_waters, 3)))
        frames.append(atoms)
    return frames
