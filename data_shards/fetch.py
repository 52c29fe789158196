"""`maskpot data fetch NAME --out DIR`: download a registered data set, check its sha256, shard it.

Layout of DIR: `download/<file>` (kept; a rerun with a matching sha256 does not download again),
`raw/<member>` when the download is an archive, `shards/` (build_shards output) and `dataset.json` (the
registry entry, the URL used and the verified sha256). Any URL urllib opens works (https://, file://).
"""
from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from data_shards.manifest import file_sha256, write_json_atomic
from data_shards.registry_sets import REGISTRY, DataSet, get

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 120
log = logging.getLogger(__name__)


class FetchError(ValueError):
    """A download that cannot be used (no URL, sha256 mismatch or not pinned, missing archive member)."""


def _download(url: str, dest: Path) -> str:
    """Stream `url` to `dest` (tmp name + rename); returns its sha256."""
    h = hashlib.sha256()
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(tmp, "wb") as f:
            while block := response.read(CHUNK_BYTES):
                h.update(block)
                f.write(block)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{url}: download failed: {e}") from e
    os.replace(tmp, dest)
    return h.hexdigest()


def _extract(archive: Path, member: str, dest_dir: Path) -> Path:
    """Only `member`, written under dest_dir by its base name (never a path taken from the archive)."""
    dest = dest_dir / Path(member).name
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tar:
            try:
                f = tar.extractfile(member)
            except KeyError:
                f = None
            data = f.read() if f is not None else None
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            data = z.read(member) if member in z.namelist() else None
    else:
        raise FetchError(f"{archive}: the data set names member {member!r} but the download is not a tar or zip")
    if data is None:
        raise FetchError(f"{archive}: archive has no file {member!r}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return dest


def fetch(name: str, out_dir: str | Path, url_override: str | None = None, sha256: str | None = None,
          registry: dict[str, DataSet] | None = None, shard_size: int = 1000, use_ray: bool = True,
          split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), progress: bool = True) -> dict:
    """Download, verify and shard data set `name`; returns the shard manifest."""
    from data_shards.build import build_shards  # startup: imports torch (+7 s); kept off the maskpot CLI start

    entry = get(name, registry)
    url = url_override or entry.url
    if url is None:
        raise FetchError(f"data set {name}: no download URL is recorded; pass --url-override URL")
    expected = (sha256 or entry.sha256 or "").lower() or None
    out = Path(out_dir)
    (out / "download").mkdir(parents=True, exist_ok=True)
    file_name = Path(urllib.parse.urlparse(url).path).name or name
    dest = out / "download" / file_name
    if dest.is_file() and expected is not None and file_sha256(dest) == expected:
        digest = expected
        log.info("%s: already downloaded, sha256 matches", dest)
    else:
        log.info("downloading %s → %s", url, dest)
        digest = _download(url, dest)
    if expected is None:
        raise FetchError(f"data set {name}: no sha256 is pinned; the downloaded {dest} has sha256 {digest}. "
                         f"Check the file, then rerun with --sha256 {digest}")
    if digest != expected:
        raise FetchError(f"{dest} (from {url}): sha256 {digest} does not match the expected {expected}; "
                         f"the file was kept for inspection")
    data_file = _extract(dest, entry.member, out / "raw") if entry.member else dest
    manifest = build_shards([str(data_file)], str(out / "shards"), shard_size=shard_size,
                            split_fractions=split_fractions, use_ray=use_ray, progress=progress, units=entry.units)
    write_json_atomic(out / "dataset.json", {**entry.__dict__, "url_used": url, "sha256_verified": digest,
                                             "data_file": str(data_file)})
    return manifest


def _fetch_cmd(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    m = fetch(args.name, args.out, url_override=args.url_override, sha256=args.sha256,
              shard_size=args.shard_size, use_ray=not args.serial)
    t = m["totals"]
    print(f"{args.name}: {t['samples_written']} samples in {len(m['shards'])} shards under "
          f"{Path(args.out) / 'shards'}; {t['quarantined']} quarantined, {t['duplicates']} duplicates")
    return 0


def _list_cmd(args) -> int:
    for s in REGISTRY.values():
        pinned = "pinned" if s.url and s.sha256 else ("no URL" if not s.url else "sha256 not pinned")
        print(f"{s.name}: {s.description} [{s.format}, {s.units}, {s.license}; {pinned}]\n    {s.citation}")
    return 0


def add_command(subparsers, positive_int) -> None:
    data = subparsers.add_parser("data", help="download public DFT data sets and shard them")
    actions = data.add_subparsers(dest="action", metavar="ACTION", required=True)
    f = actions.add_parser("fetch", help="download a registered data set, verify its sha256 and build shards",
                           description=__doc__.split("\n\n", 1)[1])
    f.add_argument("name", metavar="NAME", help="data set name (see `maskpot data list`)")
    f.add_argument("--out", required=True, help="folder for download/, raw/, shards/ and dataset.json")
    f.add_argument("--url-override", default=None,
                   help="download from this URL instead (a mirror or file:// copy; default: the registry's URL)")
    f.add_argument("--sha256", default=None,
                   help="expected sha256 of the download (default: the registry's pinned value)")
    f.add_argument("--shard-size", type=positive_int, default=1000, help="maximum frames per shard (default: 1000)")
    f.add_argument("--serial", action="store_true", help="build shards without Ray (default: use Ray)")
    f.set_defaults(func=_fetch_cmd)
    ls = actions.add_parser("list", help="list the registered data sets (units, license, citation)")
    ls.set_defaults(func=_list_cmd)
