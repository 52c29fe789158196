"""Reference energies E0 per element and per data set: isolated-atom frames, E0 files, least-squares fits.

Sources, in the order a data set's E0 is taken from:
1. an E0 file (`shards build --e0s FILE` for every data set, or `--e0s NAME=FILE` for one): a YAML/JSON table
   `{element symbol or Z: eV}`, or an extxyz of isolated atoms (frames with `config_type=IsolatedAtom`, as
   MACE reads them, or, if no frame has a config_type, every single-atom non-periodic frame);
2. isolated-atom frames inside the data set's own inputs (`config_type=IsolatedAtom`): they are E0 references,
   not training samples;
3. a least-squares fit over the data set's training structures (manifest.py `finalize_stats`).
A file or isolated-atom set that lacks an element the data set holds is a user error (E0Error): a fit for
the missing element alone would silently mix two energy zeros.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from data_shards import keys as K
from data_shards.readers import extxyz

# config_type values compared lower-case without "_" / "-" (IsolatedAtom, isolated_atom)
ISOLATED_ATOM = "isolatedatom"
CONFIG_TYPE = "config_type"
E0_FILE_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".xyz": "extxyz", ".extxyz": "extxyz"}


class E0Error(ValueError):
    """An E0 source that cannot be used (unreadable, unknown element, an element of the data missing)."""


def is_isolated_atom(frame) -> bool:
    """A frame marked as an isolated-atom E0 reference (MACE's `config_type=IsolatedAtom`)."""
    value = str(frame.info.get(CONFIG_TYPE, "")).lower().replace("_", "").replace("-", "")
    return value == ISOLATED_ATOM and frame.natoms == 1 and frame.energy is not None


def _element(key, where: str) -> int:
    text = str(key).strip()
    if text.isdigit() and 1 <= int(text) <= K.MAX_Z:
        return int(text)
    if text in K.CHEMICAL_SYMBOLS[1:]:
        return K.CHEMICAL_SYMBOLS.index(text)
    raise E0Error(f"{where}: {key!r} is neither an element symbol (H, C, O, ...) nor an atomic number 1..{K.MAX_Z}")


def _table(data, where: str) -> dict[int, float]:
    if not isinstance(data, dict) or not data:
        raise E0Error(f"{where}: expected a table {{element: E0 in eV}}, e.g. {{H: -13.6, O: -2041.9}}")
    table = {}
    for key, value in data.items():
        try:
            table[_element(key, where)] = float(value)
        except (TypeError, ValueError) as e:
            if isinstance(e, E0Error):
                raise
            raise E0Error(f"{where}: E0 of {key} is {value!r}, not a number (eV)") from e
    return table


def _from_extxyz(path: Path) -> dict[int, float]:
    frames = [f for f in extxyz.iter_frames(path) if not isinstance(f, Exception)]
    marked = [f for f in frames if CONFIG_TYPE in f.info]
    atoms = [f for f in marked if is_isolated_atom(f)] if marked else \
        [f for f in frames if f.natoms == 1 and not np.any(f.pbc) and f.energy is not None]
    if not atoms:
        raise E0Error(f"{path}: no isolated-atom frames (single atom, energy, config_type=IsolatedAtom)")
    table = {}
    for f in atoms:
        z = int(f.species[0])
        if z in table and table[z] != float(f.energy):
            raise E0Error(f"{path}: two isolated-atom energies for {K.CHEMICAL_SYMBOLS[z]}: {table[z]} and {f.energy}")
        table[z] = float(f.energy)
    return table


def read_e0_file(path: str | Path) -> dict[int, float]:
    """{Z: E0 eV} from a YAML/JSON table or an extxyz of isolated atoms."""
    path = Path(path)
    kind = E0_FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise E0Error(f"--e0s {path}: unknown file type; valid: {sorted(E0_FILE_SUFFIXES)}")
    if not path.is_file():
        raise E0Error(f"--e0s {path}: no such file")
    if kind == "extxyz":
        return _from_extxyz(path)
    text = path.read_text()
    try:
        data = yaml.safe_load(text) if kind == "yaml" else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise E0Error(f"--e0s {path}: not valid {kind}: {e}") from e
    return _table(data, f"--e0s {path}")


def parse_e0_specs(specs: tuple[str, ...] | list[str]) -> dict[str | None, str]:
    """`["FILE"]` → {None: FILE} (every data set); `["NAME=FILE", ...]` → {NAME: FILE}."""
    out: dict[str | None, str] = {}
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        key, path = (name, path) if sep and not Path(spec).exists() else (None, spec)
        if key in out:
            raise E0Error(f"--e0s given twice for {'every data set' if key is None else 'data set ' + key}")
        out[key] = path
    return out


def check_covers(table: dict[int, float], elements, source: str, dataset: str) -> None:
    """E0Error naming the source and the missing elements when `table` lacks one of `elements`."""
    missing = sorted({int(z) for z in elements} - set(table))
    if missing:
        names = ", ".join(K.CHEMICAL_SYMBOLS[z] for z in missing)
        have = ", ".join(K.CHEMICAL_SYMBOLS[z] for z in sorted(table)) or "none"
        raise E0Error(f"{source}: no E0 for {names}, which data set {dataset!r} holds (E0 given for: {have})")


def merged_table(datasets: dict[str, dict]) -> dict[int, float]:
    """One model E0 table for several data sets: the first data set's E0 (input order), then each later
    data set's for the elements not yet in it. Samples of other data sets are re-referenced to it."""
    table: dict[int, float] = {}
    for entry in datasets.values():
        for z, v in entry["e0"].items():
            table.setdefault(int(z), float(v))
    return table


def reference_shift(species: np.ndarray, dataset_e0: dict[int, float], table: dict[int, float]) -> float:
    """Energy to add to a structure labelled against `dataset_e0` so that it refers to `table`:
    Σ_i (table[Z_i] − E0_dataset[Z_i]) (an element absent from either counts 0 in it)."""
    zs, counts = np.unique(np.asarray(species), return_counts=True)
    return float(sum(n * (table.get(int(z), 0.0) - dataset_e0.get(int(z), 0.0)) for z, n in zip(zs, counts)))


class Rereference:
    """Stream transform: each sample's energy moved from its data set's E0 to the manifest's model E0 table
    (`stats.e0`, the merged table). Identity for one data set or a version-1 manifest. Composes with
    another transform (`then`), which runs after it."""

    def __init__(self, datasets: dict[str, dict], table: dict[int, float], then=None):
        self.datasets = {name: entry["e0"] for name, entry in datasets.items()}
        self.table, self.then = dict(table), then

    @property
    def active(self) -> bool:
        return len(self.datasets) > 1

    def __call__(self, sample: dict, epoch: int) -> dict:
        if self.active and sample.get(K.ENERGY) is not None:
            e0 = self.datasets.get(sample.get(K.DATASET, ""))
            if e0 is None:
                raise E0Error(f"sample {sample.get(K.SAMPLE_KEY)} belongs to data set {sample.get(K.DATASET)!r}, "
                              f"which the manifest does not list ({sorted(self.datasets)})")
            sample = {**sample, K.ENERGY: sample[K.ENERGY] + reference_shift(sample[K.SPECIES], e0, self.table)}
        return self.then(sample, epoch) if self.then is not None else sample
