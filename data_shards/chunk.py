"""One build chunk (a Ray task): read, convert, validate and write one shard, plus its resumable sidecar.

A chunk's tar depends only on its frames and on the set of frame positions it drops as duplicates, so
the driver can rewrite a chunk with a larger drop set (duplicates of frames in earlier chunks) and any
rerun gives the same bytes. The sidecar `shard-%06d.tar.json` records the summary, every valid frame's
key (so the driver can decide duplicates without rereading) and the positions actually dropped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import vesin
from webdataset import TarWriter

from data_shards import readers
from data_shards.e0 import is_isolated_atom
from data_shards.frame import FrameError
from data_shards.manifest import StatsPartial, file_sha256, write_json_atomic
from data_shards.sample import encode_frame
from data_shards.units import check_plausible, convert, declared_units, reader_options

SHARD_NAME = "shard-{:06d}.tar"
SIDECAR_SUFFIX = ".json"
SIDECAR_VERSION = 3
TAR_MTIME = 0          # fixed member metadata so reruns give byte-identical tars
TAR_OWNER = "maskpot"
KEYED_FORMATS = ("extxyz", "asedb")   # readers that take energy_key / forces_key / stress_key
LABELS = ("energy", "forces", "stress")

log = logging.getLogger("data_shards.build")


class InputError(ValueError):
    """An input the user named cannot be used (missing path, bad prefix); one line, no traceback."""


@dataclass(frozen=True)
class ChunkOptions:
    """Build options every chunk task needs; a sidecar is reused only when they are equal."""
    require_labels: bool = True
    stats_cutoff: float = 5.0     # Å, for the mean neighbour count
    units: str | None = None      # None: each format's default
    energy_key: str | None = None  # label field names (extxyz, asedb); None: what ASE finds (energy, forces, stress)
    forces_key: str | None = None
    stress_key: str | None = None

    def reader_options(self, fmt: str) -> dict:
        opts = reader_options(fmt, self.units)
        if fmt in KEYED_FORMATS:
            opts.update({f"{label}_key": value for label, value in self.label_keys().items() if value is not None})
        return opts

    def label_keys(self) -> dict[str, str | None]:
        return {"energy": self.energy_key, "forces": self.forces_key, "stress": self.stress_key}


@dataclass(frozen=True)
class Chunk:
    shard_index: int
    path: str
    fmt: str
    split: str
    start: int
    stop: int
    drop: tuple[int, ...] = ()    # frame positions in `path` to leave out (duplicates of earlier frames)
    select: tuple[int, ...] = ()  # only these positions of [start, stop) (a shuffled split); () = all
    dataset: str = ""             # the data set of the input (its own E0); stored with every sample

    def plain(self) -> dict:
        """JSON-comparable identity (no `drop`; `select` only when set, so older sidecars still match)."""
        plain = {k: v for k, v in self.__dict__.items() if k not in ("drop", "select")}
        return {**plain, "select": list(self.select)} if self.select else plain


@dataclass
class ChunkResult:
    chunk: Chunk
    frames_read: int = 0
    samples: int = 0
    unlabelled: int = 0
    atoms: int = 0
    bytes: int = 0
    sha256: str = ""
    elements: dict[int, int] = field(default_factory=dict)
    stats: StatsPartial = field(default_factory=StatsPartial)
    quarantine: list[dict] = field(default_factory=list)
    keys: list[list] = field(default_factory=list)        # [key, position, "source:index"] per valid frame
    dropped: list[int] = field(default_factory=list)      # positions left out as duplicates
    neighbour_pairs: int = 0                               # directed pairs within stats_cutoff
    periodic: int = 0                                      # samples with any periodic direction
    natoms_histogram: dict[int, int] = field(default_factory=dict)
    labels_found: dict[str, int] = field(default_factory=dict)  # frames carrying energy / forces / stress
    isolated: list[list] = field(default_factory=list)          # [Z, E0 eV, "source:index"] isolated-atom frames

    @property
    def name(self) -> str:
        return SHARD_NAME.format(self.chunk.shard_index)


def count_neighbours(frame, cutoff: float) -> int:
    """Directed pairs (periodic images included) closer than `cutoff` Å."""
    box = np.asarray(frame.cell, dtype=np.float64) if np.any(frame.pbc) else np.zeros((3, 3))
    (i,) = vesin.NeighborList(cutoff=float(cutoff), full_list=False).compute(
        np.asarray(frame.positions, dtype=np.float64), box, np.asarray(frame.pbc, dtype=bool).tolist(), "i")
    return 2 * int(len(i))


def _account(result: ChunkResult, frame, cutoff: float) -> None:
    result.samples += 1
    result.unlabelled += frame.energy is None or frame.forces is None
    result.atoms += frame.natoms
    for z, n in zip(*(a.tolist() for a in np.unique(frame.species, return_counts=True))):
        result.elements[z] = result.elements.get(z, 0) + n
    result.stats.add_frame(frame)
    result.neighbour_pairs += count_neighbours(frame, cutoff)
    result.periodic += bool(np.any(frame.pbc))
    result.natoms_histogram[frame.natoms] = result.natoms_histogram.get(frame.natoms, 0) + 1


def write_chunk(chunk: Chunk, out_dir: str, options: ChunkOptions) -> ChunkResult:
    """Read, validate and write one shard (the Ray task). Empty chunks (all quarantined) write no file.

    A frame whose key already occurred earlier in this chunk, or whose position is in `chunk.drop`, is
    counted in `dropped` instead of written."""
    result = ChunkResult(chunk)
    buffer, seen, drop, select = io.BytesIO(), set(), set(chunk.drop), set(chunk.select)
    declared = declared_units(chunk.fmt, options.units)
    items = readers.iter_frames(chunk.path, chunk.fmt, start=chunk.start, stop=chunk.stop,
                                **options.reader_options(chunk.fmt))
    result.labels_found = dict.fromkeys(LABELS, 0)
    with TarWriter(buffer, user=TAR_OWNER, group=TAR_OWNER, mtime=TAR_MTIME, encoder=False) as writer:
        for position, item in enumerate(items, start=chunk.start):
            if select and position not in select:
                continue
            result.frames_read += 1
            try:
                if isinstance(item, FrameError):
                    raise item
                for label in LABELS:
                    result.labels_found[label] += getattr(item, label) is not None
                if is_isolated_atom(item):   # an E0 reference (MACE convention), not a training sample
                    e = convert(item, chunk.fmt, options.units)
                    result.isolated.append([int(e.species[0]), float(e.energy), f"{e.source}:{e.index}"])
                    continue
                frame = check_plausible(convert(item, chunk.fmt, options.units).validate(options.require_labels),
                                        declared)
                sample = encode_frame(frame, chunk.dataset)
            except FrameError as e:
                result.quarantine.append(e.as_record())
                continue
            key = sample["__key__"]
            result.keys.append([key, position, f"{frame.source}:{frame.index}"])
            if key in seen or position in drop:
                result.dropped.append(position)
                continue
            seen.add(key)
            writer.write(sample)
            _account(result, frame, options.stats_cutoff)
    expected = len(select) if select else chunk.stop - chunk.start
    if result.frames_read != expected:
        raise InputError(f"{chunk.path}: frames {chunk.start}..{chunk.stop} were counted ({expected}) "
                         f"but the reader yielded {result.frames_read}")
    if result.samples:
        data = buffer.getvalue()
        result.bytes, result.sha256 = len(data), hashlib.sha256(data).hexdigest()
        final = Path(out_dir) / result.name
        tmp = final.with_name(f".{result.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, final)
    write_json_atomic(Path(out_dir) / (result.name + SIDECAR_SUFFIX), sidecar_record(result, options))
    return result


def _input_stamp(path: str) -> list[int]:
    """(size, mtime_ns) of an input: a changed input invalidates the chunks finished from it."""
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def sidecar_record(result: ChunkResult, options: ChunkOptions) -> dict:
    """Depends on the chunk, its input and the positions dropped, not on how `chunk.drop` was reached."""
    st = result.stats
    return {
        "sidecar_version": SIDECAR_VERSION, "options": options.__dict__,
        "chunk": {**result.chunk.plain(), "input_stamp": _input_stamp(result.chunk.path)},
        "frames_read": result.frames_read, "samples": result.samples, "unlabelled": result.unlabelled,
        "atoms": result.atoms, "bytes": result.bytes, "sha256": result.sha256,
        "elements": {str(z): n for z, n in result.elements.items()},
        "stats": {"elements": list(st.elements), "structures": st.structures, "xtx": st.xtx.tolist(),
                  "xty": st.xty.tolist(), "sum_a": st.sum_a, "sum_a2": st.sum_a2, "sum_u": st.sum_u.tolist(),
                  "sum_au": st.sum_au.tolist(), "sum_uu": st.sum_uu.tolist(),
                  "force_sq": {str(z): v for z, v in st.force_sq.items()},
                  "force_atoms": {str(z): n for z, n in st.force_atoms.items()}},
        "quarantine": result.quarantine, "labels_found": result.labels_found, "isolated": result.isolated,
        "keys": result.keys, "dropped": sorted(result.dropped),
        "structure": {"neighbour_pairs": result.neighbour_pairs, "periodic": result.periodic,
                      "natoms_histogram": {str(n): c for n, c in sorted(result.natoms_histogram.items())}},
    }


def finished_chunk(chunk: Chunk, out_dir: str, options: ChunkOptions) -> ChunkResult | None:
    """An earlier run's result for this chunk (any drop set) when its sidecar and tar check out."""
    name = SHARD_NAME.format(chunk.shard_index)
    sidecar = Path(out_dir) / (name + SIDECAR_SUFFIX)
    try:
        rec = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    expected = {**chunk.plain(), "input_stamp": _input_stamp(chunk.path)}
    if (rec.get("sidecar_version") != SIDECAR_VERSION or rec.get("options") != options.__dict__
            or rec.get("chunk") != expected):
        return None
    tar = Path(out_dir) / name
    if rec["samples"] and (not tar.is_file() or tar.stat().st_size != rec["bytes"]
                           or file_sha256(tar) != rec["sha256"]):
        log.warning("%s: does not match its sidecar (sha256/size); rebuilding it", tar)
        return None
    s = rec["stats"]
    k = len(s["elements"])
    stats = StatsPartial(tuple(s["elements"]), s["structures"], np.array(s["xtx"], dtype=np.float64).reshape(k, k),
                         np.array(s["xty"], dtype=np.float64), s["sum_a"], s["sum_a2"],
                         np.array(s["sum_u"], dtype=np.float64), np.array(s["sum_au"], dtype=np.float64),
                         np.array(s["sum_uu"], dtype=np.float64).reshape(k, k),
                         {int(z): v for z, v in s["force_sq"].items()},
                         {int(z): n for z, n in s["force_atoms"].items()})
    structure = rec["structure"]
    return ChunkResult(dataclasses.replace(chunk, drop=tuple(rec["dropped"])), rec["frames_read"],
                       rec["samples"], rec["unlabelled"], rec["atoms"], rec["bytes"], rec["sha256"],
                       {int(z): n for z, n in rec["elements"].items()}, stats, rec["quarantine"],
                       [list(k) for k in rec["keys"]], list(rec["dropped"]), structure["neighbour_pairs"],
                       structure["periodic"], {int(n): c for n, c in structure["natoms_histogram"].items()},
                       dict(rec["labels_found"]), [list(i) for i in rec["isolated"]])
