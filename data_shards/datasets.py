"""Data sets of a build: names, label-key checks, per-data-set E0 and statistics (the manifest's `datasets`).

Each input belongs to one data set (its own energy zero). By default the name is the folder holding the input
(`ethanol_rmd17/train.xyz` → `ethanol_rmd17`, `water_deepmd/data/data_0` → `data`), so files from one source
share a data set; `shards build --datasets NAME ...` names them explicitly, one per input. Energies of different
data sets are never fitted together: each gets its own E0 (data_shards/e0.py), and the top-level `stats` E0 is
the merged table that finetuning re-references every sample to (finetune.loop).
"""
from __future__ import annotations

from pathlib import Path

from data_shards import keys as K
from data_shards.chunk import KEYED_FORMATS, ChunkResult, InputError
from data_shards.e0 import (
    E0Error,
    check_covers,
    merged_table,
    parse_e0_specs,
    read_e0_file,
)
from data_shards.manifest import SPLITS, STATS_SPLIT, StatsPartial, finalize_stats, pooled_stats
from data_shards.readers import asedb, extxyz

KEY_OPTIONS = {"energy": "--energy-key", "forces": "--forces-key", "stress": "--stress-key"}
FIELD_LISTERS = {"extxyz": extxyz.label_fields, "asedb": asedb.label_fields}


def dataset_names(inputs: tuple[str, ...], given: tuple[str, ...]) -> list[str]:
    """One name per input: `given`, else the name of the folder holding the input (a file or a folder), so
    inputs side by side (train.xyz and test.xyz, DeePMD data_0 … data_3) form one data set; two different
    folders of the same name get `NAME`, `NAME-2`, …"""
    if given and len(given) != len(inputs):
        raise InputError(f"--datasets: {len(given)} name(s) for {len(inputs)} input(s); give one per input, in order")
    if given:
        return list(given)
    names: list[str] = []
    by_folder: dict[Path, str] = {}
    for text in inputs:
        prefix, sep, rest = text.partition("=")
        folder = Path(rest if sep and prefix in SPLITS else text).resolve().parent
        if folder not in by_folder:
            base = folder.name or "data"
            taken = sum(1 for name in by_folder.values() if name == base or name.startswith(base + "-"))
            by_folder[folder] = base if not taken else f"{base}-{taken + 1}"
        names.append(by_folder[folder])
    return names


def check_label_keys(results: list[ChunkResult], keys: dict[str, str | None], require_labels: bool) -> None:
    """InputError when an input of a keyed format has frames but none carries a label under its key: a key
    option the user gave (any label), or the default energy/forces keys when labels are required. Names the
    option, the value and the fields the input's frames do have."""
    by_input: dict[str, tuple[str, dict]] = {}
    for r in results:
        if r.chunk.fmt not in KEYED_FORMATS or not r.frames_read:
            continue
        fmt, counts = by_input.setdefault(r.chunk.path, (r.chunk.fmt, dict.fromkeys(KEY_OPTIONS, 0)))
        for label, n in r.labels_found.items():
            counts[label] += n
    for path, (fmt, counts) in by_input.items():
        for label, option in KEY_OPTIONS.items():
            given = keys.get(label)
            if counts[label] or not (given is not None or (require_labels and label != "stress")):
                continue
            value = given if given is not None else f"{label} (the default)"
            fields = ", ".join(FIELD_LISTERS[fmt](path)) or "none"
            raise InputError(f"{option} {value}: no frame of {path} has this field; fields found: {fields}")


def _resolve_e0(name: str, results: list[ChunkResult], elements: set[int], e0_files: dict) -> tuple[dict | None, str]:
    """(E0 table or None for a fit, source) of one data set."""
    path = e0_files.get(name, e0_files.get(None))
    if path is not None:
        table = read_e0_file(path)
        check_covers(table, elements, f"--e0s {path}", name)
        return table, f"file:{path}"
    isolated = [i for r in results for i in r.isolated]
    if not isolated:
        return None, "fit"
    table = {}
    for z, energy, where in isolated:
        if table.setdefault(int(z), float(energy)) != float(energy):
            raise E0Error(f"data set {name!r}: two isolated-atom energies for {K.CHEMICAL_SYMBOLS[z]} "
                          f"({table[int(z)]} and {energy} at {where})")
    check_covers(table, elements, f"isolated-atom frames (config_type=IsolatedAtom) of data set {name!r}", name)
    return table, "isolated_atoms"


def datasets_section(results: list[ChunkResult], e0_specs: tuple[str, ...]) -> tuple[dict, dict]:
    """({name: entry} for the manifest's `datasets`, the top-level `stats`). Input order fixes data-set order."""
    e0_files = parse_e0_specs(e0_specs)
    order = list(dict.fromkeys(r.chunk.dataset for r in results))
    unknown = sorted(k for k in e0_files if k is not None and k not in order)
    if unknown:
        raise E0Error(f"--e0s names data set(s) {unknown} that no input belongs to; data sets: {order}")
    sections: dict[str, dict] = {}
    forces = StatsPartial()
    for name in order:
        mine = [r for r in results if r.chunk.dataset == name]
        elements = {z for r in mine if r.samples for z in r.elements}
        partial = StatsPartial()
        for r in mine:
            if r.samples and r.chunk.split == STATS_SPLIT:
                partial = partial.merge(r.stats)
        forces = forces.merge(partial)
        table, source = _resolve_e0(name, mine, elements, e0_files)
        stats = finalize_stats(partial, table, source)
        sections[name] = {"index": len(sections), "inputs": list(dict.fromkeys(r.chunk.path for r in mine)),
                          "samples": sum(r.samples for r in mine), "isolated_atoms": sum(len(r.isolated) for r in mine),
                          "elements": sorted(str(z) for z in elements), **stats}
    if len(sections) == 1:
        top = {k: v for k, v in next(iter(sections.values())).items()
               if k not in ("index", "inputs", "samples", "isolated_atoms", "elements")}
    else:
        top = pooled_stats(sections, forces, merged_table(sections))
    return sections, top
