"""Streaming throughput: ShardStream (shards → batched radius graphs) against `ase.io.read` of an extxyz
plus a per-frame neighbour list (ase.neighborlist), on the same frames, at the EGNN cutoff.

Frames: the 64-water DFT frames (192 atoms) of ../shared/data/water_deepmd when present, else generated
periodic water boxes of the same size. Both paths are timed end to end (file → graphs), best of --repeat.

    .venv/bin/python benchmarks/bench_data.py [--frames 120] [--batch 16] [--cutoff 3.5] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # tests.helpers, and this tree before any installed copy

import ase  # noqa: E402
import ase.io  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402
from ase.neighborlist import neighbor_list  # noqa: E402

from data_shards import keys as K  # noqa: E402
from data_shards import readers  # noqa: E402
from data_shards.build import build_shards  # noqa: E402
from data_shards.stream import ShardStream  # noqa: E402
from tests.helpers.water_systems import water_box  # noqa: E402

SHARED_WATER = REPO.parent / "shared" / "data" / "water_deepmd" / "data"
TARGET_RATIO = 5.0   # TARGETS.md: streaming ≥ 5× ase.io.read + per-frame neighbour list


def source_atoms(count: int) -> tuple[list[ase.Atoms], str]:
    atoms = []
    if SHARED_WATER.is_dir():
        for system in sorted(SHARED_WATER.iterdir()):
            for frame in readers.read_frames(system):
                a = ase.Atoms(numbers=frame.species, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
                a.calc = SinglePointCalculator(a, energy=frame.energy, forces=frame.forces)
                atoms.append(a)
                if len(atoms) == count:
                    return atoms, "DFT water (water_deepmd)"
        if atoms:
            return atoms, "DFT water (water_deepmd)"
    for seed in range(count):
        s = water_box(64, seed=seed, labelled=True)
        a = ase.Atoms(numbers=s[K.SPECIES], positions=s[K.POSITIONS], cell=s[K.CELL], pbc=s[K.PBC])
        a.calc = SinglePointCalculator(a, energy=s[K.ENERGY], forces=s[K.FORCES])
        atoms.append(a)
    return atoms, "generated 64-water boxes"


def time_ase(xyz: Path, cutoff: float) -> tuple[float, int]:
    t0, edges = time.perf_counter(), 0
    for atoms in ase.io.read(xyz, ":"):
        i, j, shifts = neighbor_list("ijS", atoms, cutoff)
        edges += len(i)
        atoms.get_forces(), atoms.get_potential_energy()
    return time.perf_counter() - t0, edges


def time_stream(shard_dir: Path, batch: int, cutoff: float, workers: int) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    frames = edges = 0
    for b in ShardStream(shard_dir, "train", batch, cutoff, num_workers=workers):
        frames += b.num_graphs
        edges += b.edge_index.shape[1]
    return time.perf_counter() - t0, frames, edges


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cutoff", type=float, default=3.5, help="Å (EGNN default)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    atoms, origin = source_atoms(args.frames)
    n_atoms = len(atoms[0])
    with tempfile.TemporaryDirectory() as tmp:
        xyz = Path(tmp) / "frames.xyz"
        ase.io.write(xyz, atoms, format="extxyz")
        shard_dir = Path(tmp) / "shards"
        build_shards([f"train={xyz}"], shard_dir, shard_size=32, use_ray=False, progress=False)
        base_s, base_edges = min((time_ase(xyz, args.cutoff) for _ in range(args.repeat)), key=lambda r: r[0])
        print(f"{len(atoms)} frames of {n_atoms} atoms ({origin}), cutoff {args.cutoff} Å, batch {args.batch}")
        print(f"ase.io.read + ase neighbor_list: {len(atoms) / base_s:8.1f} frames/s ({base_edges} edges)")
        for workers in (0, 2):
            runs = [time_stream(shard_dir, args.batch, args.cutoff, workers) for _ in range(args.repeat)]
            secs, frames, edges = min(runs, key=lambda r: r[0])
            assert frames == len(atoms) and edges == base_edges, (frames, edges, base_edges)
            rate = frames / secs
            print(f"ShardStream, {workers} workers:      {rate:8.1f} frames/s = {rate * n_atoms:9.0f} atoms/s, "
                  f"{rate / (len(atoms) / base_s):5.1f}× baseline (target ≥ {TARGET_RATIO:.0f}×; "
                  f"incl. worker start-up)")


if __name__ == "__main__":
    main()
