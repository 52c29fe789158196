"""Convert input files into WebDataset shards with Ray: `shard-%06d.tar` + `manifest.json` + `quarantine.jsonl`.

The driver plans chunks (input, split, start, stop) of at most `shard_size` frames, in input order, so shard
numbers are deterministic. One Ray task per chunk reads its frames, validates them, writes one tar (tmp
name + atomic rename, so a retried task never leaves half a shard) and returns small summaries: counts,
sha256, element counts, statistics partial sums and quarantine records. Bad frames never stop the build.

Resumable: after its tar, each task writes the same summary atomically to a sidecar `shard-%06d.tar.json`
(also for a chunk whose frames were all quarantined, which has no tar). A rerun into the same folder
(e.g. after the driver was killed) reuses every chunk whose sidecar describes the same chunk, input file
stamp and build options and whose tar still has the recorded sha256, and redoes only the rest: the end
result is byte-identical to an uninterrupted build.

Duplicates: a structure (same sample key) is written once, at its first occurrence in plan order; later
occurrences anywhere in the build are counted in the manifest's `duplicates` section (rule and the second,
deterministic rewrite pass in data_shards/dedup.py). frames_read = samples_written + quarantined + duplicates.
Units: `units` converts Bohr/Hartree inputs and every frame's labels are checked for plausible magnitudes
(data_shards/units.py). The manifest's `structure` section (mean neighbour count at `stats_cutoff` Å, natoms
histogram, periodicity) is summed in the same pass.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from data_shards import dedup, readers
from data_shards.chunk import (
    SHARD_NAME,
    SIDECAR_SUFFIX,
    Chunk,
    ChunkOptions,
    ChunkResult,
    InputError,
    finished_chunk,
    write_chunk,
)
from data_shards.datasets import check_label_keys, dataset_names, datasets_section
from data_shards.e0 import parse_e0_specs
from data_shards.manifest import (
    MANIFEST_NAME,
    QUARANTINE_NAME,
    SCHEMA_VERSION,
    SPLITS,
    load_manifest,
    write_json_atomic,
)
from data_shards.progress import progress as progress_bar
from data_shards.ray_tasks import run_ray_tasks
from data_shards.readers.deepmd import find_systems
from data_shards.splits import assign_groups, shuffled_positions, split_ranges
from data_shards.units import check_units_name
from data_shards.version import maskpot_version

__all__ = ["BuildConfig", "Chunk", "ChunkResult", "InputError", "SHARD_NAME", "SIDECAR_SUFFIX", "build_shards",
           "plan", "split_ranges", "write_chunk"]

SHARD_PATTERN = re.compile(r"^shard-\d{6}\.tar$")
TMP_PATTERN = re.compile(r"^\.shard-\d{6}\.tar(\.json)?\.tmp-")
SIDECAR_PATTERN = re.compile(r"^shard-\d{6}\.tar\.json$")
DEFAULT_STATS_CUTOFF = 5.0  # Å
AUTO_SPLIT = "by_fraction"
SPLIT_MODES = ("contiguous", "shuffled")
# how inputs without a split= prefix are divided (see `plan`)
SPLIT_BY = {"frames": "contiguous blocks of each input by split_fractions (neighbouring frames stay together)",
            "input": "whole inputs - files, and each system of a DeePMD folder - assigned to splits by "
                     "split_fractions of the frames, in an order fixed by split_seed (no trajectory, seed or "
                     "system is ever in two splits)"}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    inputs: tuple[str, ...]
    out_dir: str
    shard_size: int = 1000
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    ray_address: str | None = None
    num_cpus: int | None = None
    require_labels: bool = True
    progress: bool = True
    use_ray: bool = True
    stats_cutoff: float = DEFAULT_STATS_CUTOFF
    units: str | None = None
    split_by: str = "frames"   # "frames": contiguous blocks of every input; "input": whole inputs (groups)
    split_seed: int = 0        # split_by "input": which groups land in which split; split_mode "shuffled": the order
    split_mode: str = "contiguous"  # split_by "frames": "contiguous" blocks, or "shuffled" (seeded) frame subsets
    energy_key: str | None = None   # label field names in extxyz/asedb inputs; None: what ASE finds
    forces_key: str | None = None
    stress_key: str | None = None
    datasets: tuple[str, ...] = ()  # one data-set name per input; () = the folder holding each input
    e0s: tuple[str, ...] = ()       # E0 files: "FILE" (every data set) or "NAME=FILE" (see data_shards/e0.py)

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("no inputs given; pass files/folders, optionally prefixed train=, val= or test=")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ValueError(f"shard_size must be a positive integer (frames per shard), got {self.shard_size!r}")
        fr = tuple(float(f) for f in self.split_fractions)
        if len(fr) != len(SPLITS) or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be 3 non-negative numbers (train val test) summing to 1, "
                             f"got {list(self.split_fractions)}")
        object.__setattr__(self, "split_fractions", fr)
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1 or None (all cores), got {self.num_cpus}")
        if not self.stats_cutoff > 0:
            raise ValueError(f"stats_cutoff must be > 0 Å, got {self.stats_cutoff}")
        check_units_name(self.units)
        if self.split_by not in SPLIT_BY:
            raise ValueError(f"split_by must be one of {list(SPLIT_BY)}, got {self.split_by!r}")
        if self.split_mode not in SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {list(SPLIT_MODES)}, got {self.split_mode!r}")
        if self.split_mode == "shuffled" and self.split_by != "frames":
            raise ValueError("split_mode 'shuffled' cuts frames of each input; it needs split_by 'frames', "
                             f"got {self.split_by!r}")

    @property
    def chunk_options(self) -> ChunkOptions:
        return ChunkOptions(self.require_labels, float(self.stats_cutoff), self.units, self.energy_key,
                            self.forces_key, self.stress_key)


@dataclass(frozen=True)
class InputSpec:
    path: str
    fmt: str
    frames: int
    split: str | None  # None: cut into blocks by split_fractions
    dataset: str = ""


def parse_input(text: str) -> tuple[str, str | None]:
    """`"train=PATH"` → (PATH, "train"); a plain path → (path, None). The path must exist."""
    split = None
    prefix, sep, rest = text.partition("=")
    if sep and prefix in SPLITS:
        split, text = prefix, rest
    if not Path(text).exists():
        raise InputError(f"input not found: {text}")
    return text, split


def _split_chunks(spec: InputSpec, cfg: BuildConfig, first_index: int) -> list[Chunk]:
    """One input's chunks of ≤ shard_size frames, per split, in plan order."""
    chunks: list[Chunk] = []
    if spec.split is None and cfg.split_mode == "shuffled":
        for split_name, positions in shuffled_positions(spec.path, spec.frames, cfg.split_fractions,
                                                        cfg.split_seed).items():
            for lo in range(0, len(positions), cfg.shard_size):
                part = tuple(positions[lo:lo + cfg.shard_size])
                chunks.append(Chunk(first_index + len(chunks), spec.path, spec.fmt, split_name, part[0],
                                    part[-1] + 1, select=part, dataset=spec.dataset))
        return chunks
    ranges = {spec.split: (0, spec.frames)} if spec.split else split_ranges(spec.frames, cfg.split_fractions)
    for split_name, (start, stop) in ranges.items():
        for lo in range(start, stop, cfg.shard_size):
            chunks.append(Chunk(first_index + len(chunks), spec.path, spec.fmt, split_name, lo,
                                min(stop, lo + cfg.shard_size), dataset=spec.dataset))
    return chunks


def _input_specs(cfg: BuildConfig) -> list[InputSpec]:
    specs = []
    for text, dataset in zip(cfg.inputs, dataset_names(cfg.inputs, cfg.datasets)):
        path, split = parse_input(text)
        fmt = readers.detect_format(path)
        paths = [path]
        if cfg.split_by == "input" and fmt == "deepmd":  # each system of a DeePMD folder is its own group
            paths = [str(p) for p in find_systems(Path(path))]
        specs += [InputSpec(p, fmt, readers.count_frames(p, fmt), split, dataset) for p in paths]
    if cfg.split_by == "input":
        groups = assign_groups([s for s in specs if s.split is None], cfg.split_fractions, cfg.split_seed)
        specs = [s if s.split else dataclasses.replace(s, split=groups[s.path]) for s in specs]
    return specs


def plan(cfg: BuildConfig) -> tuple[list[InputSpec], list[Chunk]]:
    """Inputs in the given order, each cut into its split blocks and those into ≤ shard_size chunks.
    `split_by` "input" gives every input without a split= prefix a whole split (`assign_groups`)."""
    specs = _input_specs(cfg)
    chunks: list[Chunk] = []
    for spec in specs:
        if spec.frames == 0:
            raise InputError(f"{spec.path}: no frames in this {spec.fmt} input (empty or blank?)")
        chunks += _split_chunks(spec, cfg, len(chunks))
    return specs, chunks


def _run_serial(chunks, cfg, on_result) -> None:
    for chunk in chunks:
        on_result(write_chunk(chunk, cfg.out_dir, cfg.chunk_options))


def _run_ray(chunks, cfg, on_result) -> None:
    run_ray_tasks(write_chunk, [(chunk, cfg.out_dir, cfg.chunk_options) for chunk in chunks], on_result,
                  cfg.ray_address, cfg.num_cpus)


def structure_summary(results: list[ChunkResult], cutoff: float) -> dict:
    """Mean neighbour count at `cutoff` Å (all samples and per split), natoms histogram, periodicity."""
    def mean_neighbours(rs):
        atoms = sum(r.atoms for r in rs)
        return sum(r.neighbour_pairs for r in rs) / atoms if atoms else None

    samples, periodic = sum(r.samples for r in results), sum(r.periodic for r in results)
    histogram: dict[int, int] = {}
    for r in results:
        for n, c in r.natoms_histogram.items():
            histogram[n] = histogram.get(n, 0) + c
    kind = ("none" if not samples else "periodic" if periodic == samples else
            "non-periodic" if periodic == 0 else "mixed")
    return {"cutoff": cutoff, "mean_neighbours": mean_neighbours(results),
            "mean_neighbours_per_split": {s: mean_neighbours([r for r in results if r.chunk.split == s])
                                          for s in SPLITS},
            "natoms_histogram": {str(n): histogram[n] for n in sorted(histogram)},
            "periodicity": kind, "periodic_samples": periodic, "non_periodic_samples": samples - periodic}


def _input_record(s: InputSpec, cfg: BuildConfig) -> dict:
    """Where an input's frames went: `ranges` [start, stop) per split, or `counts` per split when shuffled."""
    rec = {"path": s.path, "format": s.fmt, "frames": s.frames, "split": s.split or AUTO_SPLIT, "dataset": s.dataset}
    if s.split is None and cfg.split_mode == "shuffled":
        return {**rec, "counts": {k: b - a for k, (a, b) in split_ranges(s.frames, cfg.split_fractions).items()}}
    ranges = {s.split: (0, s.frames)} if s.split else split_ranges(s.frames, cfg.split_fractions)
    return {**rec, "ranges": {k: list(v) for k, v in ranges.items()}}


def assemble_manifest(cfg: BuildConfig, specs: list[InputSpec], results: list[ChunkResult],
                      duplicates: dict) -> dict:
    written = [r for r in results if r.samples]
    elements: dict[int, int] = {}
    for r in written:
        for z, n in r.elements.items():
            elements[z] = elements.get(z, 0) + n
    datasets, stats = datasets_section(results, cfg.e0s)
    totals = {"frames_read": sum(r.frames_read for r in results),
              "samples_written": sum(r.samples for r in results),
              "quarantined": sum(len(r.quarantine) for r in results),
              "duplicates": sum(len(r.dropped) for r in results)}
    isolated = sum(len(r.isolated) for r in results)
    if isolated:   # E0 reference frames, not samples (only listed when there are some)
        totals["isolated_atoms"] = isolated
    if (totals["frames_read"] != totals["samples_written"] + totals["quarantined"] + totals["duplicates"] + isolated
            or totals["duplicates"] != duplicates["count"]):
        raise RuntimeError(f"frame accounting does not add up: {totals}, duplicates decided "
                           f"{duplicates['count']}")
    return {
        "schema_version": SCHEMA_VERSION,
        "maskpot_version": maskpot_version(),
        "build": {"shard_size": cfg.shard_size, "split_fractions": list(cfg.split_fractions),
                  "split_by": cfg.split_by, "split_seed": cfg.split_seed, "split_mode": cfg.split_mode,
                  "require_labels": cfg.require_labels, "units": cfg.units, "stats_cutoff": cfg.stats_cutoff,
                  "energy_key": cfg.energy_key, "forces_key": cfg.forces_key, "stress_key": cfg.stress_key,
                  "e0s": list(cfg.e0s)},
        "inputs": [_input_record(s, cfg) for s in specs],
        "shards": [{"name": r.name, "split": r.chunk.split, "samples": r.samples, "atoms": r.atoms,
                    "bytes": r.bytes, "sha256": r.sha256} for r in written],
        "splits": {s: {"samples": sum(r.samples for r in written if r.chunk.split == s),
                       "shards": sum(1 for r in written if r.chunk.split == s)} for s in SPLITS},
        "totals": totals,
        "duplicates": duplicates,
        "elements": {str(z): elements[z] for z in sorted(elements)},
        "labelled": bool(written) and not any(r.unlabelled for r in written),
        "stats": stats,
        "datasets": datasets,
        "structure": structure_summary(written, cfg.stats_cutoff),
    }


def nothing_written(totals: dict, quarantine: list[dict], where: Path) -> str:
    """One line: why a build wrote no sample (the commonest quarantine reasons, with their counts)."""
    reasons: dict[str, int] = {}
    for rec in quarantine:
        reasons[f"{rec['field']}: {rec['reason']}"] = reasons.get(f"{rec['field']}: {rec['reason']}", 0) + 1
    common = "; ".join(f"{n}× {r}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])[:3])
    return (f"no sample written: all {totals['frames_read']} frames read were quarantined "
            f"({totals['quarantined']}) or duplicates ({totals['duplicates']}); {common or 'no reason recorded'} "
            f"(details: {where})")


def _remove_stale(out_dir: Path, keep: set[str], keep_sidecars: set[str]) -> None:
    """Shards (and sidecars) of an earlier build into the same folder that this build did not write, and
    dead tmp files."""
    for p in out_dir.iterdir():
        stale_tar = SHARD_PATTERN.match(p.name) and p.name not in keep
        stale_sidecar = SIDECAR_PATTERN.match(p.name) and p.name.removesuffix(SIDECAR_SUFFIX) not in keep_sidecars
        if stale_tar or stale_sidecar or TMP_PATTERN.match(p.name):
            p.unlink()


def build_shards(inputs: list[str], out_dir: str, shard_size: int = 1000,
                 split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), ray_address: str | None = None,
                 num_cpus: int | None = None, require_labels: bool = True, progress: bool = True,
                 use_ray: bool = True, stats_cutoff: float = DEFAULT_STATS_CUTOFF, units: str | None = None,
                 split_by: str = "frames", split_seed: int = 0, split_mode: str = "contiguous",
                 energy_key: str | None = None, forces_key: str | None = None, stress_key: str | None = None,
                 datasets: tuple[str, ...] = (), e0s: tuple[str, ...] = ()) -> dict:
    """Build shards + manifest.json + quarantine.jsonl in `out_dir`; returns the loaded manifest.

    `use_ray=False` runs the same chunk tasks one after another in this process (small builds, tests).
    `stats_cutoff` (Å) is the radius of the manifest's mean neighbour count; `units` ("angstrom_ev" |
    "bohr_hartree" | None = each format's default) the units the inputs are in. `split_by` (SPLIT_BY)
    and `split_seed` say how inputs without a split= prefix are divided between train, val and test;
    `split_mode` "shuffled" draws each input's split frames by a permutation seeded by `split_seed`.
    `energy_key`/`forces_key`/`stress_key` name the label fields of extxyz/asedb inputs (None: what ASE finds);
    `datasets` names each input's data set and `e0s` gives E0 files (data_shards/datasets.py, e0.py).
    """
    cfg = BuildConfig(tuple(str(i) for i in inputs), str(out_dir), shard_size, split_fractions,
                      ray_address, num_cpus, require_labels, progress, use_ray, stats_cutoff, units, split_by,
                      split_seed, split_mode, energy_key, forces_key, stress_key, tuple(datasets), tuple(e0s))
    if e0s:
        parse_e0_specs(cfg.e0s)   # fail on a malformed --e0s before any work
    specs, chunks = plan(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ordered, duplicates = _write_chunks(chunks, cfg)
    elapsed = time.perf_counter() - t0
    check_label_keys(ordered, cfg.chunk_options.label_keys(), cfg.require_labels)
    manifest = assemble_manifest(cfg, specs, ordered, duplicates)
    _remove_stale(out, {s["name"] for s in manifest["shards"]}, {r.name for r in ordered})
    quarantine = "".join(json.dumps(rec, sort_keys=True) + "\n" for r in ordered for rec in r.quarantine)
    tmp = out / f".{QUARANTINE_NAME}.tmp-{os.getpid()}"
    tmp.write_text(quarantine)
    os.replace(tmp, out / QUARANTINE_NAME)
    if manifest["totals"]["samples_written"] == 0:
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # no usable shard set: nothing downstream may read
        raise InputError(nothing_written(manifest["totals"], [rec for r in ordered for rec in r.quarantine],
                                         out / QUARANTINE_NAME))
    write_json_atomic(out / MANIFEST_NAME, manifest)
    _log_summary(manifest, elapsed, out)
    return load_manifest(out)


def _write_chunks(chunks: list[Chunk], cfg: BuildConfig) -> tuple[list[ChunkResult], dict]:
    """(every chunk's result in plan order, the duplicates section): finished chunks of an earlier build are
    reused, the rest written (Ray or serial), then chunks holding a later duplicate rewritten without it."""
    results: dict[int, ChunkResult] = {}
    total_frames = sum(c.stop - c.start for c in chunks)
    bar = progress_bar(total=total_frames, unit="frame", desc="shards", **({} if cfg.progress else {"disable": True}))

    def on_result(result: ChunkResult) -> None:
        if result.chunk.shard_index not in results:
            bar.update(result.frames_read)
        results[result.chunk.shard_index] = result
        bar.set_postfix_str(f"{len(results)}/{len(chunks)} chunks")

    todo = []
    for chunk in chunks:
        done = finished_chunk(chunk, cfg.out_dir, cfg.chunk_options)
        if done is None:
            todo.append(chunk)
        else:
            on_result(done)
    if len(todo) < len(chunks):
        log.info("resuming: %d of %d chunks already finished in %s", len(chunks) - len(todo), len(chunks),
                 Path(cfg.out_dir))
    run = _run_ray if cfg.use_ray else _run_serial
    try:
        if todo:
            run(todo, cfg, on_result)
        drops, duplicates = dedup.decide([results[c.shard_index] for c in chunks])
        rewrite = [dataclasses.replace(results[c.shard_index].chunk, drop=drops[c.shard_index])
                   for c in chunks if dedup.needs_rewrite(results[c.shard_index], drops)]
        if rewrite:
            log.info("duplicates: rewriting %d chunk(s) without frames seen in earlier chunks", len(rewrite))
            run(rewrite, cfg, on_result)
    finally:
        bar.close()
    return [results[c.shard_index] for c in chunks], duplicates


def _log_summary(manifest: dict, elapsed: float, out: Path) -> None:
    t = manifest["totals"]
    log.info("built %d shards from %d frames in %.1f s (%.0f frames/s); %d quarantined, %d duplicates",
             len(manifest["shards"]), t["frames_read"], elapsed, t["frames_read"] / max(elapsed, 1e-9),
             t["quarantined"], t["duplicates"])
    if t["quarantined"]:
        log.warning("%d frame(s) failed validation; see %s", t["quarantined"], out / QUARANTINE_NAME)
    if t["duplicates"]:
        log.warning("%d duplicate frame(s) left out (kept at their first occurrence); examples in %s",
                    t["duplicates"], out / MANIFEST_NAME)
