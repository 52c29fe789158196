"""Extended XYZ reader: scans natoms header lines to count and seek, parses one frame at a time with ase.

Labels are looked up under `energy_key` / `forces_key` / `stress_key` in the frame's info/arrays and, as ase
moves the standard names there, in its calculator results (so the defaults find what ASE finds; a MACE file
with `REF_energy`/`REF_forces` needs `energy_key="REF_energy"`, `forces_key="REF_forces"`). Stress may be
given as 9 numbers or 6 (Voigt xx yy zz yz xz xy), eV/Å³. `label_fields(path)` lists what a file holds.
A frame whose text cannot be parsed (bad natoms line, truncated atom block, unknown element symbol, malformed
columns) is yielded as a FrameError; after a bad
natoms line the frame boundaries are lost, so that error is the last item and counts as one frame.
"""
from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Iterator

import numpy as np
from ase.io.extxyz import read_xyz

from data_shards import keys as K
from data_shards.frame import Frame, FrameError, stress_matrix

SUFFIXES = (".extxyz", ".xyz")
DEFAULT_ENERGY_KEY = K.ENERGY
DEFAULT_FORCES_KEY = K.FORCES
DEFAULT_STRESS_KEY = K.STRESS
_INFO_TYPES = (bool, int, float, str, np.bool_, np.integer, np.floating)


def detect(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SUFFIXES


def _blocks(path: Path, start: int, stop: int | None, keep: bool) -> Iterator[tuple[int, bytes | str | None]]:
    """(frame index, block) for each frame; block is the frame's raw bytes for frames in [start, stop)
    when `keep`, None for frames skipped, or an error string for a frame whose layout is broken."""
    with open(path, "rb") as fh:
        lines = iter(fh)
        index = 0
        for header in lines:
            if stop is not None and index >= stop:
                return
            if not header.strip():
                continue  # blank separator lines between frames or at the end
            try:
                natoms = int(header)
                if natoms < 0:
                    raise ValueError
            except ValueError:
                yield index, f"natoms line {header[:60]!r} is not a non-negative integer; frames after it are lost"
                return
            wanted = keep and index >= start
            body = list(itertools.islice(lines, natoms + 1)) if wanted else None
            if body is None:
                got = sum(1 for _ in itertools.islice(lines, natoms + 1))
            else:
                got = len(body)
            if got < natoms + 1:
                yield index, f"file ends after {max(got - 1, 0)} of {natoms} atom lines"
                return
            yield index, (header + b"".join(body)) if wanted else None
            index += 1


def count_frames(path: Path) -> int:
    """Frames in the file, counting a trailing broken frame as one (it is yielded as a FrameError)."""
    n = 0
    for n, _ in enumerate(_blocks(Path(path), 0, None, keep=False), start=1):  # noqa: B007 - n: the count after the loop
        pass
    return n


def _lookup(atoms, key: str):
    for table in (atoms.info, atoms.arrays):
        if key in table:
            return table[key]
    calc = atoms.calc
    if calc is not None and key in getattr(calc, "results", {}):
        return calc.results[key]
    return None


def label_fields(path, frames: int = 20) -> list[str]:
    """Names of the per-frame (info) and per-atom (arrays) fields and calculator results in the first
    `frames` parseable frames: what a user can pass as --energy-key / --forces-key / --stress-key."""
    found: set[str] = set()
    for _index, block in _blocks(Path(path), 0, frames, keep=True):
        if not isinstance(block, bytes):
            break
        try:
            atoms = next(read_xyz(io.StringIO(block.decode("utf-8")), 0))
        except (ValueError, KeyError, IndexError, UnicodeDecodeError):  # a broken frame names nothing
            continue
        found |= set(atoms.info) | (set(atoms.arrays) - {"numbers", "positions"})
        if atoms.calc is not None:
            found |= set(getattr(atoms.calc, "results", {}))
    return sorted(found)


def _to_frame(atoms, source: str, index: int, energy_key: str, forces_key: str,
              stress_key: str = DEFAULT_STRESS_KEY) -> Frame | FrameError:
    energy = _lookup(atoms, energy_key)
    if energy is not None:
        try:
            energy = float(np.asarray(energy, dtype=np.float64).reshape(()))
        except (TypeError, ValueError):
            return FrameError(source, index, K.ENERGY, f"value {energy!r} under key '{energy_key}' is not a number")
    forces = _lookup(atoms, forces_key)
    if forces is not None:
        try:
            forces = np.asarray(forces, dtype=np.float64)
        except (TypeError, ValueError):
            return FrameError(source, index, K.FORCES, f"column '{forces_key}' is not numeric")
    stress = _lookup(atoms, stress_key)
    if stress is not None:
        try:
            stress = stress_matrix(stress)
        except (TypeError, ValueError) as e:
            return FrameError(source, index, K.STRESS, f"value under key '{stress_key}': {e}")
    info = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in atoms.info.items()
            if isinstance(v, _INFO_TYPES) and k not in (energy_key, forces_key, stress_key)}
    return Frame(
        species=np.asarray(atoms.numbers, dtype=np.int64),
        positions=np.asarray(atoms.positions, dtype=np.float64),
        cell=np.asarray(atoms.cell.array, dtype=np.float64),
        pbc=np.asarray(atoms.pbc, dtype=bool),
        energy=energy, forces=forces, stress=stress, source=source, index=index, info=info,
    )


def _parse(block: bytes, source: str, index: int, energy_key: str, forces_key: str,
           stress_key: str) -> Frame | FrameError:
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError as e:
        return FrameError(source, index, "text", f"not UTF-8 text ({e})")
    try:
        atoms = next(read_xyz(io.StringIO(text), 0))
    except KeyError as e:
        return FrameError(source, index, K.SPECIES, f"unknown element symbol {e.args[0]!r}")
    except Exception as e:  # ase raises assorted types (XYZError, ValueError, IndexError) for bad text
        return FrameError(source, index, "header/atom lines", f"cannot parse: {type(e).__name__}: {e}")
    return _to_frame(atoms, source, index, energy_key, forces_key, stress_key)


def iter_frames(path: Path, start: int = 0, stop: int | None = None, energy_key: str = DEFAULT_ENERGY_KEY,
                forces_key: str = DEFAULT_FORCES_KEY, stress_key: str = DEFAULT_STRESS_KEY
                ) -> Iterator[Frame | FrameError]:
    """Frames [start, stop) in file order; memory holds one frame's text at a time."""
    source = str(path)
    for index, block in _blocks(Path(path), start, stop, keep=True):
        if isinstance(block, str):
            if index >= start:
                yield FrameError(source, index, K.NATOMS, block)
            return
        if block is not None:
            yield _parse(block, source, index, energy_key, forces_key, stress_key)
