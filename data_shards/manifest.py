"""Manifest schema (`manifest.json`, schema_version 2; version 1 still read), loading/verification, and training
statistics.

Version 2 adds `datasets` (per data set: inputs, E0 and where it came from, statistics) and `dataset` in
every sample's json; a version-1 manifest is read as one data set whose E0 is `stats.e0` (`dataset_entries`).

Statistics are merged from small per-shard partial sums (`StatsPartial`), so Ray tasks never send
frames back to the driver: E0 per element comes from the normal equations XᵀX e = Xᵀy of the
element-count matrix X, and the per-atom energy mean/std after E0 is expanded into sums that do not
need E0 in advance.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_shards.e0 import Rereference
from data_shards.frame import Frame
from data_shards.progress import warn_once

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)   # 1: no `datasets` section, no per-sample dataset
MANIFEST_NAME = "manifest.json"
QUARANTINE_NAME = "quarantine.jsonl"
SPLITS = ("train", "val", "test")
STATS_SPLIT = "train"
MANIFEST_DIR = "manifest_dir"  # added by load_manifest (absolute folder); never written to disk
RANK_RTOL = 1e-10  # singular values of XᵀX below this fraction of the largest count as zero

log = logging.getLogger(__name__)
SAFE_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.tar$")


class ManifestError(ValueError):
    """A manifest or shard folder that cannot be used as it is; the message names the file."""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")


def manifest_file(dir_or_file: str | Path) -> Path:
    p = Path(dir_or_file)
    return p / MANIFEST_NAME if p.is_dir() else p


def parse_manifest(text: str | bytes, where: str) -> dict:
    """json → manifest dict, checking the schema version and the required sections; `where` names it."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}: not valid JSON: {e}") from e
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version not in READABLE_SCHEMA_VERSIONS:
        raise ManifestError(f"{where}: schema_version {version!r} is not supported (readable: "
                            f"{list(READABLE_SCHEMA_VERSIONS)}; rebuild with `maskpot shards build`)")
    for section in ("shards", "splits", "totals"):
        if section not in manifest:
            raise ManifestError(f"{where}: missing section {section!r}")
    for shard in manifest["shards"]:
        name = shard.get("name") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not SAFE_SHARD_NAME.match(name) or ".." in name:
            # names become paths, URLs and `pipe:` commands: `../x.tar` or `x;rm -rf ~.tar` must never get there
            raise ManifestError(f"{where}: shard name {name!r} is not a plain file name (letters, digits, ._-, "
                                f"ending in .tar)")
    return manifest


def load_manifest(dir_or_file: str | Path, check_files: bool = True) -> dict:
    """Read and check a manifest. The returned dict also holds MANIFEST_DIR (the absolute folder)."""
    path = manifest_file(dir_or_file)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path} (build one with `maskpot shards build`)")
    manifest = parse_manifest(path.read_text(), str(path))
    folder = path.parent.resolve()
    if check_files:
        for shard in manifest["shards"]:
            if not (folder / shard["name"]).is_file():
                raise ManifestError(f"{path}: shard {shard['name']} is listed but missing from {folder}")
    manifest[MANIFEST_DIR] = str(folder)
    return manifest


def shard_entries(manifest: dict, split: str) -> list[dict]:
    """The manifest's shard records of one split, in manifest (build plan) order."""
    _check_split(split)
    return [s for s in manifest["shards"] if s["split"] == split]


def shard_paths(manifest: dict, split: str) -> list[str]:
    folder = Path(manifest[MANIFEST_DIR])
    return [str(folder / s["name"]) for s in shard_entries(manifest, split)]


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def verify_shards(dir_or_file: str | Path) -> list[str]:
    """Re-hash every listed shard. Returns one line per problem (missing, size or sha256 mismatch); [] if all match."""
    manifest = load_manifest(dir_or_file, check_files=False)
    folder = Path(manifest[MANIFEST_DIR])
    problems = []
    for shard in manifest["shards"]:
        path = folder / shard["name"]
        if not path.is_file():
            problems.append(f"{shard['name']}: missing")
            continue
        size = path.stat().st_size
        if size != shard["bytes"]:
            problems.append(f"{shard['name']}: size {size} bytes, manifest says {shard['bytes']}")
        digest = file_sha256(path)
        if digest != shard["sha256"]:
            problems.append(f"{shard['name']}: sha256 {digest[:16]}… does not match manifest {shard['sha256'][:16]}…")
    return problems


def write_json_atomic(path: str | Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


@dataclass
class StatsPartial:
    """Sums over labelled structures, mergeable across shards. `elements` index the vector/matrix axes.

    With a_s = E_s / n_s (energy per atom) and u_s = x_s / n_s (composition fractions), the per-atom
    residual after E0 is r_s = a_s - u_s·e0, so Σr and Σr² follow from Σa, Σa², Σu, Σa·u, Σu uᵀ.
    """

    elements: tuple[int, ...] = ()
    structures: int = 0
    xtx: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    xty: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sum_a: float = 0.0
    sum_a2: float = 0.0
    sum_u: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sum_au: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sum_uu: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    force_sq: dict[int, float] = field(default_factory=dict)     # Σ|F|² per element, eV²/Å²
    force_atoms: dict[int, int] = field(default_factory=dict)    # atoms with forces per element

    def _embed(self, elements: tuple[int, ...]) -> "StatsPartial":
        """The same sums on a larger element axis (zeros for elements this partial never saw)."""
        idx = [elements.index(z) for z in self.elements]
        k = len(elements)
        out = StatsPartial(elements, self.structures, np.zeros((k, k)), np.zeros(k), self.sum_a, self.sum_a2,
                           np.zeros(k), np.zeros(k), np.zeros((k, k)), dict(self.force_sq), dict(self.force_atoms))
        out.xtx[np.ix_(idx, idx)] = self.xtx
        out.xty[idx] = self.xty
        out.sum_u[idx] = self.sum_u
        out.sum_au[idx] = self.sum_au
        out.sum_uu[np.ix_(idx, idx)] = self.sum_uu
        return out

    def merge(self, other: "StatsPartial") -> "StatsPartial":
        elements = tuple(sorted(set(self.elements) | set(other.elements)))
        a, b = self._embed(elements), other._embed(elements)
        force_sq = {z: a.force_sq.get(z, 0.0) + b.force_sq.get(z, 0.0) for z in set(a.force_sq) | set(b.force_sq)}
        force_atoms = {z: a.force_atoms.get(z, 0) + b.force_atoms.get(z, 0)
                       for z in set(a.force_atoms) | set(b.force_atoms)}
        return StatsPartial(elements, a.structures + b.structures, a.xtx + b.xtx, a.xty + b.xty,
                            a.sum_a + b.sum_a, a.sum_a2 + b.sum_a2, a.sum_u + b.sum_u, a.sum_au + b.sum_au,
                            a.sum_uu + b.sum_uu, force_sq, force_atoms)

    def add_frame(self, frame: Frame) -> None:
        """Account one validated frame in place (frames without labels add nothing)."""
        species = np.asarray(frame.species)
        if frame.forces is not None:
            forces = np.asarray(frame.forces, dtype=np.float64)
            zs, inverse = np.unique(species, return_inverse=True)
            sq_per_z = np.bincount(inverse, weights=np.einsum("ij,ij->i", forces, forces))
            for z, sq, count in zip(zs.tolist(), sq_per_z.tolist(), np.bincount(inverse).tolist()):
                self.force_sq[z] = self.force_sq.get(z, 0.0) + sq
                self.force_atoms[z] = self.force_atoms.get(z, 0) + count
        if frame.energy is None:
            return
        zs, counts = np.unique(species, return_counts=True)
        x = counts.astype(np.float64)
        n, energy = float(species.shape[0]), float(frame.energy)
        a, u = energy / n, x / n
        one = StatsPartial(tuple(zs.tolist()), 1, np.outer(x, x), x * energy, a, a * a, u, a * u, np.outer(u, u))
        merged = self.merge(one)
        self.__dict__.update(merged.__dict__)


def finalize_stats(partial: StatsPartial, e0_given: dict[int, float] | None = None, source: str = "fit") -> dict:
    """Merged partial sums → the manifest's `stats` section (E0 by least squares unless `e0_given`, residual
    mean/std after E0, force RMS). `source` says where a given E0 came from (recorded as `e0_source`)."""
    force_atoms = sum(partial.force_atoms.values())
    force_rms = (float(np.sqrt(sum(partial.force_sq.values()) / (3 * force_atoms))) if force_atoms else None)
    per_element = {str(z): float(np.sqrt(partial.force_sq[z] / (3 * partial.force_atoms[z])))
                   for z in sorted(partial.force_atoms) if partial.force_atoms[z]}
    stats = {"split": STATS_SPLIT, "structures": partial.structures, "e0": {}, "e0_rank_deficient": False,
             "e0_source": source if e0_given is not None else "fit",
             "energy_per_atom_mean": None, "energy_per_atom_std": None,
             "force_rms": force_rms, "force_rms_per_element": per_element}
    if e0_given is not None:
        stats["e0"] = {str(z): float(v) for z, v in sorted(e0_given.items())}
    if partial.structures == 0:
        return stats
    if e0_given is not None:
        e0 = np.array([e0_given[z] for z in partial.elements], dtype=np.float64)
        stats.update(_residuals(partial, e0))
        return stats
    singular = np.linalg.svd(partial.xtx, compute_uv=False)
    rank = int((singular > RANK_RTOL * singular.max()).sum())
    deficient = rank < len(partial.elements)
    if deficient:   # once per element set and process (a study builds several shard sets of one chemistry)
        warn_once(log, f"e0-rank:{partial.elements}:{rank}",
                  "E0 per element is not identifiable from the training set: element counts are collinear "
                  "(rank %d < %d elements %s; e.g. pure water always has n_H = 2 n_O). Using the minimum-norm "
                  "least-squares E0: it predicts structure energies of these compositions correctly, but the "
                  "split of the offset between elements is arbitrary; give isolated-atom energies with "
                  "`shards build --e0s FILE` to fix it.", rank, len(partial.elements), list(partial.elements))
    e0, *_ = np.linalg.lstsq(partial.xtx, partial.xty, rcond=RANK_RTOL)
    stats.update(e0={str(z): float(v) for z, v in zip(partial.elements, e0)}, e0_rank_deficient=bool(deficient),
                 **_residuals(partial, e0))
    return stats


def _residuals(partial: StatsPartial, e0: np.ndarray) -> dict:
    """Mean and std of the per-atom energy after subtracting E0 (vector on `partial.elements`)."""
    n = partial.structures
    mean = (partial.sum_a - partial.sum_u @ e0) / n
    mean_sq = (partial.sum_a2 - 2.0 * partial.sum_au @ e0 + e0 @ partial.sum_uu @ e0) / n
    return {"energy_per_atom_mean": float(mean), "energy_per_atom_std": float(np.sqrt(max(mean_sq - mean * mean, 0.0)))}


def pooled_stats(per_dataset: dict[str, dict], forces: StatsPartial, table: dict[int, float]) -> dict:
    """The top-level `stats` of several data sets: E0 = `table` (e0.merged_table), per-atom energy residuals
    pooled from each data set's own (every structure measured against its own data set's E0, which is what
    re-referencing to `table` gives), force RMS over all."""
    stats = finalize_stats(forces, table, "per-dataset")
    n = sum(d["structures"] for d in per_dataset.values() if d["energy_per_atom_mean"] is not None)
    stats["structures"] = sum(d["structures"] for d in per_dataset.values())
    stats["e0_rank_deficient"] = any(d["e0_rank_deficient"] for d in per_dataset.values())
    if n:
        s1 = s2 = 0.0
        for d in per_dataset.values():
            if d["energy_per_atom_mean"] is not None:
                m, sd, k = d["energy_per_atom_mean"], d["energy_per_atom_std"], d["structures"]
                s1, s2 = s1 + k * m, s2 + k * (sd * sd + m * m)
        mean = s1 / n
        stats.update(energy_per_atom_mean=mean, energy_per_atom_std=float(np.sqrt(max(s2 / n - mean * mean, 0.0))))
    return stats


def rereference_transform(manifest: dict, then=None):
    """The stream transform that puts every sample's energy on the manifest's model E0 table (e0.Rereference)."""
    stats = manifest.get("stats") or {}
    return Rereference(dataset_entries(manifest), {int(z): float(v) for z, v in (stats.get("e0") or {}).items()}, then)


def dataset_entries(manifest: dict) -> dict[str, dict]:
    """{name: {"e0": {Z: eV}, "e0_source", ...}} of a manifest; a version-1 manifest is one data set "" whose
    E0 is `stats.e0`."""
    if manifest.get("datasets"):   # in input order (json files keep keys sorted)
        ordered = sorted(manifest["datasets"].items(), key=lambda item: item[1].get("index", 0))
        return {name: {**entry, "e0": {int(z): float(v) for z, v in entry["e0"].items()}} for name, entry in ordered}
    stats = manifest.get("stats") or {}
    return {"": {"e0": {int(z): float(v) for z, v in (stats.get("e0") or {}).items()},
                 "e0_source": stats.get("e0_source", "fit")}}


# ---- shard locations: local paths, http(s):// URLs and `pipe:COMMAND` -------------------------------------

REMOTE_PREFIXES = ("http://", "https://")
PIPE_PREFIX = "pipe:"
NAME_FIELD = "{name}"   # in a base URL, replaced by the shard file name (`pipe:cat /data/{name}`)


def is_url(location: str) -> bool:
    return str(location).startswith(REMOTE_PREFIXES + (PIPE_PREFIX,))


def shard_url(base: str, name: str) -> str:
    """Where shard `name` lives: `base` with {name} filled in, else base/name (folder or URL prefix)."""
    if NAME_FIELD in base:
        return base.replace(NAME_FIELD, name)
    return base.rstrip("/") + "/" + name if is_url(base) else str(Path(base) / name)


def open_location(location: str):
    """A readable binary stream over a local file, an http(s) URL or the stdout of `pipe:COMMAND`."""
    location = str(location)
    if location.startswith(REMOTE_PREFIXES):

        return urllib.request.urlopen(location, timeout=60)
    if location.startswith(PIPE_PREFIX):

        proc = subprocess.Popen(shlex.split(location[len(PIPE_PREFIX):]), stdout=subprocess.PIPE)
        return _PipeStream(proc, location)
    return open(location, "rb")


class _PipeStream:
    """stdout of a shard command; closing waits for it and raises when it failed (never a silent short read)."""

    def __init__(self, proc, location: str):
        self.proc, self.location, self.reported = proc, location, False

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        if not data and n != 0:
            self._check()
        return data

    def _check(self) -> None:
        if self.proc.wait() != 0 and not self.reported:
            self.reported = True
            raise OSError(f"{self.location}: command exited with status {self.proc.returncode}")

    def close(self) -> None:
        if not self.proc.stdout.closed:
            while self.proc.stdout.read(1 << 20):   # drain: tar readers stop before the end padding
                pass
            self.proc.stdout.close()
        self._check()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_stream_manifest(location: str | Path, base_url: str | None = None) -> dict:
    """A manifest from a local folder/file or an http(s) URL; MANIFEST_DIR then holds where the shards are.

    `base_url` overrides the shard location (an http(s) prefix, a folder, or a template with {name} such as
    `pipe:cat /data/{name}`); by default shards sit next to the manifest. Local shard files are checked to
    exist only when neither the manifest nor the shards are remote.
    """
    location = str(location)
    if location.startswith(REMOTE_PREFIXES):
        url = location if location.endswith(".json") else location.rstrip("/") + "/" + MANIFEST_NAME
        with open_location(url) as f:
            manifest = parse_manifest(f.read(), url)
        manifest[MANIFEST_DIR] = url.rsplit("/", 1)[0]
    else:
        manifest = load_manifest(location, check_files=base_url is None)
    if base_url is not None:
        manifest[MANIFEST_DIR] = str(base_url)
    return manifest
