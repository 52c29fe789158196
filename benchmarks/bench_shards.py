"""Sharding and streaming at corpus scale: Ray speed-up, read rates against the raw tar byte rate, and
peak RSS of a build and of a loader epoch at 10⁴ and 10⁵ frames (it must not grow with the corpus).

    .venv/bin/python benchmarks/bench_shards.py [--frames 4000] [--rss-frames 10000 100000] [--skip-rss]
        [--skip-read] [--rounds 3] [--out benchmarks/results]

Every figure goes through benchmarks/harness.py: arms alternated for `--rounds` rounds, ratios paired per
round against the first arm of the same run, JSON (samples, load averages, machine, versions) in `--out`.

1. Sharding throughput (frames/s; Ray up and each worker's imports done before the clock) with 1 and 2 Ray CPUs, for
   64-water periodic frames (192 atoms) and for a small molecule (rMD17 ethanol from ../shared/data when
   present, else generated 9-atom molecules); each arm a fresh process. Target: ≥ 1.8× with 2 workers.
2. Read rates over the same tars: the raw byte rate (tarfile, every member read, nothing decoded — the
   physical limit here) against ShardStream into batched radius graphs (samples/s, atoms/s, MB/s).
3. Peak RSS (the harness's os.wait4 rusage of a fresh process) of `build_shards` (serial, in-process) and of one loader
   epoch (2 workers, shuffle buffer 256), for 8-water frames written as a DeePMD system.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import numpy as np
from harness import RATE, SIZE, Command, compare, emit

from data_shards import keys as K

SHARED_ETHANOL = REPO.parent / "shared" / "data" / "ethanol_rmd17" / "train.xyz"


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
        np.save(d / "energy.npy", rng.normal(-470.0 * (n // 3), 1.0, size=m).astype(np.float32))
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


def build_child(inputs: list[str], out: str, cpus: int, shard_size: int) -> dict:
    """In a fresh process: Ray up with `cpus` CPUs and every worker's imports done (start-up not timed), then
    one build; frames/s."""
    import ray

    @ray.remote(num_cpus=1)
    def warm_worker() -> int:
        import data_shards.chunk  # noqa: F401  # what a chunk task imports, once per worker
        time.sleep(1.0)   # held: the next warm-up task must start another worker
        return os.getpid()

    from data_shards.build import build_shards
    from data_shards.ray_tasks import RAY_ENV

    os.environ.update(RAY_ENV)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=256 * 1024**2,
             logging_level="ERROR")
    try:
        pids = ray.get([warm_worker.remote() for _ in range(cpus)])   # every worker up, chunk code imported
        if len(set(pids)) != cpus:
            raise RuntimeError(f"warm-up reached {len(set(pids))} Ray workers of {cpus}")
        t0 = time.perf_counter()
        manifest = build_shards(inputs, out, shard_size=shard_size, split_fractions=(1.0, 0.0, 0.0),
                                progress=False)
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    shutil.rmtree(out, ignore_errors=True)
    return {"frames_per_s": manifest["totals"]["frames_read"] / seconds, "frames": manifest["totals"]["frames_read"]}


def sharding(tmp: Path, frames: int, rounds: int, out: Path) -> Path:
    from tests.helpers.water_systems import water_box

    water = write_deepmd(tmp / "water64", [water_box(64, seed=s) for s in range(8)], frames, seed=1)
    molecule, label = small_molecule_input(tmp, 1000)
    for tag, name, inputs, shard_size in (("water", "64-water frames (192 atoms)", [str(water)], max(frames // 16, 1)),
                                          ("molecule", label, [molecule], 250)):
        arms = {f"{cpus}worker": Command([sys.executable, __file__, "--child", "shard", json.dumps(inputs),
                                          str(tmp / f"out_{tag}_{cpus}"), str(cpus), str(shard_size)])
                for cpus in (1, 2)}
        compare(f"Ray sharding, {name}, {frames if tag == 'water' else 'all'} frames, {shard_size} per task",
                arms, "1worker", {"frames_per_s": RATE}, rounds=rounds, json_path=out / f"shards_{tag}.json",
                notes={"command": " ".join(sys.argv)})
    return water


def raw_tar_rate(shard_dir: Path) -> dict:
    from data_shards.manifest import load_manifest, shard_paths

    t0, nbytes, members = time.perf_counter(), 0, 0
    for path in shard_paths(load_manifest(shard_dir), "train"):
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isfile():
                    nbytes += len(tar.extractfile(m).read())
                    members += 1
    seconds = time.perf_counter() - t0
    return {"samples_per_s": _samples(shard_dir) / seconds, "mb_per_s": nbytes / seconds / 1e6, "members": members}


def _samples(shard_dir: Path) -> int:
    return json.loads((shard_dir / "manifest.json").read_text())["splits"]["train"]["samples"]


def stream_rate(shard_dir: Path, workers: int) -> dict:
    from data_shards.stream import ShardStream

    t0 = time.perf_counter()
    seen = sum(b.num_graphs for b in ShardStream(shard_dir, "train", 16, 3.5, num_workers=workers))
    seconds = time.perf_counter() - t0
    if seen != _samples(shard_dir):
        raise RuntimeError(f"streamed {seen} samples of {_samples(shard_dir)}")
    tar_bytes = sum(s["bytes"] for s in json.loads((shard_dir / "manifest.json").read_text())["shards"])
    return {"samples_per_s": seen / seconds, "mb_per_s": tar_bytes / seconds / 1e6}


def read_rates(tmp: Path, water: Path, rounds: int, out: Path) -> None:
    from data_shards.build import build_shards

    shards = tmp / "read_shards"
    build_shards([str(water)], str(shards), shard_size=250, split_fractions=(1.0, 0.0, 0.0), use_ray=False,
                 progress=False)
    arms = {"raw_tar": lambda: raw_tar_rate(shards), "stream_0w": lambda: stream_rate(shards, 0),
            "stream_2w": lambda: stream_rate(shards, 2)}
    compare(f"reading {_samples(shards)} 64-water samples: raw tar bytes (nothing decoded) vs ShardStream → graphs",
            arms, "raw_tar", {"samples_per_s": RATE}, rounds=rounds, json_path=out / "read_rates.json",
            notes={"command": " ".join(sys.argv)})


def rss_child(mode: str, src: str, out: str) -> dict:
    t0 = time.perf_counter()
    if mode == "build":
        from data_shards.build import build_shards
        m = build_shards([src], out, shard_size=2000, split_fractions=(1.0, 0.0, 0.0), use_ray=False,
                         progress=False)
        n = m["totals"]["samples_written"]
    else:
        from data_shards.stream import ShardStream
        n = sum(b.num_graphs for b in ShardStream(out, "train", 32, 3.5, num_workers=2, shuffle_buffer=256))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"frames": n, "frames_per_s": n / (time.perf_counter() - t0), "worker_rss_mb": children}


def peak_rss(tmp: Path, sizes: list[int], rounds: int, out: Path) -> None:
    from tests.helpers.water_systems import water_box

    boxes = [water_box(8, seed=s) for s in range(16)]
    sources = {n: write_deepmd(tmp / f"rss_{n}", boxes, n, seed=n) for n in sizes}
    for n, src in sources.items():   # the shards the stream arms read
        subprocess.run([sys.executable, __file__, "--child", "rss", "build", str(src), str(tmp / f"rss_{n}_shards")],
                       check=True, capture_output=True)
    for mode in ("build", "stream"):
        arms = {f"{n}_frames": Command([sys.executable, __file__, "--child", "rss", mode, str(sources[n]),
                                        str(tmp / (f"rss_{n}_shards" if mode == "stream" else f"rss_{n}_again"))])
                for n in sizes}
        compare(f"peak RSS of a fresh process, {mode}, 8-water frames (it must not grow with the corpus)", arms,
                f"{sizes[0]}_frames", {"peak_rss_mb": SIZE, "frames_per_s": RATE}, rounds=rounds,
                json_path=out / f"rss_{mode}.json", notes={"command": " ".join(sys.argv)})
        if mode == "build":
            for n in sizes:
                shutil.rmtree(tmp / f"rss_{n}_again", ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=4000, help="64-water frames for the sharding/read figures")
    p.add_argument("--rss-frames", type=int, nargs="+", default=[10000, 100000])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--skip-read", action="store_true")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.child[0] == "shard":
            emit(build_child(json.loads(args.child[1]), args.child[2], int(args.child[3]), int(args.child[4])))
        else:
            emit(rss_child(*args.child[1:4]))
        return
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        water = sharding(Path(tmp), args.frames, args.rounds, out)
        if not args.skip_read:
            read_rates(Path(tmp), water, args.rounds, out)
        if not args.skip_rss:
            peak_rss(Path(tmp), args.rss_frames, args.rounds, out)


if __name__ == "__main__":
    main()
