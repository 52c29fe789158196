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
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from webdataset import TarWriter

from data_shards import readers
from data_shards.frame import FrameError
from data_shards.manifest import (MANIFEST_NAME, QUARANTINE_NAME, SCHEMA_VERSION, SPLITS, STATS_SPLIT,
                                  StatsPartial, file_sha256, finalize_stats, load_manifest,
                                  write_json_atomic)
from data_shards.sample import encode_frame

SHARD_NAME = "shard-{:06d}.tar"
SHARD_PATTERN = re.compile(r"^shard-\d{6}\.tar$")
TMP_PATTERN = re.compile(r"^\.shard-\d{6}\.tar(\.json)?\.tmp-")
SIDECAR_SUFFIX = ".json"
SIDECAR_PATTERN = re.compile(r"^shard-\d{6}\.tar\.json$")
SIDECAR_VERSION = 1
TAR_MTIME = 0          # fixed member metadata so reruns give byte-identical tars
TAR_OWNER = "maskpot"
MAX_RETRIES = 3        # a chunk whose worker dies is rerun this many times
OBJECT_STORE_BYTES = 256 * 1024**2
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
AUTO_SPLIT = "by_fraction"

log = logging.getLogger(__name__)


class InputError(ValueError):
    """An input the user named cannot be used (missing path, bad prefix); one line, no traceback."""


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


@dataclass(frozen=True)
class InputSpec:
    path: str
    fmt: str
    frames: int
    split: str | None  # None: cut into blocks by split_fractions


@dataclass(frozen=True)
class Chunk:
    shard_index: int
    path: str
    fmt: str
    split: str
    start: int
    stop: int


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

    @property
    def name(self) -> str:
        return SHARD_NAME.format(self.chunk.shard_index)


def parse_input(text: str) -> tuple[str, str | None]:
    """`"train=PATH"` → (PATH, "train"); a plain path → (path, None). The path must exist."""
    split = None
    prefix, sep, rest = text.partition("=")
    if sep and prefix in SPLITS:
        split, text = prefix, rest
    if not Path(text).exists():
        raise InputError(f"input not found: {text}")
    return text, split


def split_ranges(frames: int, fractions: tuple[float, ...]) -> dict[str, tuple[int, int]]:
    """Contiguous blocks [start, stop) per split, in frame order (neighbouring MD frames stay together)."""
    bounds, acc = [0], 0.0
    for f in fractions:
        acc += f
        bounds.append(min(frames, round(frames * acc)))
    bounds[-1] = frames
    return {s: (bounds[i], bounds[i + 1]) for i, s in enumerate(SPLITS)}


def plan(cfg: BuildConfig) -> tuple[list[InputSpec], list[Chunk]]:
    """Inputs in the given order, each cut into its split blocks and those into ≤ shard_size chunks."""
    specs, chunks = [], []
    for text in cfg.inputs:
        path, split = parse_input(text)
        fmt = readers.detect_format(path)
        spec = InputSpec(path, fmt, readers.count_frames(path, fmt), split)
        specs.append(spec)
        ranges = {split: (0, spec.frames)} if split else split_ranges(spec.frames, cfg.split_fractions)
        for split_name, (start, stop) in ranges.items():
            for lo in range(start, stop, cfg.shard_size):
                chunks.append(Chunk(len(chunks), path, fmt, split_name, lo, min(stop, lo + cfg.shard_size)))
    return specs, chunks


def write_chunk(chunk: Chunk, out_dir: str, require_labels: bool) -> ChunkResult:
    """Read, validate and write one shard (the Ray task). Empty chunks (all quarantined) write no file."""
    result = ChunkResult(chunk)
    buffer, seen = io.BytesIO(), {}
    with TarWriter(buffer, user=TAR_OWNER, group=TAR_OWNER, mtime=TAR_MTIME, encoder=False) as writer:
        for item in readers.iter_frames(chunk.path, chunk.fmt, start=chunk.start, stop=chunk.stop):
            result.frames_read += 1
            try:
                if isinstance(item, FrameError):
                    raise item
                frame = item.validate(require_labels)
                sample = encode_frame(frame)
                key = sample["__key__"]
                if key in seen:
                    raise FrameError(frame.source, frame.index, "positions",
                                     f"duplicate of frame {seen[key]} in the same shard (key {key})")
            except FrameError as e:
                result.quarantine.append(e.as_record())
                continue
            seen[key] = frame.index
            writer.write(sample)
            result.samples += 1
            result.unlabelled += frame.energy is None or frame.forces is None
            result.atoms += frame.natoms
            for z, n in zip(*(a.tolist() for a in np.unique(frame.species, return_counts=True))):
                result.elements[z] = result.elements.get(z, 0) + n
            result.stats.add_frame(frame)
    expected = chunk.stop - chunk.start
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
    write_json_atomic(Path(out_dir) / (result.name + SIDECAR_SUFFIX), sidecar_record(result, require_labels))
    return result


def _input_stamp(path: str) -> list[int]:
    """(size, mtime_ns) of an input: a changed input invalidates the chunks finished from it."""
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def sidecar_record(result: ChunkResult, require_labels: bool) -> dict:
    st = result.stats
    return {
        "sidecar_version": SIDECAR_VERSION, "require_labels": require_labels,
        "chunk": {**result.chunk.__dict__, "input_stamp": _input_stamp(result.chunk.path)},
        "frames_read": result.frames_read, "samples": result.samples, "unlabelled": result.unlabelled,
        "atoms": result.atoms, "bytes": result.bytes, "sha256": result.sha256,
        "elements": {str(z): n for z, n in result.elements.items()},
        "stats": {"elements": list(st.elements), "structures": st.structures, "xtx": st.xtx.tolist(),
                  "xty": st.xty.tolist(), "sum_a": st.sum_a, "sum_a2": st.sum_a2, "sum_u": st.sum_u.tolist(),
                  "sum_au": st.sum_au.tolist(), "sum_uu": st.sum_uu.tolist(),
                  "force_sq": {str(z): v for z, v in st.force_sq.items()},
                  "force_atoms": {str(z): n for z, n in st.force_atoms.items()}},
        "quarantine": result.quarantine,
    }


def finished_chunk(chunk: Chunk, out_dir: str, require_labels: bool) -> ChunkResult | None:
    """The result of an earlier run's task for exactly this chunk when its sidecar and tar check out."""
    name = SHARD_NAME.format(chunk.shard_index)
    sidecar = Path(out_dir) / (name + SIDECAR_SUFFIX)
    try:
        rec = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    expected = {**chunk.__dict__, "input_stamp": _input_stamp(chunk.path)}
    if (rec.get("sidecar_version") != SIDECAR_VERSION or rec.get("require_labels") != require_labels
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
    return ChunkResult(chunk, rec["frames_read"], rec["samples"], rec["unlabelled"], rec["atoms"], rec["bytes"],
                       rec["sha256"], {int(z): n for z, n in rec["elements"].items()}, stats, rec["quarantine"])


def _run_serial(chunks, cfg, on_result) -> None:
    for chunk in chunks:
        on_result(write_chunk(chunk, cfg.out_dir, cfg.require_labels))


def _run_ray(chunks, cfg, on_result) -> None:
    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)
    import ray

    started_here = not ray.is_initialized()
    if started_here and cfg.ray_address:
        ray.init(address=cfg.ray_address, logging_level=logging.WARNING)
    elif started_here:
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False,
                 object_store_memory=OBJECT_STORE_BYTES, logging_level=logging.WARNING)
    try:
        task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(write_chunk)
        pending = [task.remote(chunk, cfg.out_dir, cfg.require_labels) for chunk in chunks]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                on_result(ray.get(ref))
    finally:
        if started_here:
            ray.shutdown()


def _version() -> str:
    try:
        return metadata.version("maskpot")
    except metadata.PackageNotFoundError:
        return "unknown"


def assemble_manifest(cfg: BuildConfig, specs: list[InputSpec], results: list[ChunkResult]) -> dict:
    written = [r for r in results if r.samples]
    elements: dict[int, int] = {}
    stats = StatsPartial()
    for r in written:
        for z, n in r.elements.items():
            elements[z] = elements.get(z, 0) + n
        if r.chunk.split == STATS_SPLIT:
            stats = stats.merge(r.stats)
    totals = {"frames_read": sum(r.frames_read for r in results),
              "samples_written": sum(r.samples for r in results),
              "quarantined": sum(len(r.quarantine) for r in results)}
    assert totals["frames_read"] == totals["samples_written"] + totals["quarantined"], totals
    return {
        "schema_version": SCHEMA_VERSION,
        "maskpot_version": _version(),
        "build": {"shard_size": cfg.shard_size, "split_fractions": list(cfg.split_fractions),
                  "require_labels": cfg.require_labels},
        "inputs": [{"path": s.path, "format": s.fmt, "frames": s.frames, "split": s.split or AUTO_SPLIT,
                    "ranges": {k: list(v) for k, v in
                               ({s.split: (0, s.frames)} if s.split else
                                split_ranges(s.frames, cfg.split_fractions)).items()}}
                   for s in specs],
        "shards": [{"name": r.name, "split": r.chunk.split, "samples": r.samples, "atoms": r.atoms,
                    "bytes": r.bytes, "sha256": r.sha256} for r in written],
        "splits": {s: {"samples": sum(r.samples for r in written if r.chunk.split == s),
                       "shards": sum(1 for r in written if r.chunk.split == s)} for s in SPLITS},
        "totals": totals,
        "elements": {str(z): elements[z] for z in sorted(elements)},
        "labelled": bool(written) and not any(r.unlabelled for r in written),
        "stats": finalize_stats(stats),
    }


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
                 use_ray: bool = True) -> dict:
    """Build shards + manifest.json + quarantine.jsonl in `out_dir`; returns the loaded manifest.

    `use_ray=False` runs the same chunk tasks one after another in this process (small builds, tests).
    """
    cfg = BuildConfig(tuple(str(i) for i in inputs), str(out_dir), shard_size, tuple(split_fractions),
                      ray_address, num_cpus, require_labels, progress, use_ray)
    specs, chunks = plan(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[ChunkResult] = []
    total_frames = sum(c.stop - c.start for c in chunks)
    bar = tqdm(total=total_frames, unit="frame", desc="shards", **({} if progress else {"disable": True}))
    t0 = time.perf_counter()

    def on_result(result: ChunkResult) -> None:
        results.append(result)
        bar.update(result.frames_read)
        bar.set_postfix_str(f"{len(results)}/{len(chunks)} chunks")

    todo = []
    for chunk in chunks:
        done = finished_chunk(chunk, cfg.out_dir, cfg.require_labels)
        if done is None:
            todo.append(chunk)
        else:
            on_result(done)
    if len(todo) < len(chunks):
        log.info("resuming: %d of %d chunks already finished in %s", len(chunks) - len(todo), len(chunks), out)
    try:
        if todo:
            (_run_ray if use_ray else _run_serial)(todo, cfg, on_result)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    results.sort(key=lambda r: r.chunk.shard_index)
    manifest = assemble_manifest(cfg, specs, results)
    _remove_stale(out, {s["name"] for s in manifest["shards"]}, {r.name for r in results})
    quarantine = "".join(json.dumps(rec, sort_keys=True) + "\n" for r in results for rec in r.quarantine)
    tmp = out / f".{QUARANTINE_NAME}.tmp-{os.getpid()}"
    tmp.write_text(quarantine)
    os.replace(tmp, out / QUARANTINE_NAME)
    write_json_atomic(out / MANIFEST_NAME, manifest)
    t = manifest["totals"]
    log.info("built %d shards from %d frames in %.1f s (%.0f frames/s); %d quarantined",
             len(manifest["shards"]), t["frames_read"], elapsed, t["frames_read"] / max(elapsed, 1e-9),
             t["quarantined"])
    if t["quarantined"]:
        log.warning("%d frame(s) failed validation; see %s", t["quarantined"], out / QUARANTINE_NAME)
    return load_manifest(out)
