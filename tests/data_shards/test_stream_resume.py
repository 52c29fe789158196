"""Production data path: ShardStream atom-budget batching, exact mid-epoch resume (also across a world-size
change), shards over http:// and pipe: URLs, sha256 verification while streaming; resumable shard builds."""
from __future__ import annotations

import contextlib
import filecmp
import functools
import http.server
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import ase.io
import pytest

from data_shards.build import SIDECAR_SUFFIX, build_shards
from data_shards.integrity import SampleIntegrityError, ShardReadError
from data_shards.manifest import load_manifest
from data_shards.stream import ShardChecksumError, ShardStream, merge_stream_states
from tests.helpers.water_systems import water_atoms

CUTOFF = 3.0


def all_keys(shard_dir) -> Counter:
    return Counter(k for b in ShardStream(shard_dir, "train", 64, CUTOFF) for k in b.key)


def test_max_atoms_closes_batches_at_the_budget(mixed_shards):
    stream = ShardStream(mixed_shards, "train", 5, CUTOFF, num_workers=2, shuffle_buffer=6, max_atoms=40)
    batches = list(stream)
    assert Counter(k for b in batches for k in b.key) == all_keys(mixed_shards)
    for b in batches:
        assert b.num_graphs <= 5 and b.num_nodes <= 40
    assert any(b.num_nodes == 24 for b in batches)          # budget, not batch_size, closed these
    assert not stream.batch_counts_exact and len(batches) <= stream.num_batches


def test_max_atoms_batch_counts_exact_for_uniform_sizes(uniform_shards):
    for world_size in (1, 2):
        streams = [ShardStream(uniform_shards, "train", 8, CUTOFF, rank=r, world_size=world_size, num_workers=2,
                               max_atoms=30) for r in range(world_size)]   # 12-atom frames: 2 per batch
        counts = [len(list(s)) for s in streams]
        assert streams[0].batch_counts_exact and counts == streams[0].batches_per_rank()


def test_structure_over_budget_is_its_own_batch_with_a_warning(mixed_shards):
    with pytest.warns(RuntimeWarning, match="exceeds max_atoms=20"):
        batches = list(ShardStream(mixed_shards, "train", 5, CUTOFF, max_atoms=20))
    big = [b for b in batches if b.num_nodes > 20]
    assert len(big) == 12 and all(b.num_graphs == 1 for b in big)


def run_part(shard_dir, world_size, num_workers, batches_per_rank, state=None, epoch=1, **kw):
    """Each rank takes `batches_per_rank` batches (None: to the end) → (keys per rank, per-rank states)."""
    keys, states = [], []
    for rank in range(world_size):
        s = ShardStream(shard_dir, "train", 3, CUTOFF, rank=rank, world_size=world_size, num_workers=num_workers,
                        shuffle_buffer=5, seed=7, **kw)
        if state is not None:
            s.load_state_dict(state[rank] if isinstance(state, list) else state)
        s.set_epoch(epoch)
        mine = []
        for batch in itertools.islice(s, batches_per_rank):   # a batch counts as consumed once handed out
            mine += batch.key
        keys.append(mine)
        states.append(s.state_dict())
    return keys, states


def test_resume_with_same_layout_continues_with_the_next_unseen_sample(uniform_shards):
    full, _ = run_part(uniform_shards, 2, 2, None)
    head, states = run_part(uniform_shards, 2, 2, 2)
    assert all(len(k) == 6 for k in head)
    tail, _ = run_part(uniform_shards, 2, 2, None, state=states)
    for rank in range(2):
        assert Counter(head[rank] + tail[rank]) == Counter(full[rank])   # same samples per rank
        assert set(head[rank]).isdisjoint(tail[rank])
    import json
    assert json.loads(json.dumps(states[0])) == states[0]


@pytest.mark.parametrize("before,after", [((2, 2), (1, 0)), ((1, 0), (2, 1)), ((2, 1), (3, 2))])
def test_resume_on_another_world_size_deals_out_exactly_the_unseen_remainder(uniform_shards, before, after):
    everything = all_keys(uniform_shards)
    head, states = run_part(uniform_shards, *before, 1)
    seen = Counter(k for keys in head for k in keys)
    merged = merge_stream_states(states)
    if len(states) > 1:   # one rank's state alone cannot be re-dealt
        with pytest.raises(ValueError, match="merge_stream_states"):
                run_part(uniform_shards, *after, 1, state=states[-1])
    tail, states2 = run_part(uniform_shards, *after, None, state=merged)
    assert Counter(k for keys in tail for k in keys) == everything - seen
    assert all(keys for keys in tail)
    # a second interruption inside the re-dealt epoch, then a return to the first layout
    mid, states2 = run_part(uniform_shards, *after, 1, state=merged)
    rest, _ = run_part(uniform_shards, *before, None, state=merge_stream_states(states2))
    assert Counter(k for keys in head + mid + rest for k in keys) == everything


def test_resume_state_must_match_the_stream(uniform_shards):
    _, states = run_part(uniform_shards, 1, 0, 1)
    other = ShardStream(uniform_shards, "train", 3, CUTOFF, seed=8, shuffle_buffer=5)
    with pytest.raises(ValueError, match="seed=7"):
        other.load_state_dict(states[0])


@contextlib.contextmanager
def http_server(folder: Path):
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_shards_from_http_and_pipe_urls(uniform_shards):
    expected = all_keys(uniform_shards)
    with http_server(uniform_shards) as url:
        from_manifest_url = ShardStream(url + "/manifest.json", "train", 4, CUTOFF, num_workers=2, verify="fatal")
        assert Counter(k for b in from_manifest_url for k in b.key) == expected
        local_manifest = ShardStream(uniform_shards, "train", 4, CUTOFF, base_url=url)
        assert local_manifest.work[0].path.startswith("http://127.0.0.1")
        assert Counter(k for b in local_manifest for k in b.key) == expected
    piped = ShardStream(uniform_shards, "train", 4, CUTOFF, base_url=f"pipe:cat {uniform_shards}/{{name}}",
                        verify="fatal")
    assert Counter(k for b in piped for k in b.key) == expected
    broken = ShardStream(uniform_shards, "train", 4, CUTOFF, base_url="pipe:cat /nonexistent/{name}")
    with pytest.raises(ShardReadError, match="exited with status 1"):   # one line naming the shard, not a traceback
        list(broken)


def test_corrupted_shard_is_skipped_or_fatal_never_silent(uniform_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(uniform_shards, copy)
    victim = load_manifest(copy)["shards"][2]
    path = copy / victim["name"]
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF   # inside the first member's npz payload: still a readable tar
    path.write_bytes(bytes(data))
    expected = all_keys(uniform_shards)
    # per-sample checksums (default fatal) catch the damaged sample even without hashing whole shards
    with pytest.raises(SampleIntegrityError, match=victim["name"]):
        list(ShardStream(copy, "train", 4, CUTOFF))
    with pytest.raises(ShardChecksumError, match=victim["name"]):
        list(ShardStream(copy, "train", 4, CUTOFF, verify="fatal"))
    with pytest.warns(RuntimeWarning, match=victim["name"]):
        kept = Counter(k for b in ShardStream(copy, "train", 4, CUTOFF, verify="skip") for k in b.key)
    assert sum(kept.values()) == 20 - victim["samples"] and not kept - expected
    with pytest.raises(ValueError, match="valid modes"):
        ShardStream(copy, "train", 4, CUTOFF, verify="yes")


def build_dir_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def assert_same_build(a: Path, b: Path) -> None:
    names = build_dir_files(a)
    assert names == build_dir_files(b)
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(names)


def test_rebuild_redoes_only_missing_or_damaged_shards(tmp_path, caplog):
    xyz = tmp_path / "w.xyz"
    ase.io.write(xyz, water_atoms(15, seed=9), format="extxyz")
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    for out in (clean, resumed):
        build_shards([str(xyz)], out, shard_size=2, use_ray=False, progress=False)
    (resumed / "shard-000001.tar").unlink()                         # a tar lost after its sidecar
    (resumed / f"shard-000003.tar{SIDECAR_SUFFIX}").unlink()        # killed between tar and sidecar
    damaged = resumed / "shard-000004.tar"
    blob = bytearray(damaged.read_bytes())
    blob[700] ^= 0xFF                                               # silently damaged, same size
    damaged.write_bytes(bytes(blob))
    (resumed / "manifest.json").unlink()
    untouched = (resumed / "shard-000000.tar").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="data_shards.build"):
        build_shards([str(xyz)], resumed, shard_size=2, use_ray=False, progress=False)
    assert "shard-000004.tar: does not match its sidecar" in caplog.text
    n_chunks = len(list(clean.glob("*.tar.json")))
    assert f"resuming: {n_chunks - 3} of {n_chunks} chunks already finished" in caplog.text
    assert (resumed / "shard-000000.tar").stat().st_mtime_ns == untouched
    assert_same_build(clean, resumed)


@pytest.mark.slow
def test_build_killed_mid_run_finishes_only_missing_shards(tmp_path, caplog):
    xyz = tmp_path / "w.xyz"
    ase.io.write(xyz, water_atoms(600, seed=3), format="extxyz")
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    build_shards([f"train={xyz}"], clean, shard_size=2, use_ray=False, progress=False)
    n_chunks = len(list(clean.glob("*.tar.json")))
    cmd = [sys.executable, "-m", "data_shards", "shards", "build", f"train={xyz}", "--out", str(resumed),
           "--shard-size", "2", "--serial"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if resumed.is_dir() and len(list(resumed.glob("*.tar.json"))) >= 20:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    finished = len(list(resumed.glob("*.tar.json")))
    assert 20 <= finished < n_chunks and not (resumed / "manifest.json").exists()
    with caplog.at_level(logging.INFO, logger="data_shards.build"):
        build_shards([f"train={xyz}"], resumed, shard_size=2, use_ray=False, progress=False)
    assert f"resuming: {finished} of {n_chunks} chunks already finished" in caplog.text
    assert_same_build(clean, resumed)
