"""Sharding and streaming at corpus scale: Ray speed-up, read rates against the raw tar byte rate, and
peak RSS of a build and of a loader epoch at 10⁴ and 10⁵ frames (it must not grow with the corpus).

    .venv/bin/python benchmarks/bench_shards.py [--frames 4000] [--rss-frames 10000 100000] [--skip-rss]

1. Sharding throughput (frames/s, Ray already up, so start-up is not counted) with 1 and 2 Ray CPUs, for
   64-water periodic frames (192 atoms) and for a small molecule (rMD17 ethanol from ../shared/data when
   present, else generated 9-atom molecules). Target: ≥ 1.8× with 2 workers on 2 cores.
2. Read rates over the same tars: the raw byte rate (tarfile, every member read, nothing decoded — the
   physical limit here) against ShardStream into batched radius graphs (samples/s, atoms/s, MB/s).
3. Peak RSS (ru_maxrss of a fresh process) of `build_shards` (serial, in-process) and of one loader
   epoch (2 workers, shuffle buffer 256), for 8-water frames written as a DeePMD system.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # tests.helpers, and this tree before any installed copy

import numpy as np  # noqa: E402

from data_shards import keys as K  # noqa: E402

SHARED_ETHANOL = REPO.parent / "shared" / "data" / "ethanol_rmd17" / "train.xyz"
TARGET_SPEEDUP = 1.8


def write_deepmd(root: Path, boxes: list[dict], frames: int, seed: int) -> Path:
    """A DeePMD system of `frames` frames: the given boxes jittered by 0.02 Å (distinct content keys)."""
    rng = np.random.default_rng(seed)
    first = boxes[0]
    n = len(first[K.SPECIES])
    root.mkdir(parents=True, exist_ok=True)
    (root / "type_map.raw").write_text("O\nH\n")
    (root / "type.raw").write_text("\n".join("0" if z == 8 else "1" for z in first[K.SPECIES]) + "\n")
    per_set = 10000
    for k, lo in enumerate(range(0, frames, per_set)):
        m = min(per_set, frames - lo)
        base = np.stack([boxes[(lo + i) % len(boxes)][K.POSITIONS] for i in range(m)])
        coord = (base + rng.normal(scale=0.02, size=base.shape)).reshape(m, 3 * n)
        d = root / f"set.{k:03d}"
        d.mkdir()
        np.save(d / "coord.npy", coord.astype(np.float32))
        np.save(d / "box.npy", np.tile(first[K.CELL].reshape(1, 9), (m, 1)).astype(np.float32))
        np.save(d / "energy.npy", rng.normal(-470.0 * n / 3, 1.0, size=m).astype(np.float32))
        np.save(d / "force.npy", rng.normal(scale=0.8, size=(m, 3 * n)).astype(np.float32))
    return root


def small_molecule_input(tmp: Path, frames: int) -> tuple[str, str]:
    if SHARED_ETHANOL.is_file():
        return str(SHARED_ETHANOL), "rMD17 ethanol (9 atoms), train.xyz"
    import ase
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(0)
    base = np.array([[0, 0, 0], [1.5, 0, 0], [2.2, 1.2, 0], [-.6, .9, 0], [-.6, -.9, 0], [0, 0, 1.1],
                     [1.9, -.9, .3], [1.9, 0, -1], [3.1, 1.1, .3]])
    atoms = []
    for _ in range(frames):
        a = ase.Atoms("CCOHHHHHH", positions=base + rng.normal(scale=0.05, size=base.shape))
        a.calc = SinglePointCalculator(a, energy=-4200.0 + rng.normal(), forces=rng.normal(size=(9, 3)))
        atoms.append(a)
    path = tmp / "molecules.xyz"
    ase.io.write(path, atoms, format="extxyz")
    return str(path), "generated 9-atom molecules"


def time_build(inputs: list[str], out: Path, cpus: int, shard_size: int) -> tuple[float, int]:
    import ray

    from data_shards.build import RAY_ENV, build_shards

    os.environ.update(RAY_ENV)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=256 * 1024**2,
             logging_level="ERROR")
    try:
        ray.get(ray.remote(lambda: 0).remote())   # workers up before the clock starts
        t0 = time.perf_counter()
        manifest = build_shards(inputs, str(out), shard_size=shard_size, split_fractions=(1.0, 0.0, 0.0),
                                progress=False)
        return time.perf_counter() - t0, manifest["totals"]["frames_read"]
    finally:
        ray.shutdown()


def sharding(tmp: Path, frames: int) -> None:
    from tests.helpers.water_systems import water_box

    water = write_deepmd(tmp / "water64", [water_box(64, seed=s) for s in range(8)], frames, seed=1)
    molecule, label = small_molecule_input(tmp, 1000)
    print(f"1. sharding throughput, Ray up ({os.cpu_count()} cores)")
    for tag, name, inputs, shard_size in (("water", "64-water frames (192 atoms)", [str(water)], max(frames // 16, 1)),
                                          ("molecule", label, [molecule], 64)):
        rates = {}
        for cpus in (1, 2):
            secs, n = time_build(inputs, tmp / f"out_{tag}_{cpus}", cpus, shard_size)
            rates[cpus] = n / secs
            print(f"   {name:40s} {cpus} worker(s): {n} frames in {secs:6.2f} s = {rates[cpus]:8.0f} frames/s")
        print(f"   {name:40s} speed-up {rates[2] / rates[1]:.2f}× (target ≥ {TARGET_SPEEDUP}×)")


def raw_tar_rate(shard_dir: Path) -> tuple[float, int, int]:
    from data_shards.manifest import load_manifest, shard_paths

    t0, nbytes, members = time.perf_counter(), 0, 0
    for path in shard_paths(load_manifest(shard_dir), "train"):
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isfile():
                    nbytes += len(tar.extractfile(m).read())
                    members += 1
    return time.perf_counter() - t0, nbytes, members


def read_rates(tmp: Path) -> None:
    from data_shards.stream import ShardStream

    shards = tmp / "out_water_2"   # the 64-water set of step 1
    meta = json.loads((shards / "manifest.json").read_text())
    n_samples, n_atoms = meta["splits"]["train"]["samples"], meta["shards"][0]["atoms"] // meta["shards"][0]["samples"]
    tar_bytes = sum(s["bytes"] for s in meta["shards"])
    secs, nbytes, members = min((raw_tar_rate(shards) for _ in range(3)), key=lambda r: r[0])
    print(f"2. reading {n_samples} 64-water samples ({tar_bytes / 1e6:.0f} MB of tars)")
    print(f"   raw tar bytes (no decoding):            {nbytes / secs / 1e6:8.0f} MB/s = "
          f"{n_samples / secs:8.0f} samples/s")
    for workers in (0, 2):
        t0 = time.perf_counter()
        seen = sum(b.num_graphs for b in ShardStream(shards, "train", 16, 3.5, num_workers=workers))
        s = time.perf_counter() - t0
        assert seen == n_samples
        print(f"   ShardStream → radius graphs, {workers} workers: {tar_bytes / s / 1e6:8.1f} MB/s = "
              f"{seen / s:8.0f} samples/s = {seen * n_atoms / s:9.0f} atoms/s "
              f"({(seen / s) / (n_samples / secs):.3f} of the raw rate)")


CHILD = r"""
import json, os, resource, sys, time
os.environ["TQDM_DISABLE"] = "1"
sys.path.insert(0, {repo!r})
mode, src, out = sys.argv[1:4]
t0 = time.perf_counter()
if mode == "build":
    from data_shards.build import build_shards
    m = build_shards([src], out, shard_size=2000, split_fractions=(1.0, 0.0, 0.0), use_ray=False, progress=False)
    n = m["totals"]["samples_written"]
else:
    from data_shards.stream import ShardStream
    n = sum(b.num_graphs for b in ShardStream(out, "train", 32, 3.5, num_workers=2, shuffle_buffer=256))
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({{"n": n, "s": time.perf_counter() - t0,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_rss_mb": children / 1024}}))
"""


def peak_rss(tmp: Path, sizes: list[int]) -> None:
    from tests.helpers.water_systems import water_box

    boxes = [water_box(8, seed=s) for s in range(16)]
    print("3. peak RSS (fresh process each), 8-water frames (24 atoms)")
    child = CHILD.format(repo=str(REPO))
    base = {}
    for n in sizes:
        src = write_deepmd(tmp / f"rss_{n}", boxes, n, seed=n)
        out = tmp / f"rss_{n}_shards"
        for mode in ("build", "stream"):
            res = subprocess.run([sys.executable, "-c", child, mode, str(src), str(out)], capture_output=True,
                                 text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            assert r["n"] == n, r
            base.setdefault(mode, r["rss_mb"])
            extra = f", workers {r['worker_rss_mb']:.0f} MB" if mode == "stream" else ""
            print(f"   {mode:6s} {n:>7d} frames: {n / r['s']:8.0f} frames/s, peak RSS {r['rss_mb']:6.0f} MB{extra} "
                  f"({r['rss_mb'] / base[mode]:.2f}× the {sizes[0]}-frame run)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=4000, help="64-water frames for the sharding/read figures")
    p.add_argument("--rss-frames", type=int, nargs="+", default=[10000, 100000])
    p.add_argument("--skip-rss", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sharding(Path(tmp), args.frames)
        read_rates(Path(tmp))
        if not args.skip_rss:
            peak_rss(Path(tmp), args.rss_frames)


if __name__ == "__main__":
    main()
