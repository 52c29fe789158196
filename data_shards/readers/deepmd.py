"""DeePMD npy reader: a system folder (`type.raw`, `type_map.raw`, `set.*/{coord,box,energy,force}.npy`)
or a root holding many systems (folders with `type.raw`, found recursively, in sorted path order).

Arrays are opened with mmap (allow_pickle=False), so only the frames read are paged in. Frames run over
the sets in sorted order; `Frame.index` counts across the sets of one system, and `Frame.source` is the
system folder. A problem that spoils a whole system or set (type.raw length, unknown type_map symbol,
unreadable array, arrays with different frame counts) is yielded as one FrameError per affected frame,
so the number of items always equals `count_frames`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from data_shards import keys as K
from data_shards.frame import Frame, FrameError

TYPE_FILE = "type.raw"
TYPE_MAP_FILE = "type_map.raw"
NOPBC_FILE = "nopbc"
SET_GLOB = "set.*"
COORD, BOX, ENERGY, FORCE = "coord.npy", "box.npy", "energy.npy", "force.npy"
FIELD_OF_FILE = {COORD: K.POSITIONS, BOX: K.CELL, ENERGY: K.ENERGY, FORCE: K.FORCES}


def detect(path: Path) -> bool:
    return path.is_dir() and bool(find_systems(path))


def find_systems(path: Path) -> list[Path]:
    """`path` itself when it holds type.raw, else every folder below it that does, sorted."""
    path = Path(path)
    if (path / TYPE_FILE).is_file():
        return [path]
    return sorted((p.parent for p in path.rglob(TYPE_FILE) if p.is_file()), key=lambda p: p.as_posix())


def _sets(system: Path) -> list[Path]:
    return sorted(p for p in system.glob(SET_GLOB) if p.is_dir())


def _set_length(set_dir: Path) -> int:
    coord = set_dir / COORD
    if not coord.is_file():
        raise FrameError(str(set_dir.parent), None, K.POSITIONS, f"{coord} is missing")
    try:
        return int(np.load(coord, mmap_mode="r", allow_pickle=False).shape[0])
    except (ValueError, OSError, IndexError) as e:
        raise FrameError(str(set_dir.parent), None, K.POSITIONS, f"{coord} is not a readable npy array: {e}") from e


def _system_lengths(system: Path) -> list[int]:
    return [_set_length(s) for s in _sets(system)]


def missing_type_raw(path: Path) -> str | None:
    """The problem of a folder that looks like a DeePMD system (set.*/coord.npy) but has no type.raw."""
    path = Path(path)
    if path.is_dir() and not find_systems(path):
        sets = [p for p in path.rglob(COORD) if p.parent.name.startswith("set.")]
        if sets:
            return (f"{sets[0].parent.parent}: DeePMD system without {TYPE_FILE} ({sets[0].parent.name}/{COORD} is "
                    f"there, but {TYPE_FILE}, the atom types, is missing)")
    return None


def count_frames(path: Path) -> int:
    """Sum of coord.npy leading dimensions over all sets of all systems (reads npy headers only)."""
    problem = missing_type_raw(path)
    if problem:
        raise ValueError(problem)
    return sum(sum(_system_lengths(system)) for system in find_systems(path))


@dataclass
class _System:
    path: Path
    species: np.ndarray | None = None   # (n,) Z
    periodic: bool = True
    problem: tuple[str, str] | None = None  # (field, reason) spoiling every frame


def _load_system(system: Path) -> _System:
    out = _System(system, periodic=not (system / NOPBC_FILE).exists())
    try:
        types = np.array([int(t) for t in (system / TYPE_FILE).read_text().split()], dtype=np.int64)
    except ValueError as e:
        out.problem = (K.SPECIES, f"{system / TYPE_FILE} holds a non-integer type ({e})")
        return out
    map_file = system / TYPE_MAP_FILE
    if not map_file.is_file():
        out.problem = (K.SPECIES, f"{map_file} is missing; element of each type unknown")
        return out
    symbols = map_file.read_text().split()
    unknown = [s for s in symbols if s not in K.CHEMICAL_SYMBOLS[1:]]
    if unknown:
        out.problem = (K.SPECIES, f"{map_file} names unknown element(s) {unknown}")
        return out
    if types.size and (types.min() < 0 or types.max() >= len(symbols)):
        bad = int(types.min() if types.min() < 0 else types.max())
        out.problem = (K.SPECIES, f"{system / TYPE_FILE} uses type {bad}; {map_file} defines 0..{len(symbols) - 1}")
        return out
    z_of_type = np.array([K.CHEMICAL_SYMBOLS.index(s) for s in symbols], dtype=np.int64)
    out.species = z_of_type[types] if types.size else np.zeros(0, dtype=np.int64)
    return out


def _open_set(set_dir: Path, system: _System, nframes: int) -> tuple[dict, tuple[str, str] | None]:
    """mmap arrays of one set, or the (field, reason) that spoils the whole set."""
    arrays = {}
    for name in (COORD, BOX, ENERGY, FORCE):
        file = set_dir / name
        if not file.is_file():
            continue
        try:
            arrays[name] = np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            return arrays, (FIELD_OF_FILE[name], f"{file} is not a readable npy array: {e}")
        if arrays[name].ndim == 0 or arrays[name].shape[0] != nframes:
            return arrays, (FIELD_OF_FILE[name], f"{file} has shape {arrays[name].shape}; "
                                                 f"{set_dir / COORD} holds {nframes} frames")
    if ENERGY in arrays and int(np.prod(arrays[ENERGY].shape[1:])) != 1:
        return arrays, (K.ENERGY, f"{set_dir / ENERGY} has shape {arrays[ENERGY].shape}; expected one value per frame")
    n = system.species.shape[0]
    coord_width = int(np.prod(arrays[COORD].shape[1:]))
    if coord_width != 3 * n:
        return arrays, (K.SPECIES, f"{system.path / TYPE_FILE} lists {n} atoms but {set_dir / COORD} holds "
                                   f"{coord_width} values per frame ({coord_width / 3:g} atoms)")
    if system.periodic and BOX not in arrays:
        return arrays, (K.CELL, f"{set_dir / BOX} is missing (add a '{NOPBC_FILE}' file for non-periodic data)")
    return arrays, None


def _frame(arrays: dict, row: int, system: _System, index: int, set_name: str) -> Frame:
    n = system.species.shape[0]
    positions = np.asarray(arrays[COORD][row], dtype=np.float64).reshape(n, 3)
    if system.periodic:
        cell = np.asarray(arrays[BOX][row], dtype=np.float64)
        cell = cell.reshape(3, 3) if cell.size == 9 else cell  # a wrong size reaches validate() as is
        pbc = np.ones(3, dtype=bool)
    else:
        cell, pbc = np.zeros((3, 3)), np.zeros(3, dtype=bool)
    energy = None
    if ENERGY in arrays:
        energy = float(np.asarray(arrays[ENERGY][row], dtype=np.float64).reshape(-1)[0])
    forces = None
    if FORCE in arrays:
        f = np.asarray(arrays[FORCE][row], dtype=np.float64).reshape(-1)
        forces = f.reshape(-1, 3) if f.size % 3 == 0 else f
    return Frame(species=system.species.copy(), positions=positions, cell=cell, pbc=pbc, energy=energy,
                 forces=forces, source=str(system.path), index=index, info={"set": set_name})


def _iter_system(system_dir: Path, lengths: list[int], start: int, stop: int) -> Iterator[Frame | FrameError]:
    """Frames [start, stop) of one system, indices local to the system."""
    system = _load_system(system_dir)
    source = str(system_dir)
    offset = 0
    for set_dir, nframes in zip(_sets(system_dir), lengths):
        lo, hi = max(start, offset), min(stop, offset + nframes)
        if lo < hi:
            problem = system.problem
            arrays = {}
            if problem is None:
                arrays, problem = _open_set(set_dir, system, nframes)
            for index in range(lo, hi):
                if problem is not None:
                    yield FrameError(source, index, *problem)
                else:
                    yield _frame(arrays, index - offset, system, index, set_dir.name)
        offset += nframes


def iter_frames(path: Path, start: int = 0, stop: int | None = None) -> Iterator[Frame | FrameError]:
    """Frames [start, stop) in global order over the sorted systems and their sorted sets."""
    offset = 0
    for system in find_systems(path):
        if stop is not None and offset >= stop:
            return
        lengths = _system_lengths(system)
        total = sum(lengths)
        lo = max(start - offset, 0)
        hi = total if stop is None else min(stop - offset, total)
        if lo < hi:
            yield from _iter_system(system, lengths, lo, hi)
        offset += total
