"""Issue 12.6, 12.7, 12.9 (data side): nothing quiet, nothing written to an input, one line per user error.

Empty / blank inputs and inputs whose frames are all quarantined (energy under another key) fail with the
reason and the keys found; a DeePMD folder without type.raw says so; a non-ASE or corrupt SQLite file is
refused without being modified (every input hashed before and after a build); tar members named `../…`
or oddly are refused when read, streamed or resharded, with no partial tar left; a truncated or
bit-flipped shard is a one-line error while streaming."""
from __future__ import annotations

import hashlib
import json
import sqlite3

import numpy as np
import pytest

from tests.helpers.bad_inputs import (
    REPO,
    build_water_shards,
    maskpot,
    one_line_error,
    rewrite_member,
    water_frames,
    write_extxyz,
)

EXPORT = REPO / "tests" / "assets" / "egnn_tiny_export"


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("text", ["", "\n\n   \n"])
def test_empty_or_blank_input_fails_with_the_reason(tmp_path, text):
    src = tmp_path / "empty.xyz"
    src.write_text(text)
    line = one_line_error(maskpot("shards", "build", f"train={src}", "--out", str(tmp_path / "s"), "--serial"))
    assert str(src) in line and "no frames" in line  # old main: exit 0, an empty shard set


def test_all_frames_quarantined_names_the_keys_found(tmp_path):
    frames = water_frames(3)
    for atoms in frames:
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
    src = write_extxyz(tmp_path / "ref.xyz", frames)
    line = one_line_error(maskpot("shards", "build", f"train={src}", "--out", str(tmp_path / "s"), "--serial"))
    # the label-key check (--energy-key) speaks first; either way the line names the keys the frames have
    assert ("no sample written" in line or "--energy-key" in line) and "REF_energy" in line and "REF_forces" in line
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_deepmd_folder_without_type_raw_says_so(tmp_path):
    system = tmp_path / "sys"
    (system / "set.000").mkdir(parents=True)
    np.save(system / "set.000" / "coord.npy", np.zeros((2, 9)))
    np.save(system / "set.000" / "box.npy", np.tile(np.eye(3).ravel() * 10, (2, 1)))
    line = one_line_error(maskpot("shards", "build", f"train={system}", "--out", str(tmp_path / "s"), "--serial"))
    assert "DeePMD system without type.raw" in line  # old main: "cannot tell its format; valid formats: …"


def test_sqlite_inputs_are_never_written(tmp_path):
    import ase.db

    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE things (x INTEGER)")
    before = sha(foreign)
    line = one_line_error(maskpot("shards", "build", f"train={foreign}", "--out", str(tmp_path / "s1"), "--serial"))
    assert "not an ASE database" in line and "things" in line
    assert sha(foreign) == before  # old main: ase added its tables to the user's file, exit 0

    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 8)
    before = sha(corrupt)
    line = one_line_error(maskpot("shards", "build", f"train={corrupt}", "--out", str(tmp_path / "s2"), "--serial"))
    assert str(corrupt) in line
    assert sha(corrupt) == before

    good = tmp_path / "good.db"
    with ase.db.connect(str(good)) as db:
        for atoms in water_frames(3, seed=4):
            db.write(atoms)
    xyz = write_extxyz(tmp_path / "more.xyz", water_frames(3, seed=5))
    inputs = [good, xyz]
    hashes = {p: sha(p) for p in inputs}
    mtimes = {p: p.stat().st_mtime_ns for p in inputs}
    done = maskpot("shards", "build", f"train={good}", f"val={xyz}", "--out", str(tmp_path / "s3"), "--serial")
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p: sha(p) for p in inputs} == hashes and {p: p.stat().st_mtime_ns for p in inputs} == mtimes
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith("good.db")) == ["good.db"]  # no journal


@pytest.fixture()
def shards(tmp_path):
    return build_water_shards(tmp_path / "w")


def first_shard(shards, split: str = "test"):
    manifest = json.loads((shards / "manifest.json").read_text())
    return shards / next(s["name"] for s in manifest["shards"] if s["split"] == split)


@pytest.mark.parametrize("bad_name", ["../escape.npz", "sub/dir.npz", "a.b.npz"])
def test_odd_member_names_refused_on_read_and_reshard(shards, tmp_path, bad_name):
    def rename(name, data):
        return (bad_name if name.endswith(".npz") else name), data

    tar = first_shard(shards, "test")
    rewrite_member(tar, rename)
    line = one_line_error(maskpot("evaluate", str(EXPORT), str(shards), "--out", str(tmp_path / "ev")))
    assert "not a plain sample name" in line and bad_name in line
    dst = tmp_path / "resharded"
    line = one_line_error(maskpot("shards", "reshard", str(shards), str(dst), "--num-shards", "1"))
    assert "not a plain sample name" in line
    assert not list(dst.glob("*.tar*")) and not list(dst.glob(".*tmp*"))  # nothing partial left behind
    assert not (tmp_path / "escape.npz").exists()


def test_truncated_or_bit_flipped_shard_is_one_line_while_streaming(shards, tmp_path):
    tar = first_shard(shards, "test")
    data = bytearray(tar.read_bytes())
    flipped = bytearray(data)
    flipped[1024 + 600] ^= 0x10   # inside the first npz member's array bytes
    tar.write_bytes(bytes(flipped))
    line = one_line_error(maskpot("evaluate", str(EXPORT), str(shards), "--out", str(tmp_path / "ev1")))
    assert tar.name in line

    tar.write_bytes(bytes(data[: len(data) // 2 + 100]))
    line = one_line_error(maskpot("evaluate", str(EXPORT), str(shards), "--out", str(tmp_path / "ev2")))
    assert tar.name in line and ("unreadable shard" in line or "checksum" in line)


@pytest.mark.parametrize("name", ["../outside.tar", "x;touch PWNED;.tar", "/abs/shard.tar", "sub/shard.tar"])
def test_manifest_shard_names_cannot_escape_or_inject(shards, tmp_path, name):
    """Further class found: a manifest's shard names become paths, URLs and `pipe:` shell commands."""
    manifest_path = shards / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["name"] = name
    manifest_path.write_text(json.dumps(manifest))
    line = one_line_error(maskpot("evaluate", str(EXPORT), str(shards), "--out", str(tmp_path / "ev")))
    assert "is not a plain file name" in line
    from data_shards.stream import ShardStream

    with pytest.raises(ValueError, match="not a plain file name"):
        ShardStream(shards, "test", 2, 3.5, base_url=f"pipe:cat {shards}/{{name}}")
    assert not (tmp_path / "PWNED").exists() and not (REPO / "PWNED").exists()
