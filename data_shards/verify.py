"""`maskpot shards verify`: every shard re-hashed against the manifest, every sample read back.

Per shard: present, size and sha256 as in the manifest (`manifest.verify_shards`), then every tar member
name plain (`<key>.<ext>`), every sample's checksum matching (data_shards.integrity), every sample decoded
(npz without pickle, json) with consistent shapes and finite values, and the sample count as in the
manifest. Returns one line per problem.
"""
from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

import numpy as np

from data_shards import keys as K
from data_shards.integrity import ShardReadError, check_member_name, sample_problem
from data_shards.manifest import MANIFEST_DIR, load_manifest, verify_shards
from data_shards.sample import decode_sample


def _samples(path: Path):
    """{"__key__", ext: bytes} per sample of a local tar, in file order."""
    sample = None
    with tarfile.open(path) as tar:
        for member in tar:
            check_member_name(member.name, str(path))
            key, _, ext = member.name.partition(".")
            if sample is not None and sample["__key__"] != key:
                yield sample
                sample = None
            sample = sample or {"__key__": key, "__url__": str(path)}
            sample[ext] = tar.extractfile(member).read()
    if sample is not None:
        yield sample


def decoded_problem(raw: dict) -> str | None:
    """Why a sample cannot be decoded into consistent, finite arrays, or None."""
    try:
        s = decode_sample(raw)
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
        return f"cannot decode ({type(e).__name__}: {e})"
    n = len(s[K.SPECIES])
    if s[K.POSITIONS].shape != (n, 3) or (s[K.FORCES] is not None and s[K.FORCES].shape != (n, 3)):
        return f"shapes disagree: species {s[K.SPECIES].shape}, positions {s[K.POSITIONS].shape}"
    arrays = [s[K.POSITIONS], s[K.CELL]] + ([s[K.FORCES]] if s[K.FORCES] is not None else [])
    if not all(np.isfinite(a).all() for a in arrays) or (s[K.ENERGY] is not None and not np.isfinite(s[K.ENERGY])):
        return "non-finite values"
    return None


def verify_all(dir_or_file: str | Path) -> tuple[list[str], int]:
    """(problem lines, samples checked) over every shard of the manifest."""
    problems = verify_shards(dir_or_file)
    manifest = load_manifest(dir_or_file, check_files=False)
    folder, checked = Path(manifest[MANIFEST_DIR]), 0
    for shard in manifest["shards"]:
        path = folder / shard["name"]
        if not path.is_file():
            continue
        count = 0
        try:
            for raw in _samples(path):
                count += 1
                problem = sample_problem(raw) or decoded_problem(raw)
                if problem:
                    problems.append(f"{shard['name']}: sample {raw['__key__']}: {problem}")
        except (tarfile.TarError, ShardReadError, OSError, EOFError) as e:
            problems.append(f"{shard['name']}: unreadable after {count} samples ({type(e).__name__}: {e})")
        checked += count
        if count != shard["samples"]:
            problems.append(f"{shard['name']}: {count} samples read, manifest says {shard['samples']}")
    return problems, checked
