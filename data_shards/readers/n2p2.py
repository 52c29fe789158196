"""RuNNer / n2p2 `input.data` reader: `begin` … `end` blocks, one structure each.

    begin
    comment free text                       (optional, kept as info["comment"])
    lattice ax ay az                        (three lines, or none for a non-periodic structure)
    atom x y z element charge energy fx fy fz
    energy E
    charge Q                                (total charge, kept as info["charge"])
    end

Default units are RuNNer's Bohr / Hartree / Hartree/Bohr, converted to Å / eV / eV/Å with the CODATA
2018 factors; `units="angstrom_ev"` reads files already in those units. `count_frames` counts `begin`
lines; `iter_frames` streams one block at a time, so memory holds one structure. Each `begin` is one frame:
a block cut short by the next `begin` or by the end of the file is a FrameError on field `end`. Lines
outside blocks are ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from data_shards import keys as K
from data_shards.frame import Frame, FrameError
from data_shards.readers.npz import UNITS

FILE_NAME = "input.data"
SUFFIXES = (".data",)
BEGIN, END = b"begin", b"end"
ATOM_COLUMNS = 9  # after the keyword: x y z element charge energy fx fy fz
FIELD_END = "end"
DEFAULT_UNITS = "bohr_hartree"


def _keyword(line: bytes) -> bytes:
    parts = line.split(None, 1)
    return parts[0] if parts else b""


def detect(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.name == FILE_NAME:
        return True
    if path.suffix.lower() not in SUFFIXES:
        return False
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                return _keyword(line) == BEGIN
    return False


def count_frames(path: Path) -> int:
    """Lines whose first token is `begin` (one pass over the file, nothing parsed)."""
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.lstrip()[:5] == BEGIN and _keyword(line) == BEGIN)


def _blocks(path: Path, start: int, stop: int | None) -> Iterator[tuple[int, list[bytes] | None]]:
    """(frame index, body lines) for frames in [start, stop); body None when the block has no `end`."""
    index, wanted = -1, False
    body: list[bytes] | None = None
    with open(path, "rb") as fh:
        for line in fh:
            word = _keyword(line)
            if word == BEGIN:
                if body is not None and wanted:
                    yield index, None  # the previous block never ended
                index += 1
                if stop is not None and index >= stop:
                    return
                body, wanted = [], index >= start
            elif word == END:
                if body is not None and wanted:
                    yield index, body
                body = None
            elif body is not None and wanted:
                body.append(line)
    if body is not None and wanted:
        yield index, None


def _parse(body: list[bytes], source: str, index: int, length: float, energy_unit: float) -> Frame | FrameError:
    def bad(field_name: str, reason: str) -> FrameError:
        return FrameError(source, index, field_name, reason)

    lattice: list[list[float]] = []
    species: list[int] = []
    positions: list[list[float]] = []
    forces: list[list[float]] = []
    energy: float | None = None
    info: dict[str, str | float] = {}
    for number, raw in enumerate(body, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return bad("text", f"line {number} of the block is not UTF-8 ({e})")
        parts = line.split()
        if not parts:
            continue
        word, values = parts[0], parts[1:]
        try:
            if word == "comment":
                info["comment"] = line.split(None, 1)[1].strip() if len(parts) > 1 else ""
            elif word == "lattice":
                if len(values) != 3:
                    return bad(K.CELL, f"lattice line has {len(values)} values; expected 3")
                lattice.append([float(v) for v in values])
            elif word == "atom":
                if len(values) < 4:
                    return bad(K.POSITIONS, f"atom line {len(species) + 1} has {len(values)} columns; "
                                            f"expected {ATOM_COLUMNS} (x y z element charge energy fx fy fz)")
                if len(values) != ATOM_COLUMNS:
                    return bad(K.FORCES, f"atom line {len(species) + 1} has {len(values)} columns; "
                                         f"expected {ATOM_COLUMNS} (x y z element charge energy fx fy fz)")
                if values[3] not in K.CHEMICAL_SYMBOLS[1:]:
                    return bad(K.SPECIES, f"atom line {len(species) + 1}: unknown element symbol {values[3]!r}")
                species.append(K.CHEMICAL_SYMBOLS.index(values[3]))
                positions.append([float(v) for v in values[0:3]])
                forces.append([float(v) for v in values[6:9]])
            elif word == "energy":
                energy = float(values[0]) if len(values) == 1 else None
                if energy is None:
                    return bad(K.ENERGY, f"energy line has {len(values)} values; expected 1")
            elif word == "charge":
                info["charge"] = float(values[0])
            else:
                return bad("line", f"line {number} of the block starts with unknown keyword {word!r}")
        except (ValueError, IndexError) as e:
            field_name = {"lattice": K.CELL, "atom": K.POSITIONS, "energy": K.ENERGY}.get(word, word)
            return bad(field_name, f"line {number} of the block ({line.strip()[:80]!r}) is not numeric: {e}")
    if lattice and len(lattice) != 3:
        return bad(K.CELL, f"{len(lattice)} lattice lines; expected 3 or none")
    cell = np.array(lattice, dtype=np.float64) * length if lattice else np.zeros((3, 3))
    return Frame(
        species=np.array(species, dtype=np.int64),
        positions=np.array(positions, dtype=np.float64).reshape(-1, 3) * length,
        cell=cell, pbc=np.full(3, bool(lattice)),
        energy=None if energy is None else energy * energy_unit,
        forces=np.array(forces, dtype=np.float64).reshape(-1, 3) * (energy_unit / length),
        source=source, index=index, info=info,
    )


def iter_frames(path: Path, start: int = 0, stop: int | None = None,
                units: str = DEFAULT_UNITS) -> Iterator[Frame | FrameError]:
    """Frames [start, stop) in file order, one block in memory at a time."""
    if units not in UNITS:
        raise ValueError(f"unknown n2p2 units {units!r}; valid units: {sorted(UNITS)}")
    length, energy_unit = UNITS[units]
    source = str(path)
    for index, body in _blocks(Path(path), start, stop):
        if body is None:
            yield FrameError(source, index, FIELD_END, "block has no 'end' line before the next 'begin' "
                                                       "or the end of the file")
        else:
            yield _parse(body, source, index, length, energy_unit)
