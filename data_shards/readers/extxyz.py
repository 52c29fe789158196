"""Extended XYZ reader: scans natoms header lines to count and seek, parses one frame at a time with ase.

Labels are looked up under `energy_key` / `forces_key` / `stress_key` in the frame's info/arrays and, as ase
moves the standard names there, in its calculator results (so the defaults find what ASE finds; a MACE file
with `REF_energy`/`REF_forces` needs `energy_key="REF_energy"`, `forces_key="REF_forces"`). Stress may be
given as 9 numbers or 6 (Voigt xx yy zz yz xz xy), eV/Å³. `label_fields(path)` lists what a file holds.
A frame whose text cannot be parsed (bad natoms line, truncated atom block, unknown element symbol, malformed
columns) is yielded as a FrameError. A natoms line that is wrong (more or fewer atom lines follow, negative,
not a number) costs exactly that frame: reading resumes at the next atom-count line (an integer alone).
"""
from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from ase.io.extxyz import read_xyz

from data_shards import keys as K
from data_shards.frame import LABEL_KEYS_FOUND, Frame, FrameError, read_labels

SUFFIXES = (".extxyz", ".xyz")
DEFAULT_ENERGY_KEY = K.ENERGY
DEFAULT_FORCES_KEY = K.FORCES
DEFAULT_STRESS_KEY = K.STRESS
_INFO_TYPES = (bool, int, float, str, np.bool_, np.integer, np.floating)


def detect(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SUFFIXES


def _is_header(line: bytes) -> bool:
    """An atom-count line: one non-negative integer alone."""
    return line.strip().isdigit()


def _starts_frame(line: bytes) -> bool:
    """A line in a frame's header position: one column alone (a count, valid or not)."""
    return len(line.split()) == 1


def _is_atom_line(line: bytes) -> bool:
    """An atom line has at least 4 columns (symbol x y z ...); a header or blank line has fewer."""
    return len(line.split()) >= 4


class _Lines:
    """File lines with push-back, so a broken frame's lines can be rescanned for the next header."""

    def __init__(self, fh):
        self._it, self._back = iter(fh), []

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        return self._back.pop() if self._back else next(self._it)

    def push(self, lines: list[bytes]) -> None:
        self._back.extend(reversed(lines))


def _skip_to_header(lines: _Lines) -> int:
    """Drop lines up to (not including) the next line that starts a frame; how many were dropped."""
    dropped = 0
    for line in lines:
        if _starts_frame(line):
            lines.push([line])
            return dropped
        dropped += 1
    return dropped


def _next_frame(lines: _Lines) -> tuple[bytes, list[bytes]] | str | None:
    """(header, body lines) of the next well-formed frame, an error string for a broken one (its lines
    consumed up to the next header), or None at the end of the file."""
    for header in lines:
        if header.strip():
            break
    else:
        return None
    if not _is_header(header):
        skipped = _skip_to_header(lines)
        return (f"natoms line {header[:60]!r} is not a non-negative integer "
                f"({skipped + 1} lines up to the next frame skipped)")
    natoms = int(header)
    body = list(itertools.islice(lines, natoms + 1))
    atom_lines = body[1:]
    bad = next((k for k, line in enumerate(atom_lines) if _starts_frame(line)), None)  # the next header
    if bad is not None or len(atom_lines) < natoms:
        lines.push(body)   # the next frame's header may be inside: rescan from after this header
        _skip_to_header(lines)
        found = bad if bad is not None else len(atom_lines)
        return f"natoms line says {natoms} but only {found} atom lines follow"
    following = next(lines, None)
    if following is not None:
        lines.push([following])
        if _is_atom_line(following):
            extra = _skip_to_header(lines)
            return f"natoms line says {natoms} but {natoms + extra} atom lines follow"
    return header, body


def _blocks(path: Path, start: int, stop: int | None, keep: bool) -> Iterator[tuple[int, bytes | str | None]]:
    """(frame index, block) for each frame; block is the frame's raw bytes for frames in [start, stop)
    when `keep`, None for frames skipped, or an error string for a broken frame. After a broken frame
    (wrong or unreadable atom count) reading resumes at the next atom-count line, so exactly that frame
    is lost."""
    with open(path, "rb") as fh:
        lines = _Lines(fh)
        index = 0
        while stop is None or index < stop:
            item = _next_frame(lines)
            if item is None:
                return
            if isinstance(item, str):
                yield index, item
            else:
                yield index, (item[0] + b"".join(item[1])) if keep and index >= start else None
            index += 1


def count_frames(path: Path) -> int:
    """Frames in the file, counting a trailing broken frame as one (it is yielded as a FrameError)."""
    return sum(1 for _ in _blocks(Path(path), 0, None, keep=False))


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
    labels = read_labels(lambda key: _lookup(atoms, key), source, index, (energy_key, forces_key, stress_key))
    if isinstance(labels, FrameError):
        return labels
    energy, forces, stress = labels
    info = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in atoms.info.items()
            if isinstance(v, _INFO_TYPES) and k not in (energy_key, forces_key, stress_key)}
    if energy is None or forces is None:  # say which keys were there (e.g. REF_energy)
        results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
        info[LABEL_KEYS_FOUND] = sorted((set(atoms.info) | set(atoms.arrays) | set(results))
                                        - {"numbers", "positions"})
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
            continue
        if block is not None:
            yield _parse(block, source, index, energy_key, forces_key, stress_key)
