"""`maskpot data fetch`: file:// downloads, sha256 checks, archive members, sharding; no network needed."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import ase.io
import pytest

from data_shards.cli import main as cli_main
from data_shards.fetch import FetchError, fetch
from data_shards.registry_sets import REGISTRY, DataSet, get
from tests.helpers.water_systems import water_atoms


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def xyz(tmp_path) -> Path:
    path = tmp_path / "mirror" / "water.xyz"
    path.parent.mkdir()
    ase.io.write(path, water_atoms(6, seed=62), format="extxyz")
    return path


def _entry(sha256: str | None, member: str | None = None) -> DataSet:
    return DataSet("tiny", "six water boxes", None, sha256, "extxyz", "angstrom_ev", "CC0", "test", member)


def test_fetch_file_url_verifies_and_shards_and_reuses_the_download(xyz, tmp_path):
    registry = {"tiny": _entry(_sha(xyz))}
    out = tmp_path / "out"
    m = fetch("tiny", out, url_override=xyz.as_uri(), registry=registry, shard_size=4, use_ray=False, progress=False)
    assert m["totals"]["samples_written"] == 6 and len(m["shards"]) >= 2
    info = json.loads((out / "dataset.json").read_text())
    assert info["sha256_verified"] == _sha(xyz) and info["url_used"] == xyz.as_uri() and info["license"] == "CC0"
    download = out / "download" / "water.xyz"
    assert download.read_bytes() == xyz.read_bytes()
    stamp = download.stat().st_mtime_ns
    again = fetch("tiny", out, url_override=xyz.as_uri(), registry=registry, shard_size=4, use_ray=False,
                  progress=False)
    assert download.stat().st_mtime_ns == stamp and again["shards"] == m["shards"]


def test_sha256_mismatch_and_unpinned_entries_are_refused(xyz, tmp_path):
    with pytest.raises(FetchError, match="does not match the expected 0000"):
        fetch("tiny", tmp_path / "a", url_override=xyz.as_uri(), registry={"tiny": _entry("0" * 64)},
              use_ray=False, progress=False)
    assert not (tmp_path / "a" / "shards").exists()
    with pytest.raises(FetchError, match=f"no sha256 is pinned.*--sha256 {_sha(xyz)}"):
        fetch("tiny", tmp_path / "b", url_override=xyz.as_uri(), registry={"tiny": _entry(None)},
              use_ray=False, progress=False)
    m = fetch("tiny", tmp_path / "b", url_override=xyz.as_uri(), sha256=_sha(xyz), registry={"tiny": _entry(None)},
              use_ray=False, progress=False)
    assert m["totals"]["samples_written"] == 6
    with pytest.raises(FetchError, match="no download URL"):
        fetch("tiny", tmp_path / "c", registry={"tiny": _entry(None)}, use_ray=False)
    with pytest.raises(FetchError, match="download failed"):
        fetch("tiny", tmp_path / "d", url_override=(tmp_path / "nope.xyz").as_uri(),
              registry={"tiny": _entry(None)}, use_ray=False)
    with pytest.raises(ValueError, match="unknown data set 'nope'.*rmd17_ethanol"):
        get("nope")


def test_member_of_a_tar_archive_is_extracted_by_base_name(xyz, tmp_path):
    archive = tmp_path / "mirror" / "sets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(xyz, arcname="sets/water/water.xyz")
        tar.addfile(tarfile.TarInfo("../evil.txt"), io.BytesIO(b""))
    registry = {"tiny": _entry(_sha(archive), member="sets/water/water.xyz")}
    m = fetch("tiny", tmp_path / "out", url_override=archive.as_uri(), registry=registry, use_ray=False,
              progress=False)
    assert (tmp_path / "out" / "raw" / "water.xyz").read_bytes() == xyz.read_bytes()
    assert m["totals"]["samples_written"] == 6 and not (tmp_path / "evil.txt").exists()
    bad = {"tiny": _entry(_sha(archive), member="sets/other.xyz")}
    with pytest.raises(FetchError, match="archive has no file 'sets/other.xyz'"):
        fetch("tiny", tmp_path / "out2", url_override=archive.as_uri(), registry=bad, use_ray=False)


def test_registry_entries_are_complete():
    assert {"rmd17_ethanol", "water_rpbe_morawietz", "water_revpbe0_cheng"} <= set(REGISTRY)
    for s in REGISTRY.values():
        assert s.citation and s.license and s.format in ("extxyz", "n2p2")
        assert s.sha256 is None or len(s.sha256) == 64


def test_cli_fetch_and_list(xyz, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(REGISTRY, "tiny", _entry(_sha(xyz)))
    assert cli_main(["data", "fetch", "tiny", "--url-override", xyz.as_uri(), "--out", str(tmp_path / "o"),
                     "--serial"]) == 0
    assert "tiny: 6 samples" in capsys.readouterr().out
    assert cli_main(["data", "fetch", "tiny", "--url-override", xyz.as_uri(), "--out", str(tmp_path / "p"),
                     "--sha256", "1" * 64, "--serial"]) == 2
    assert "does not match" in capsys.readouterr().err
    assert cli_main(["data", "list"]) == 0
    assert "rmd17_ethanol" in capsys.readouterr().out


@pytest.mark.slow
def test_fetch_rmd17_ethanol_from_a_local_copy_matches_the_pinned_sha256(shared_data, tmp_path):
    copy = shared_data / "ethanol_rmd17" / "train.xyz"
    m = fetch("rmd17_ethanol", tmp_path / "eth", url_override=copy.as_uri(), use_ray=False, progress=False)
    assert m["totals"]["frames_read"] == 1000
    assert m["totals"]["quarantined"] == 0 and m["structure"]["periodicity"] == "non-periodic"
