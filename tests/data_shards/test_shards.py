"""Shard building (serial and Ray), sample round trip, manifest checks, quarantine, statistics and the CLI."""
from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from data_shards import keys as K
from data_shards import readers
from data_shards.build import InputError, build_shards, split_ranges
from data_shards.cli import main as cli_main
from data_shards.frame import Frame
from data_shards.manifest import ManifestError, StatsPartial, finalize_stats, load_manifest, shard_paths, verify_shards
from data_shards.sample import decode_sample, encode_frame
from tests.helpers.net import free_port
from tests.helpers.shards import assert_manifest_matches_disk, tar_samples, write_xyz
from tests.helpers.water_systems import water_atoms

WATER_SETS = ("data_0", "data_1", "data_2", "data_3")


def assert_sample_equals_frame(sample: dict, frame: Frame) -> None:
    np.testing.assert_array_equal(sample[K.SPECIES], frame.species)
    np.testing.assert_allclose(sample[K.POSITIONS], frame.positions, rtol=0, atol=1e-5)
    np.testing.assert_allclose(sample[K.CELL], frame.cell, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(sample[K.PBC], frame.pbc)
    assert sample[K.ENERGY] == pytest.approx(frame.energy, abs=1e-9)
    np.testing.assert_allclose(sample[K.FORCES], frame.forces, rtol=1e-6, atol=1e-5)
    assert (sample[K.SOURCE], sample[K.FRAME_INDEX]) == (frame.source, frame.index)


def test_sample_round_trip_is_exact_and_deterministic():
    atoms = water_atoms(1)[0]
    frame = Frame(atoms.numbers.astype(np.int64), atoms.positions, np.array(atoms.cell), atoms.pbc.copy(),
                  atoms.get_potential_energy(), atoms.get_forces(), "mem", 3)
    encoded = encode_frame(frame)
    assert encode_frame(frame) == encoded and len(encoded["__key__"]) == 16
    sample = decode_sample(encoded)
    assert_sample_equals_frame(sample, frame)
    assert isinstance(sample[K.ENERGY], float) and sample[K.CELL].shape == (3, 3)
    moved = Frame(frame.species, frame.positions + 0.01, frame.cell, frame.pbc, None, None, "mem", 4)
    unlabelled = decode_sample(encode_frame(moved))
    assert unlabelled[K.ENERGY] is None and unlabelled[K.FORCES] is None
    assert unlabelled[K.SAMPLE_KEY] != sample[K.SAMPLE_KEY]


def test_decode_accepts_any_plain_npz_and_refuses_pickled_arrays():
    import io
    rng = np.random.default_rng(1)
    arrays = {K.SPECIES: np.array([8, 1, 1]), K.POSITIONS: np.asfortranarray(rng.normal(size=(3, 3))),
              K.CELL: np.eye(3) * 5, K.PBC: np.ones(3, bool)}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)          # compressed + Fortran order: not the fast path
    meta = json.dumps({K.ENERGY: -1.5, K.SOURCE: "x", K.FRAME_INDEX: 2}).encode()
    sample = decode_sample({"__key__": "k", "npz": buf.getvalue(), "json": meta})
    np.testing.assert_array_equal(sample[K.POSITIONS], arrays[K.POSITIONS])
    assert sample[K.FORCES] is None and sample[K.ENERGY] == -1.5
    buf = io.BytesIO()
    np.savez(buf, **{**arrays, K.SPECIES: np.array([{"z": 8}], dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle"):
        decode_sample({"__key__": "k", "npz": buf.getvalue(), "json": meta})


def test_split_ranges_are_contiguous_blocks():
    assert split_ranges(10, (0.8, 0.1, 0.1)) == {"train": (0, 8), "val": (8, 9), "test": (9, 10)}
    assert split_ranges(7, (1.0, 0.0, 0.0)) == {"train": (0, 7), "val": (7, 7), "test": (7, 7)}


def test_build_extxyz_splits_counts_and_round_trip(tmp_path):
    a = write_xyz(tmp_path / "a.xyz", water_atoms(23, seed=1))
    b = write_xyz(tmp_path / "b.xyz", water_atoms(6, seed=2))
    manifest = build_shards([a, f"test={b}"], tmp_path / "out", shard_size=5, split_fractions=(0.6, 0.2, 0.2),
                            use_ray=False, progress=False)
    assert_manifest_matches_disk(manifest)
    # a: 23 frames → train [0,14) val [14,18) test [18,23); b wholly test
    assert {s: manifest["splits"][s]["samples"] for s in ("train", "val", "test")} == {
        "train": 14, "val": 4, "test": 11}
    assert all(s["samples"] <= 5 for s in manifest["shards"])
    expected = {(f.source, f.index): f for path in (a, b) for f in readers.iter_frames(path)}
    seen = {}
    for split in ("train", "val", "test"):
        for path in shard_paths(manifest, split):
            for sample in tar_samples(path):
                frame = expected[(sample[K.SOURCE], sample[K.FRAME_INDEX])]
                assert_sample_equals_frame(sample, frame)
                seen[(sample[K.SOURCE], sample[K.FRAME_INDEX])] = split
    assert len(seen) == 29
    source_a = next(iter(readers.iter_frames(a))).source
    assert [i for (src, i), s in sorted(seen.items()) if src == source_a and s == "val"] == [14, 15, 16, 17]
    assert manifest["labelled"] and manifest["elements"] == {"1": 29 * 8, "8": 29 * 4}


def test_bad_frames_are_quarantined_and_totals_reconcile(tmp_path):
    atoms = water_atoms(8, seed=3)
    atoms[2].calc.results["forces"][1, 0] = np.nan          # NaN force
    atoms[5].calc = SinglePointCalculator(atoms[5], forces=atoms[5].get_forces())  # energy missing
    good = write_xyz(tmp_path / "good.xyz", atoms)
    manifest = build_shards([f"train={good}"], tmp_path / "out", shard_size=3, use_ray=False, progress=False)
    assert_manifest_matches_disk(manifest)
    records = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert sorted((r["frame"], r["field"]) for r in records) == [(2, "forces"), (5, "energy")]
    assert all(r["reason"] and r["source"] for r in records)
    assert manifest["totals"] == {"frames_read": 8, "samples_written": 6, "quarantined": 2, "duplicates": 0}
    # unlabelled frames are kept when labels are not required
    relaxed = build_shards([f"train={good}"], tmp_path / "relaxed", use_ray=False, progress=False,
                           require_labels=False)
    assert relaxed["totals"]["quarantined"] == 1 and not relaxed["labelled"]


def test_wrong_shape_frame_is_quarantined(tmp_path):
    system = tmp_path / "sys"
    (system / "set.000").mkdir(parents=True)
    (system / "type.raw").write_text("0\n1\n1\n")
    (system / "type_map.raw").write_text("O\nH\n")
    rng = np.random.default_rng(0)
    np.save(system / "set.000" / "coord.npy", rng.uniform(0, 5, (3, 9)))
    np.save(system / "set.000" / "box.npy", np.tile(np.eye(3).ravel() * 8.0, (3, 1)))
    np.save(system / "set.000" / "energy.npy", np.array([-14.0, -14.1, -14.2]))
    np.save(system / "set.000" / "force.npy", rng.normal(size=(3, 6)))   # 2 atoms' forces for 3 atoms
    # issue 12.9: a build that writes nothing fails with the reason (it used to exit 0 with an empty set)
    with pytest.raises(InputError, match=r"no sample written: all 3 frames read were quarantined \(3\).*forces"):
        build_shards([f"train={system}"], tmp_path / "out", use_ray=False, progress=False)
    records = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert len(records) == 3 and {r["field"] for r in records} == {"forces"}
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_input_and_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="input not found: .*nope.xyz"):
        build_shards([str(tmp_path / "nope.xyz")], tmp_path / "out", use_ray=False)
    path = write_xyz(tmp_path / "a.xyz", water_atoms(4, seed=4))
    manifest = build_shards([path], tmp_path / "out", shard_size=2, use_ray=False, progress=False)
    victim = manifest["shards"][-1]["name"]
    os.remove(tmp_path / "out" / victim)
    with pytest.raises(ManifestError, match=victim):
        load_manifest(tmp_path / "out")
    assert verify_shards(tmp_path / "out") == [f"{victim}: missing"]
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    data["schema_version"] = 99
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="schema_version 99"):
        load_manifest(tmp_path / "out")


def test_rerun_is_byte_identical_and_verify_finds_corruption(tmp_path):
    path = write_xyz(tmp_path / "a.xyz", water_atoms(12, seed=5))
    first = build_shards([path], tmp_path / "one", shard_size=4, use_ray=False, progress=False)
    second = build_shards([path], tmp_path / "two", shard_size=4, use_ray=False, progress=False)
    names = [s["name"] for s in first["shards"]]
    assert len(names) >= 3
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "one", tmp_path / "two",
                                               names + ["manifest.json", "quarantine.jsonl"], shallow=False)
    assert mismatch == [] and errors == []
    assert verify_shards(tmp_path / "one") == []
    victim = tmp_path / "one" / names[1]
    blob = bytearray(victim.read_bytes())
    blob[700] ^= 0xFF
    victim.write_bytes(bytes(blob))
    problems = verify_shards(tmp_path / "one")
    assert len(problems) == 1 and problems[0].startswith(f"{names[1]}: sha256")
    assert first["shards"] == second["shards"]


def _partial(frames: list[Frame]) -> StatsPartial:
    partial = StatsPartial()
    for f in frames:
        partial.add_frame(f)
    return partial


def _molecule_frames(rng, n: int, e0: dict[int, float]) -> list[Frame]:
    frames = []
    for i in range(n):
        counts = {1: rng.integers(1, 9), 6: rng.integers(0, 4), 8: rng.integers(0, 4)}
        species = np.array([z for z, c in counts.items() for _ in range(c)], dtype=np.int64)
        energy = sum(e0[z] for z in species) + rng.normal(0, 0.05)
        frames.append(Frame(species, rng.normal(size=(len(species), 3)), np.zeros((3, 3)), np.zeros(3, bool),
                            energy, rng.normal(size=(len(species), 3)), "mem", i))
    return frames


def test_statistics_from_merged_partials_match_direct_numpy():
    rng = np.random.default_rng(7)
    e0_true = {1: -13.6, 6: -1030.0, 8: -2040.0}
    frames = _molecule_frames(rng, 60, e0_true)
    merged = _partial(frames[:17]).merge(_partial(frames[17:40])).merge(_partial(frames[40:]))
    stats = finalize_stats(merged)
    elements = [1, 6, 8]
    x = np.array([[np.sum(f.species == z) for z in elements] for f in frames], dtype=float)
    y = np.array([f.energy for f in frames])
    e0 = np.linalg.lstsq(x, y, rcond=None)[0]
    residual = (y - x @ e0) / x.sum(1)
    forces = np.concatenate([f.forces for f in frames])
    species = np.concatenate([f.species for f in frames])
    assert not stats["e0_rank_deficient"] and stats["structures"] == 60
    assert [stats["e0"][str(z)] for z in elements] == pytest.approx(e0, abs=1e-6)
    assert [stats["e0"][str(z)] for z in elements] == pytest.approx([e0_true[z] for z in elements], abs=0.1)
    assert stats["energy_per_atom_mean"] == pytest.approx(residual.mean(), abs=1e-9)
    assert stats["energy_per_atom_std"] == pytest.approx(residual.std(), rel=1e-6)
    assert stats["force_rms"] == pytest.approx(np.sqrt(np.mean(forces**2)), rel=1e-12)
    assert stats["force_rms_per_element"]["6"] == pytest.approx(np.sqrt(np.mean(forces[species == 6] ** 2)))
    assert finalize_stats(_partial(frames))["e0"] == pytest.approx(stats["e0"], abs=1e-8)


def test_collinear_water_counts_flag_rank_deficiency(caplog, monkeypatch):
    from data_shards import progress

    monkeypatch.setattr(progress, "_warned", set())   # the warning is given once per process
    rng = np.random.default_rng(8)
    frames = [Frame(np.array([8, 1, 1] * n), rng.normal(size=(3 * n, 3)), np.zeros((3, 3)), np.zeros(3, bool),
                    -14.2 * n + rng.normal(0, 0.01), None, "mem", i) for i, n in enumerate(rng.integers(2, 9, 30))]
    with caplog.at_level("WARNING"):
        stats = finalize_stats(_partial(frames))
    assert stats["e0_rank_deficient"] and "collinear" in caplog.text
    per_water = 2 * stats["e0"]["1"] + stats["e0"]["8"]
    assert per_water == pytest.approx(-14.2, abs=0.01)       # min-norm E0 still predicts water energies
    assert stats["force_rms"] is None


@pytest.mark.slow
def test_ray_build_of_dft_water_matches_serial_build(tmp_path, shared_data):
    root = shared_data / "water_deepmd" / "data"
    inputs = [f"train={root / 'data_0'}", f"train={root / 'data_1'}", f"val={root / 'data_2'}",
              f"test={root / 'data_3'}"]
    t0 = time.perf_counter()
    manifest = build_shards(inputs, tmp_path / "ray", shard_size=60, num_cpus=2, progress=False)
    elapsed = time.perf_counter() - t0
    print(f"Ray build of {manifest['totals']['frames_read']} DFT water frames: {elapsed:.1f} s with Ray start")
    expected = {s: sum(readers.count_frames(root / d) for d in ds) for s, ds in
                (("train", WATER_SETS[:2]), ("val", WATER_SETS[2:3]), ("test", WATER_SETS[3:]))}
    assert {s: manifest["splits"][s]["samples"] for s in expected} == expected
    assert_manifest_matches_disk(manifest)
    stats = manifest["stats"]
    assert stats["e0_rank_deficient"] and stats["structures"] == expected["train"]
    train = [f for d in WATER_SETS[:2] for f in readers.iter_frames(root / d)]
    forces = np.concatenate([f.forces for f in train])
    assert stats["force_rms"] == pytest.approx(np.sqrt(np.mean(forces.astype(np.float64) ** 2)), rel=1e-9)
    per_atom = np.array([f.energy / f.natoms for f in train])
    assert stats["energy_per_atom_std"] == pytest.approx(per_atom.std(), rel=1e-4)
    serial = build_shards(inputs, tmp_path / "serial", shard_size=60, use_ray=False, progress=False)
    assert serial["shards"] == manifest["shards"] and serial["stats"] == stats  # same merge order
    first = tar_samples(shard_paths(manifest, "val")[0])[0]
    assert_sample_equals_frame(first, next(iter(readers.iter_frames(root / "data_2"))))


@pytest.mark.slow
def test_chunk_of_a_killed_ray_worker_is_redone(tmp_path, monkeypatch):
    """The first attempt at shard 1 leaves half a temp file and kills its worker process; Ray reruns it."""
    import data_shards.build as build_module

    path = write_xyz(tmp_path / "a.xyz", water_atoms(9, seed=12))
    write_chunk, marker, out = build_module.write_chunk, tmp_path / "killed-once", tmp_path / "out"

    def dies_once(chunk, out_dir, require_labels):
        if chunk.shard_index == 1 and not marker.exists():
            marker.touch()
            (Path(out_dir) / ".shard-000001.tar.tmp-dead").write_bytes(b"half a shard")
            os._exit(1)
        return write_chunk(chunk, out_dir, require_labels)

    monkeypatch.setattr(build_module, "write_chunk", dies_once)
    manifest = build_shards([f"train={path}"], out, shard_size=3, num_cpus=2, progress=False)
    assert marker.exists() and manifest["totals"]["samples_written"] == 9
    assert_manifest_matches_disk(manifest)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "quarantine.jsonl", "shard-000000.tar", "shard-000000.tar.json", "shard-000001.tar",
        "shard-000001.tar.json", "shard-000002.tar", "shard-000002.tar.json"]


@pytest.fixture
def ray_head(tmp_path):
    """A real `ray start --head --block` cluster on loopback; stopped by its PID (never `ray stop`)."""
    port = free_port()
    temp_dir = Path("/tmp") / f"rt{os.getpid()}{port}"  # Ray's socket paths must stay short
    ray_bin = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        assert proc.poll() is None, "ray start --head exited early"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    else:
        pytest.fail("ray head did not open its port within 90 s")
    yield f"127.0.0.1:{port}"
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=45)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_build_joins_running_ray_cluster(tmp_path, ray_head):
    path = write_xyz(tmp_path / "a.xyz", water_atoms(10, seed=9))
    manifest = build_shards([path], tmp_path / "cluster", shard_size=3, ray_address=ray_head, progress=False)
    assert_manifest_matches_disk(manifest)
    serial = build_shards([path], tmp_path / "serial", shard_size=3, use_ray=False, progress=False)
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in serial["shards"]]


def test_cli_build_inspect_verify(tmp_path, capsys):
    path = write_xyz(tmp_path / "a.xyz", water_atoms(6, seed=10))
    out = tmp_path / "out"
    assert cli_main(["shards", "build", path, "--out", str(out), "--shard-size", "2", "--serial",
                     "--split-fractions", "0.5", "0.25", "0.25"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert cli_main(["shards", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train" in text and "force RMS" in text
    assert cli_main(["shards", "verify", str(out)]) == 0
    shard = next(out.glob("shard-*.tar"))
    shard.write_bytes(shard.read_bytes()[:-10] + b"corrupted!")
    assert cli_main(["shards", "verify", str(out)]) == 1
    assert shard.name in capsys.readouterr().out


def test_cli_missing_input_is_one_line_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "data_shards", "shards", "build", str(tmp_path / "missing.xyz"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "input not found" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_cli_help_states_defaults_and_units(capsys):
    for argv in (["shards", "build", "--help"], ["generate", "tip3p", "--help"]):
        with pytest.raises(SystemExit):
            cli_main(argv)
        text = capsys.readouterr().out
        assert text.count("default") >= 4
    assert "K" in text and "fs" in text
