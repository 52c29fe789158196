"""ASE database reader (`*.db`, SQLite through `ase.db.connect`): one frame per row, in id order.

`Frame.index` is the row's position in id order (0-based; ids may have gaps after deletions) and
`Frame.info["id"]` the row id. Labels are looked up under `energy_key` / `forces_key` first among the row's
columns and key-value pairs (a stored calculator's energy/forces are columns), then in `row.data`.
Rows are fetched in pages of `PAGE_ROWS` by id range, so memory holds one page, whatever the database size
(ase's `select` fetches its whole result set, hence the pages).
"""
from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from urllib.parse import quote

import numpy as np
from ase.db.sqlite import SQLite3Database

from data_shards import keys as K
from data_shards.frame import Frame, FrameError, read_labels

SUFFIXES = (".db",)
SQLITE_MAGIC = b"SQLite format 3\x00"
PAGE_ROWS = 256
DEFAULT_ENERGY_KEY = K.ENERGY
DEFAULT_FORCES_KEY = K.FORCES
_INFO_TYPES = (bool, int, float, str, np.bool_, np.integer, np.floating)


def detect(path: Path) -> bool:
    if not (path.is_file() and path.suffix.lower() in SUFFIXES):
        return False
    with open(path, "rb") as fh:
        return fh.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC


class _ReadOnlyDatabase(SQLite3Database):
    """ase's SQLite database over a read-only connection: an input is never written (ase's own `connect`
    opens read-write and creates its tables in any SQLite file that lacks them)."""

    def _connect(self):
        return sqlite3.connect(f"file:{quote(str(self.filename))}?mode=ro", uri=True, timeout=20)


def _tables(path: Path) -> list[str]:
    """Table names of an SQLite file, opened read-only; ValueError when it is no readable SQLite database."""
    try:
        with closing(sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)) as con:
            return sorted(r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'"))
    except sqlite3.Error as e:
        raise ValueError(f"{path}: not a readable SQLite database ({e})") from None


def _connect(path: Path):
    tables = _tables(path)
    if "systems" not in tables:
        raise ValueError(f"{path}: not an ASE database (no 'systems' table; tables found: {tables or 'none'})")
    return _ReadOnlyDatabase(str(path), create_indices=False, use_lock_file=False)


def _guarded(path: Path, what):
    """Run `what()`; SQLite / ase errors (a damaged page, an old ase format) become one-line ValueErrors."""
    try:
        return what()
    except (sqlite3.Error, OSError) as e:
        raise ValueError(f"{path}: cannot read the ASE database ({type(e).__name__}: {e})") from None


def count_frames(path: Path) -> int:
    """Rows in the database (one SQL COUNT)."""
    return int(_guarded(Path(path), lambda: _connect(Path(path)).count()))


def _lookup(row, key: str):
    value = row.get(key)
    if value is None:
        data = row.get("data") or {}
        value = data.get(key)
    return value


def label_fields(path, frames: int = 20) -> list[str]:
    """Key-value pairs, data entries and stored calculator results of the first rows (for error messages)."""
    found: set[str] = set()
    for row in _connect(Path(path)).select(sort="id", limit=frames):
        found |= set(row.key_value_pairs) | set(row.get("data") or {})
        found |= {k for k in ("energy", "forces", "stress", "free_energy") if row.get(k) is not None}
    return sorted(found)


def _to_frame(row, source: str, index: int, energy_key: str, forces_key: str,
              stress_key: str = K.STRESS) -> Frame | FrameError:
    labels = read_labels(lambda key: _lookup(row, key), source, index, (energy_key, forces_key, stress_key),
                         where=f"row id {row.id}: ")
    if isinstance(labels, FrameError):
        return labels
    energy, forces, stress = labels
    try:
        species = np.asarray(row.numbers, dtype=np.int64)
        positions = np.asarray(row.positions, dtype=np.float64)
        cell = np.asarray(row.cell, dtype=np.float64).reshape(3, 3)
        pbc = np.asarray(row.pbc, dtype=bool).reshape(3)
    except (AttributeError, TypeError, ValueError) as e:
        return FrameError(source, index, "row", f"row id {row.id}: cannot read the structure ({e})")
    info = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.key_value_pairs.items()
            if isinstance(v, _INFO_TYPES) and k not in (energy_key, forces_key, stress_key)}
    info["id"] = int(row.id)
    return Frame(species=species, positions=positions, cell=cell, pbc=pbc, energy=energy, forces=forces,
                 stress=stress, source=source, index=index, info=info)


def iter_frames(path: Path, start: int = 0, stop: int | None = None, energy_key: str = DEFAULT_ENERGY_KEY,
                forces_key: str = DEFAULT_FORCES_KEY, stress_key: str = K.STRESS) -> Iterator[Frame | FrameError]:
    """Rows [start, stop) in id order, fetched PAGE_ROWS at a time (keyset pages: `id > last id`)."""
    path = Path(path)
    source = str(path)
    db = _connect(path)
    index, last_id = start, None
    while stop is None or index < stop:
        limit = PAGE_ROWS if stop is None else min(PAGE_ROWS, stop - index)
        query = {"sort": "id", "limit": limit, **({"offset": start} if last_id is None else {})}
        selection = None if last_id is None else f"id>{last_id}"
        page = _guarded(path, lambda q=query, sel=selection: list(db.select(sel, **q)))
        for row in page:
            yield _to_frame(row, source, index, energy_key, forces_key, stress_key)
            index += 1
        if len(page) < limit:
            return
        last_id = page[-1].id
