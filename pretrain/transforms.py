"""Pretext-task sample transforms: `transform(sample: dict, epoch: int) -> dict` on numpy samples.

They run in the loader before the radius graph is built (masking deletes atoms). Randomness comes from
(seed, epoch, sample key, transform), so a restarted run draws the same masks and noise for an epoch.
Labels (ENERGY, FORCES) are dropped from the output: they do not describe the altered structure.
"""
from __future__ import annotations

import hashlib

import numpy as np

from data_shards import keys as K
from data_shards.frame import FrameError

PER_ATOM_FIELDS = (K.SPECIES, K.POSITIONS, K.FORCES, K.MASK_FLAG, K.MASK_TARGET, K.NOISE_TARGET)
LABEL_FIELDS = (K.ENERGY, K.FORCES)
WATER_GROUPINGS = ("ohh", "nearest_oxygen")
H_MASK_TARGETS = ("nearest", "farthest")
OXYGEN, HYDROGEN = 8, 1


def sample_rng(seed: int, epoch: int, sample: dict, salt: str) -> np.random.Generator:
    """Generator seeded by (seed, epoch, sample key, salt); the key falls back to a content hash."""
    key = sample.get(K.SAMPLE_KEY)
    if key is None:
        blob = np.ascontiguousarray(sample[K.SPECIES]).tobytes() + np.ascontiguousarray(sample[K.POSITIONS]).tobytes()
        key = hashlib.sha256(blob).hexdigest()
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return np.random.default_rng([seed, epoch, int.from_bytes(digest[:8], "little")])


def _where(sample: dict) -> tuple[str, int | None]:
    source = sample.get(K.SOURCE) or f"sample {sample.get(K.SAMPLE_KEY, '?')}"
    return str(source), sample.get(K.FRAME_INDEX)


def minimum_image(displacement: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """Shortest periodic image of displacements (n, 3), rounding fractional coordinates (any cell).

    Exact for displacements shorter than half the smallest cell height, which covers bonded atoms.
    """
    pbc = np.asarray(pbc, dtype=bool)
    if not pbc.any():
        return displacement
    cell = np.asarray(cell, dtype=np.float64)
    frac = displacement @ np.linalg.inv(cell)
    frac[:, pbc] -= np.round(frac[:, pbc])
    return frac @ cell


def wrap_positions(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """Positions wrapped into the cell along its periodic directions."""
    pbc = np.asarray(pbc, dtype=bool)
    if not pbc.any():
        return positions
    cell = np.asarray(cell, dtype=np.float64)
    frac = positions @ np.linalg.inv(cell)
    frac[:, pbc] %= 1.0
    return frac @ cell


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def _keep_atoms(sample: dict, keep: np.ndarray) -> dict:
    out = {name: value for name, value in sample.items() if name not in LABEL_FIELDS}
    for name in PER_ATOM_FIELDS:
        if out.get(name) is not None:
            out[name] = np.asarray(out[name])[keep]
    return out


class WaterMasking:
    """Masked-atom pretext task for water (PAPER.md): delete one H in floor(N_mol·ratio) molecules.

    Flagged atoms (MASK_FLAG 1) are the surviving O and H of each picked molecule; MASK_TARGET is the unit
    vector from each of them to its deleted H (minimum image). `grouping="ohh"` requires molecules stored
    as O,H,H; "nearest_oxygen" assigns every H to its nearest O (for files listing all O first) and
    requires exactly two H per O.
    """

    def __init__(self, ratio: float = 0.5, seed: int = 0, grouping: str = "ohh"):
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"mask ratio must be in (0, 1], got {ratio}")
        if grouping not in WATER_GROUPINGS:
            raise ValueError(f"grouping {grouping!r} is not one of {list(WATER_GROUPINGS)}")
        self.ratio, self.seed, self.grouping = float(ratio), int(seed), grouping

    def molecules(self, sample: dict) -> np.ndarray:
        """(N_mol, 3) atom indices O, H, H of each molecule; FrameError when the frame is not water."""
        species = np.asarray(sample[K.SPECIES])
        source, frame = _where(sample)
        if not (species == HYDROGEN).any():
            raise FrameError(source, frame, K.SPECIES, "no H atoms: water masking deletes H, this data set has "
                             "none (use a denoising objective or a masking for its elements)")
        if self.grouping == "ohh":
            n = len(species)
            ok = n % 3 == 0 and (species[0::3] == OXYGEN).all() and (species[1::3] == HYDROGEN).all() \
                and (species[2::3] == HYDROGEN).all()
            if not ok:
                raise FrameError(source, frame, K.SPECIES, "water masking needs molecules stored as O,H,H "
                                 f"(got {n} atoms starting {species[:6].tolist()}); "
                                 "use grouping='nearest_oxygen' for other orders")
            return np.arange(n).reshape(-1, 3)
        return self._group_by_nearest_oxygen(sample, species, source, frame)

    @staticmethod
    def _group_by_nearest_oxygen(sample, species, source, frame) -> np.ndarray:
        oxygens, hydrogens = np.flatnonzero(species == OXYGEN), np.flatnonzero(species == HYDROGEN)
        if len(oxygens) + len(hydrogens) != len(species) or len(hydrogens) != 2 * len(oxygens):
            raise FrameError(source, frame, K.SPECIES, f"not pure water: {len(oxygens)} O, {len(hydrogens)} H, "
                             f"{len(species) - len(oxygens) - len(hydrogens)} other atoms")
        pos = np.asarray(sample[K.POSITIONS], dtype=np.float64)
        diff: np.ndarray = (pos[hydrogens][:, None, :] - pos[oxygens][None, :, :]).reshape(-1, 3)
        diff = minimum_image(diff, sample[K.CELL], sample[K.PBC]).reshape(len(hydrogens), len(oxygens), 3)
        owner = np.argmin((diff**2).sum(-1), axis=1)
        counts = np.bincount(owner, minlength=len(oxygens))
        if (counts != 2).any():
            bad = int(np.flatnonzero(counts != 2)[0])
            raise FrameError(source, frame, K.POSITIONS, f"O atom {oxygens[bad]} has {counts[bad]} nearest H "
                             "(expected 2): molecules cannot be identified")
        order = np.argsort(owner, kind="stable")
        return np.column_stack([oxygens, hydrogens[order].reshape(-1, 2)])

    def __call__(self, sample: dict, epoch: int) -> dict:
        molecules = self.molecules(sample)
        rng = sample_rng(self.seed, epoch, sample, "water_masking")
        n_sel = int(np.floor(len(molecules) * self.ratio))
        picked = molecules[rng.choice(len(molecules), size=n_sel, replace=False)]
        which = rng.integers(0, 2, size=n_sel)
        deleted = picked[np.arange(n_sel), 1 + which]
        survivors = np.concatenate([picked[:, 0], picked[np.arange(n_sel), 2 - which]])
        owner_deleted = np.concatenate([deleted, deleted])

        pos = np.asarray(sample[K.POSITIONS], dtype=np.float64)
        n = len(pos)
        target = np.zeros((n, 3))
        target[survivors] = _unit(minimum_image(pos[owner_deleted] - pos[survivors], sample[K.CELL], sample[K.PBC]))
        flag = np.zeros(n, dtype=np.int64)
        flag[survivors] = 1
        keep = np.ones(n, dtype=bool)
        keep[deleted] = False
        out = _keep_atoms({**sample, K.MASK_FLAG: flag, K.MASK_TARGET: target}, keep)
        return out


class HydrogenMasking:
    """Masking for general molecules (rMD17 setting): each H is deleted with probability `p`.

    `target="nearest"` (documented variant, default): every remaining atom with a deleted H within `radius`
    Å is flagged, its target the unit vector from it to the *nearest* deleted H (minimum image).
    `target="farthest"` (the reference code): every remaining atom is flagged, its target the unit vector
    from the *farthest* deleted H to the atom; `radius` is not used. At least one H is deleted per frame.
    """

    def __init__(self, p: float = 0.5, seed: int = 0, radius: float = 5.0, target: str = "nearest"):
        if not 0.0 < p <= 1.0:
            raise ValueError(f"H deletion probability must be in (0, 1], got {p}")
        if not radius > 0:
            raise ValueError(f"radius must be > 0 Å, got {radius}")
        if target not in H_MASK_TARGETS:
            raise ValueError(f"hydrogen masking target {target!r} is not one of {list(H_MASK_TARGETS)}")
        self.p, self.seed, self.radius, self.target = float(p), int(seed), float(radius), target

    def __call__(self, sample: dict, epoch: int) -> dict:
        species = np.asarray(sample[K.SPECIES])
        hydrogens = np.flatnonzero(species == HYDROGEN)
        if len(hydrogens) == 0:
            source, frame = _where(sample)
            raise FrameError(source, frame, K.SPECIES, "no H atoms: hydrogen masking needs at least one H")
        rng = sample_rng(self.seed, epoch, sample, "hydrogen_masking")
        deleted = hydrogens[rng.random(len(hydrogens)) < self.p]
        if len(deleted) == 0:
            deleted = rng.choice(hydrogens, size=1)
        keep = np.ones(len(species), dtype=bool)
        keep[deleted] = False
        remaining = np.flatnonzero(keep)

        pos = np.asarray(sample[K.POSITIONS], dtype=np.float64)
        diff: np.ndarray = (pos[deleted][None, :, :] - pos[remaining][:, None, :]).reshape(-1, 3)
        diff = minimum_image(diff, sample[K.CELL], sample[K.PBC]).reshape(len(remaining), len(deleted), 3)
        dist = np.linalg.norm(diff, axis=-1)
        rows = np.arange(len(remaining))
        if self.target == "nearest":
            chosen = np.argmin(dist, axis=1)
            flagged = dist[rows, chosen] < self.radius
            vectors = diff[rows, chosen]
        else:
            chosen = np.argmax(dist, axis=1)
            flagged = np.ones(len(remaining), dtype=bool)
            vectors = -diff[rows, chosen]  # from the deleted H to the atom
        target = np.zeros((len(species), 3))
        flag = np.zeros(len(species), dtype=np.int64)
        target[remaining[flagged]] = _unit(vectors[flagged])
        flag[remaining[flagged]] = 1
        return _keep_atoms({**sample, K.MASK_FLAG: flag, K.MASK_TARGET: target}, keep)


class Denoising:
    """Gaussian displacement ξ ~ N(0, σ²) on every coordinate; NOISE_TARGET = ξ; positions re-wrapped."""

    def __init__(self, sigma: float = 0.2, seed: int = 0):
        if not sigma > 0:
            raise ValueError(f"noise sigma must be > 0 Å, got {sigma}")
        self.sigma, self.seed = float(sigma), int(seed)

    def __call__(self, sample: dict, epoch: int) -> dict:
        pos = np.asarray(sample[K.POSITIONS], dtype=np.float64)
        noise = sample_rng(self.seed, epoch, sample, "denoising").normal(0.0, self.sigma, size=pos.shape)
        out = {name: value for name, value in sample.items() if name not in LABEL_FIELDS}
        out[K.POSITIONS] = wrap_positions(pos + noise, sample[K.CELL], sample[K.PBC])
        out[K.NOISE_TARGET] = noise
        return out


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: list):
        self.transforms = list(transforms)

    def __call__(self, sample: dict, epoch: int) -> dict:
        for transform in self.transforms:
            sample = transform(sample, epoch)
        return sample


class MaskDenoise(Compose):
    """Mask first (targets from the clean geometry), then add noise to the remaining atoms."""

    def __init__(self, ratio: float = 0.5, sigma: float = 0.2, seed: int = 0, grouping: str = "ohh"):
        super().__init__([WaterMasking(ratio, seed, grouping), Denoising(sigma, seed)])
