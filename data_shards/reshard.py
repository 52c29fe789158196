"""`shards reshard SRC DST`: the same samples, the same splits, cut into a new number or size of shards.

Each split's samples keep their order (manifest shard order, then order inside each shard) and their member
bytes are copied verbatim, so every sample is byte-identical to the source. `num_shards` cuts every non-empty
split into min(N, samples) shards of near-equal sample counts (the first `samples mod N` get one more);
`max_shard_bytes` closes a shard before the next sample would make the tar larger than B bytes (a sample
larger than B alone forms a shard). New shards are numbered train, then val, then test. Tars are written
with the build's fixed member metadata, so a rerun is byte-identical. Source shards are checked against
their manifest sha256 as they are read. The new manifest keeps the source's inputs, totals, statistics and
duplicates, lists the new shards with sha256, and records `resharded_from`.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path
from typing import Iterator

from webdataset import TarWriter

from data_shards.build import SHARD_PATTERN, SIDECAR_PATTERN
from data_shards.chunk import SHARD_NAME, TAR_MTIME, TAR_OWNER
from data_shards.integrity import check_member_name
from data_shards.manifest import (
    MANIFEST_DIR,
    MANIFEST_NAME,
    QUARANTINE_NAME,
    SPLITS,
    ManifestError,
    file_sha256,
    load_manifest,
    shard_entries,
    write_json_atomic,
)
from data_shards.sample import JSON_NATOMS

BLOCK = 512
RECORD = 20 * BLOCK          # tarfile pads an archive to a multiple of this
END_OF_ARCHIVE = 2 * BLOCK
log = logging.getLogger(__name__)


def _member_bytes(size: int) -> int:
    return BLOCK + -(-size // BLOCK) * BLOCK


def tar_bytes(member_sizes_total_blocks: int) -> int:
    """Size of a tar whose members take `member_sizes_total_blocks` bytes (headers + padded data)."""
    return -(-(member_sizes_total_blocks + END_OF_ARCHIVE) // RECORD) * RECORD


def _sample_bytes(sample: dict) -> int:
    return sum(_member_bytes(len(v)) for k, v in sample.items() if k != "__key__")


def read_shard_samples(path: Path, sha256: str) -> Iterator[dict]:
    """{"__key__", ext: bytes} per sample in file order, after checking the whole shard's sha256."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ManifestError(f"{path}: sha256 {digest[:16]}… does not match the manifest's {sha256[:16]}…; "
                            f"run `maskpot shards verify` on the source")
    sample: dict | None = None
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            check_member_name(member.name, str(path))   # `../x.npz`, `a/b.npz`, `k.v.npz`: refused
            key, _, ext = member.name.partition(".")
            if sample is not None and sample["__key__"] != key:
                yield sample
                sample = None
            if sample is None:
                sample = {"__key__": key}
            sample[ext] = tar.extractfile(member).read()
    if sample is not None:
        yield sample


def _groups(samples: Iterator[dict], total: int, num_shards: int | None,
            max_shard_bytes: int | None) -> Iterator[list[dict]]:
    group, used = [], 0
    if num_shards is not None:
        k = min(num_shards, total)
        sizes = [total // k + (i < total % k) for i in range(k)] if k else []
        for sample in samples:
            group.append(sample)
            if sizes and len(group) == sizes[0]:
                yield group
                group, sizes = [], sizes[1:]
    else:
        for sample in samples:
            size = _sample_bytes(sample)
            if group and tar_bytes(used + size) > max_shard_bytes:
                yield group
                group, used = [], 0
            if tar_bytes(size) > max_shard_bytes:
                log.warning("sample %s alone makes a %d-byte tar, more than max_shard_bytes=%d; it gets a "
                            "shard of its own", sample["__key__"], tar_bytes(size), max_shard_bytes)
            group.append(sample)
            used += size
    if group:
        yield group


def _write_tar(samples: list[dict], path: Path) -> dict:
    buffer = io.BytesIO()
    with TarWriter(buffer, user=TAR_OWNER, group=TAR_OWNER, mtime=TAR_MTIME, encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    data = buffer.getvalue()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    atoms = sum(int(json.loads(s["json"])[JSON_NATOMS]) for s in samples)
    return {"name": path.name, "samples": len(samples), "atoms": atoms, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def reshard(src: str | Path, dst: str | Path, num_shards: int | None = None,
            max_shard_bytes: int | None = None) -> dict:
    """Rewrite the shard set in `src` into `dst` (a different folder); returns the new manifest."""
    if (num_shards is None) == (max_shard_bytes is None):
        raise ValueError("give exactly one of num_shards (shards per split) or max_shard_bytes (bytes per shard)")
    if num_shards is not None and num_shards < 1:
        raise ValueError(f"num_shards must be >= 1 (shards per split), got {num_shards}")
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1 byte, got {max_shard_bytes}")
    source = load_manifest(src)
    folder, out = Path(source[MANIFEST_DIR]), Path(dst)
    if out.resolve() == folder:
        raise ValueError(f"{dst}: reshard needs a destination other than the source folder")
    out.mkdir(parents=True, exist_ok=True)
    shards, written = [], set()
    try:
        _write_splits(source, folder, out, num_shards, max_shard_bytes, shards, written)
    except BaseException:
        for name in written:   # no partial shard set left behind
            (out / name).unlink(missing_ok=True)
        for tmp in out.glob(".shard-*.tar.tmp-*"):
            tmp.unlink()
        raise
    for p in out.iterdir():
        if SIDECAR_PATTERN.match(p.name) or (SHARD_PATTERN.match(p.name) and p.name not in written):
            p.unlink()
    manifest = copy.deepcopy({k: v for k, v in source.items() if k != MANIFEST_DIR})
    manifest["shards"] = shards
    manifest["splits"] = {s: {"samples": sum(x["samples"] for x in shards if x["split"] == s),
                              "shards": sum(1 for x in shards if x["split"] == s)} for s in SPLITS}
    manifest["resharded_from"] = {"folder": str(folder), "manifest_sha256": file_sha256(folder / MANIFEST_NAME),
                                  "num_shards": num_shards, "max_shard_bytes": max_shard_bytes}
    if (folder / QUARANTINE_NAME).is_file():
        shutil.copyfile(folder / QUARANTINE_NAME, out / QUARANTINE_NAME)
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return load_manifest(out)


def _write_splits(source: dict, folder: Path, out: Path, num_shards: int | None, max_shard_bytes: int | None,
                  shards: list, written: set) -> None:
    """Every split's samples into new tars in `out`; appends to `shards` / `written` as it goes."""
    for split in SPLITS:
        entries = shard_entries(source, split)
        samples = (s for e in entries for s in read_shard_samples(folder / e["name"], e["sha256"]))
        total = sum(e["samples"] for e in entries)
        for group in _groups(samples, total, num_shards, max_shard_bytes):
            name = SHARD_NAME.format(len(shards))
            written.add(name)
            shards.append({**_write_tar(group, out / name), "split": split})
        got = sum(s["samples"] for s in shards if s["split"] == split)
        if got != total:
            raise ManifestError(f"{folder}: split {split} holds {got} samples in its shards, manifest says {total}")
