"""One labelled (or unlabelled) atomic structure, and the checks every reader applies to it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from data_shards.keys import ENERGY, FORCES, MAX_Z, STRESS

MIN_PAIR_DISTANCE = 0.1  # Å; closer pairs are treated as corrupt input
CLOSEST_PAIR_SEARCH = 1.0  # Å; neighbour-search radius of closest_pair (a cheap cell grid)
# Shards store positions as float32 (spacing 6e-8 × |x|). Coordinates up to ORIGIN_FREE Å are stored as
# given (rounding ≤ 4e-6 Å); larger ones relative to a per-frame origin (fully periodic frames: each atom
# wrapped into the cell; others: minus the centroid). A frame still spanning more than MAX_EXTENT Å (a far-
# away atom) or with a cell vector longer than that cannot keep its distances to 1e-4 Å in float32 (and
# vesin's cell list dies with SIGFPE from ~1e6 Å): it is refused before any native call.
ORIGIN_FREE = 100.0
LABEL_KEYS_FOUND = "label_keys_found"  # Frame.info entry a reader sets when a label is missing: keys it saw
MAX_EXTENT = 1000.0


def check_extent(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> str | None:
    """Why this geometry is too large to store or to build a neighbour list for, or None."""
    positions, cell, pbc = np.asarray(positions), np.asarray(cell, dtype=np.float64), np.asarray(pbc, dtype=bool)
    if not (np.isfinite(positions).all() and np.isfinite(cell).all()):
        return "positions or cell contain NaN or infinite values"
    lengths = np.linalg.norm(cell, axis=1)
    if pbc.any() and lengths[pbc].max() > MAX_EXTENT:
        return f"cell vector of {lengths[pbc].max():.6g} Å (limit {MAX_EXTENT:g} Å)"
    open_axes = ~pbc if not pbc.all() else np.zeros(3, dtype=bool)
    if len(positions) and open_axes.any():
        span = positions[:, open_axes].max(axis=0) - positions[:, open_axes].min(axis=0)
        if span.max() > MAX_EXTENT:
            far = int(np.argmax(np.abs(positions - np.median(positions, axis=0)).max(axis=1)))
            return (f"atoms span {span.max():.6g} Å (limit {MAX_EXTENT:g} Å): atom {far} at "
                    f"{np.array2string(positions[far], precision=6)} Å is far from the rest")
    return None


def recentre(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> tuple[np.ndarray, list | str | None]:
    """(positions to store, origin subtracted, "wrapped" (periodic, moved by whole lattice vectors) or None);
    ValueError when the geometry cannot be stored."""
    positions = np.asarray(positions, dtype=np.float64)
    problem = check_extent(positions, cell, pbc)
    if problem is None and np.abs(positions).max(initial=0.0) <= ORIGIN_FREE:
        return positions, None
    if problem is None and np.all(pbc):
        shift = np.floor(positions @ np.linalg.inv(cell)) @ cell   # whole lattice vectors per atom
        return positions - shift, "wrapped"
    if problem is None:
        origin = positions.mean(axis=0)
        return positions - origin, origin.tolist()
    raise ValueError(problem)


class FrameError(ValueError):
    """Bad input, located precisely: which file, which frame, which field, and why."""

    def __init__(self, source: str, frame: int | None, field_name: str, reason: str):
        self.source, self.frame, self.field, self.reason = str(source), frame, field_name, reason
        where = f"{source}" + (f", frame {frame}" if frame is not None else "")
        super().__init__(f"{where}, field '{field_name}': {reason}")

    def as_record(self) -> dict:
        return {"source": self.source, "frame": self.frame, "field": self.field, "reason": self.reason}


def closest_pair(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, below: float):
    """((i, j), distance) of the closest pair nearer than `below` Å (periodic images included), or None."""
    import vesin  # startup: vesin (+9 s: it loads torch) only for the closest-pair check; readers stay light

    box = np.asarray(cell, dtype=np.float64) if np.any(pbc) else np.zeros((3, 3))
    # search at ≥ 1 Å: vesin's cell list has (box / cutoff)³ cells, 17 ms per 12 Å box at 0.1 Å, 0.1 ms at 1 Å
    i, j, d = vesin.NeighborList(cutoff=max(below, CLOSEST_PAIR_SEARCH), full_list=False).compute(
        np.asarray(positions, dtype=np.float64), box, np.asarray(pbc, dtype=bool).tolist(), "ijd")
    if len(d) == 0 or d.min() >= below:
        return None
    k = int(np.argmin(d))
    return (int(i[k]), int(j[k])), float(d[k])


def stress_matrix(value) -> np.ndarray:
    """9 numbers (row-major 3×3) or 6 (Voigt xx yy zz yz xz xy) → (3, 3) float64; ValueError otherwise."""
    flat = np.asarray(value, dtype=np.float64).reshape(-1)
    if flat.size == 9:
        return flat.reshape(3, 3)
    if flat.size == 6:
        xx, yy, zz, yz, xz, xy = flat
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    raise ValueError(f"{flat.size} numbers (expected 9 or 6 in Voigt order)")


def read_labels(lookup, source: str, index: int, keys: tuple[str, str, str], where: str = ""):
    """(energy, forces, stress) of one frame from `lookup(key)` (None where absent), as float / (n, 3) / (3, 3)
    float64, or the FrameError of the first one that is not numeric. `keys`: the energy, forces and stress
    keys; `where` starts each message (e.g. "row id 7: ")."""
    energy_key, forces_key, stress_key = keys
    energy, forces, stress = lookup(energy_key), lookup(forces_key), lookup(stress_key)
    try:
        energy = None if energy is None else float(np.asarray(energy, dtype=np.float64).reshape(()))
    except (TypeError, ValueError):
        return FrameError(source, index, ENERGY, f"{where}value {energy!r} under key '{energy_key}' is not "
                                                   "a single number")
    try:
        forces = None if forces is None else np.asarray(forces, dtype=np.float64)
    except (TypeError, ValueError):
        return FrameError(source, index, FORCES, f"{where}'{forces_key}' is not numeric")
    try:
        stress = None if stress is None else stress_matrix(stress)
    except (TypeError, ValueError) as e:
        return FrameError(source, index, STRESS, f"{where}value under key '{stress_key}': {e}")
    return energy, forces, stress


@dataclass
class Frame:
    """Arrays in Å / eV / eV/Å. `energy` and `forces` may be None for position-only corpora."""

    species: np.ndarray                 # (n,) int64 atomic numbers
    positions: np.ndarray               # (n, 3) float64 Å
    cell: np.ndarray                    # (3, 3) float64 Å, zeros when not periodic
    pbc: np.ndarray                     # (3,) bool
    energy: float | None = None         # eV
    forces: np.ndarray | None = None    # (n, 3) float64 eV/Å
    source: str = ""                    # file or folder the frame was read from
    index: int = 0                      # frame index inside `source`
    info: dict = field(default_factory=dict)  # small json-able extras (e.g. group, seed)
    stress: np.ndarray | None = None    # (3, 3) float64 eV/Å³ (ASE convention), optional label; last: positional use

    @property
    def natoms(self) -> int:
        return int(self.species.shape[0])

    def validate(self, require_labels: bool = True) -> Frame:
        """Raise FrameError naming source, frame and field on the first problem found."""
        src, i = self.source, self.index

        def bad(field_name: str, reason: str) -> FrameError:
            return FrameError(src, i, field_name, reason)

        n = self.species.shape[0] if self.species.ndim == 1 else -1
        if n <= 0:
            raise bad("species", "frame has no atoms" if n == 0 else f"shape {self.species.shape}, expected (n,)")
        if not np.issubdtype(self.species.dtype, np.integer):
            raise bad("species", f"dtype {self.species.dtype} is not integer")
        if self.species.min() <= 0 or self.species.max() > MAX_Z:
            z = int(self.species.min() if self.species.min() <= 0 else self.species.max())
            raise bad("species", f"unknown element Z={z} (valid 1..{MAX_Z})")
        if self.positions.shape != (n, 3):
            raise bad("positions", f"shape {self.positions.shape}, expected ({n}, 3)")
        if not np.isfinite(self.positions).all():
            raise bad("positions", "contains NaN or infinite values")
        if self.cell.shape != (3, 3) or not np.isfinite(self.cell).all():
            raise bad("cell", f"shape {self.cell.shape} or non-finite values; expected finite (3, 3)")
        if self.pbc.shape != (3,):
            raise bad("pbc", f"shape {self.pbc.shape}, expected (3,)")
        if self.pbc.any() and abs(np.linalg.det(self.cell)) < 1e-6:
            raise bad("cell", "periodic frame with a singular (zero-volume) cell")
        try:  # before any native call: vesin dies with SIGFPE on a far-away atom
            positions, origin = recentre(self.positions, self.cell, self.pbc)
        except ValueError as e:
            raise bad("cell" if str(e).startswith("cell") else "positions", str(e)) from None
        if origin is not None:
            return dataclasses.replace(self, positions=positions,
                                       info={**self.info, "origin": origin})._validate_rest(require_labels)
        return self._validate_rest(require_labels)

    def _validate_rest(self, require_labels: bool) -> Frame:
        """Checks after the geometry is known to be storable (pairs, labels)."""
        src, i, n = self.source, self.index, self.natoms

        def bad(field_name: str, reason: str) -> FrameError:
            return FrameError(src, i, field_name, reason)

        close = closest_pair(self.positions, self.cell, self.pbc, MIN_PAIR_DISTANCE)
        if close is not None:
            (a, b), distance = close
            raise bad("positions", f"atoms {a} and {b} are {distance:.3g} Å apart "
                                   f"(< {MIN_PAIR_DISTANCE} Å: overlapping or duplicated atoms)")
        found = self.info.get(LABEL_KEYS_FOUND)
        found = f" (keys in this frame: {', '.join(found) or 'none'})" if found is not None else ""
        if require_labels and self.energy is None:
            raise bad("energy", "missing" + found)
        if self.energy is not None and not np.isfinite(self.energy):
            raise bad("energy", f"not finite ({self.energy})")
        if self.forces is None and n == 1 and not self.pbc.any() and self.energy is not None:
            # an isolated atom (E0 reference files such as isolated_atoms.xyz): zero force by symmetry
            return dataclasses.replace(self, forces=np.zeros((1, 3), dtype=np.float64))._validate_rest(require_labels)
        if require_labels and self.forces is None:
            raise bad("forces", "missing" + found)
        if self.forces is not None:
            if self.forces.shape != (n, 3):
                raise bad("forces", f"shape {self.forces.shape}, expected ({n}, 3)")
            if not np.isfinite(self.forces).all():
                raise bad("forces", "contains NaN or infinite values")
        if self.stress is not None and (self.stress.shape != (3, 3) or not np.isfinite(self.stress).all()):
            raise bad("stress", f"shape {self.stress.shape} or non-finite values; expected finite (3, 3) eV/Å³")
        return self
