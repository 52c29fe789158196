"""Integrity on read: per-sample checksums written at build time, checked whenever samples are streamed.

Every sample's json member carries `checksum`: sha256 (first 32 hex) over the npz member's bytes and the
canonical json of the other fields, so one changed digit in an energy or one flipped bit in a position is
caught when the sample is decoded, wherever the shard came from (a wrong manifest sha256 cannot hide it).
Policy (`ShardStream(integrity=...)`, default from MASKPOT_INTEGRITY, else "fatal"):
  fatal: the first bad sample stops the stream with SampleIntegrityError (one line: shard, key, what);
  skip:  bad samples are left out, counted (`ShardStream.integrity_skipped`) and logged;
  off:   no check (shards built before checksums existed).
Tar members must be plain sample names (`<key>.<ext>`, no path components): `../x.npz` is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re

CHECKSUM_FIELD = "checksum"
CHECKSUM_HEX = 32
POLICIES = ("fatal", "skip", "off")
POLICY_ENV = "MASKPOT_INTEGRITY"
DEFAULT_POLICY = "fatal"
MEMBER_NAME = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9]+$")
log = logging.getLogger("data_shards.integrity")


class SampleIntegrityError(ValueError):
    """A sample whose bytes do not match its checksum (or that has none under the fatal policy)."""


class ShardReadError(ValueError):
    """A shard that cannot be read as a tar of samples (truncated, corrupt, unsafe member names)."""


def policy(value: str | None = None) -> str:
    """`value`, else $MASKPOT_INTEGRITY, else "fatal"; ValueError listing the policies otherwise."""
    chosen = value if value is not None else os.environ.get(POLICY_ENV, DEFAULT_POLICY)
    if chosen not in POLICIES:
        source = "integrity" if value is not None else POLICY_ENV
        raise ValueError(f"{source}={chosen!r}: unknown integrity policy; valid: {list(POLICIES)}")
    return chosen


def checksum(npz: bytes, meta: dict) -> str:
    """Over the npz bytes and the canonical json of `meta` (without its own checksum field)."""
    h = hashlib.sha256(npz)
    h.update(json.dumps({k: v for k, v in meta.items() if k != CHECKSUM_FIELD}, sort_keys=True).encode("utf-8"))
    return h.hexdigest()[:CHECKSUM_HEX]


def sample_problem(raw: dict) -> str | None:
    """Why a raw sample ({"__key__", "npz", "json"} bytes) fails its checksum, or None when it matches."""
    try:
        meta = json.loads(raw["json"])
    except (KeyError, ValueError) as e:
        return f"json member unreadable ({type(e).__name__})"
    if not isinstance(meta, dict) or CHECKSUM_FIELD not in meta:
        return ("no checksum (shards built before per-sample checksums: rebuild them, or set "
                f"{POLICY_ENV}=off)")
    if "npz" not in raw:
        return "npz member missing"
    if checksum(raw["npz"], meta) != meta[CHECKSUM_FIELD]:
        return "checksum mismatch (the sample's bytes changed after it was built)"
    return None


def where(raw: dict) -> str:
    return f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')}"


def check_sample(raw: dict, mode: str) -> bool:
    """True to use the sample; False to skip it (policy "skip"); SampleIntegrityError under "fatal"."""
    if mode == "off":
        return True
    problem = sample_problem(raw)
    if problem is None:
        return True
    if mode == "fatal":
        raise SampleIntegrityError(f"{where(raw)}: {problem} ({POLICY_ENV}=skip leaves such samples out)")
    log.warning("%s: %s; sample skipped", where(raw), problem)
    return False


def check_member_name(name: str, shard: str) -> None:
    """ShardReadError unless `name` is a plain `<key>.<ext>` (no directories, no `..`)."""
    if not MEMBER_NAME.match(name):
        raise ShardReadError(f"{shard}: tar member {name!r} is not a plain sample name <key>.<ext> "
                             f"(path components and odd names are refused)")


def checked_members(samples, handler_url=lambda s: s.get("__url__", "?")):
    """Pipeline stage over tar members ({"fname", "data", "__url__"}): refuses unsafe member names."""
    for member in samples:
        if "fname" in member:
            check_member_name(member["fname"], handler_url(member))
        yield member


def shard_read_error(exn: Exception) -> bool:
    """webdataset handler: a tar that cannot be read becomes one ShardReadError naming the shard."""
    if isinstance(exn, ValueError) and not type(exn).__module__.startswith("tarfile"):
        raise exn
    url = next((a for a in reversed(exn.args) if isinstance(a, str) and ("/" in a or a.endswith(".tar"))), "?")
    first = str(exn.args[0]) if exn.args else type(exn).__name__
    raise ShardReadError(f"{url}: unreadable shard ({type(exn).__name__}: {first.splitlines()[0][:200]}); "
                         f"run `maskpot shards verify` on its folder") from None
