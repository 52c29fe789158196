"""Streaming throughput: ShardStream (shards → batched radius graphs) against `ase.io.read` of an extxyz
plus a per-frame neighbour list (ase.neighborlist), on the same frames, at the EGNN cutoff.

Frames: the 64-water DFT frames (192 atoms) of ../shared/data/water_deepmd when present, else generated
periodic water boxes of the same size. Both paths are timed end to end (file → graphs), through
benchmarks/harness.py (arms alternated, `--rounds`, paired ratios to the first arm of the same run).
Second comparison: the loader's frames/s against what the default-size `egnn` consumes in a training step
(energy + force loss, double backward) on `--batch` of the same frames — target ≥ 10× (the model never waits).

    .venv/bin/python benchmarks/bench_data.py [--frames 120] [--batch 16] [--cutoff 3.5] [--rounds 3]
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
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import ase
import ase.io
import numpy as np
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from ase.neighborlist import neighbor_list
from harness import RATE, compare

from data_shards import keys as K
from data_shards import readers
from data_shards.build import build_shards
from data_shards.integrity import sample_problem
from data_shards.manifest import file_sha256
from data_shards.reshard import read_shard_samples
from data_shards.stream import ShardStream
from pretrain.models import build_model
from pretrain.objectives import energy_force_loss
from tests.helpers.water_systems import make_sample, to_batch, water_box

SHARED_WATER = REPO.parent / "shared" / "data" / "water_deepmd" / "data"


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


def time_ase(xyz: Path, cutoff: float, frames: int) -> dict:
    t0, edges = time.perf_counter(), 0
    for atoms in ase.io.read(xyz, ":"):
        i, _, _ = neighbor_list("ijS", atoms, cutoff)
        edges += len(i)
        atoms.get_forces(), atoms.get_potential_energy()
    return {"frames_per_s": frames / (time.perf_counter() - t0), "edges": edges}


def time_stream(shard_dir: Path, batch: int, cutoff: float, workers: int, integrity: str = "fatal") -> dict:
    t0 = time.perf_counter()
    frames = edges = 0
    for b in ShardStream(shard_dir, "train", batch, cutoff, num_workers=workers, integrity_policy=integrity):
        frames += b.num_graphs
        edges += b.edge_index.shape[1]
    return {"frames_per_s": frames / (time.perf_counter() - t0), "edges": edges, "frames": frames}


def model_consumption(atoms: list[ase.Atoms], batch: int, cutoff: float, threads: int):
    """A training step (energy + force loss, double backward, AdamW) of the default-size `egnn` on `batch`
    of the frames: the rate (frames/s) at which the model consumes what the loader produces."""
    torch.set_num_threads(threads)
    samples = [make_sample(a.numbers, a.positions, np.asarray(a.cell), a.pbc, energy=a.get_potential_energy(),
                           forces=a.get_forces()) for a in atoms[:batch]]
    data = to_batch(samples, cutoff=cutoff, dtype=torch.float32)
    torch.manual_seed(0)
    model = build_model("egnn", {"cutoff": cutoff}).train()   # default size: 128 × 5, 16 radial functions
    mean_e = float(data[K.ENERGY].mean() / data[K.NATOMS].double().mean())
    model.set_normalisation(0.05, {8: mean_e, 1: mean_e})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> dict:
        t0 = time.perf_counter()
        out = model(data, compute_forces=True)
        loss = energy_force_loss(out[K.PRED_ENERGY], data[K.ENERGY], out[K.PRED_FORCES], data[K.FORCES],
                                 data[K.NATOMS], energy_scale=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"frames_per_s": batch / (time.perf_counter() - t0)}
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cutoff", type=float, default=3.5, help="Å (EGNN default)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-ase", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-integrity", action="store_true", help="skip the integrity-on-read cost comparison")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()
    atoms, origin = source_atoms(args.frames)
    out = Path(args.out)
    notes = {"command": " ".join(sys.argv), "frames": len(atoms), "atoms_per_frame": len(atoms[0]), "data": origin}
    with tempfile.TemporaryDirectory() as tmp:
        xyz = Path(tmp) / "frames.xyz"
        ase.io.write(xyz, atoms, format="extxyz")
        shard_dir = Path(tmp) / "shards"
        build_shards([f"train={xyz}"], shard_dir, shard_size=32, use_ray=False, progress=False)
        stream = {f"stream_{w}w": (lambda w=w: time_stream(shard_dir, args.batch, args.cutoff, w)) for w in (0, 2)}
        if not args.skip_ase:
            record = compare(f"{len(atoms)} frames of {len(atoms[0])} atoms ({origin}), cutoff {args.cutoff} Å: "
                             f"ShardStream → batched graphs vs ase.io.read + ase neighbor_list",
                             {"ase_read_nl": lambda: time_ase(xyz, args.cutoff, len(atoms)), **stream},
                             "ase_read_nl", {"frames_per_s": RATE}, rounds=args.rounds,
                             json_path=out / "data_stream_vs_ase.json", notes=notes)
            edges = {row["metrics"]["edges"] for rows in record["samples"].values() for row in rows}
            assert len(edges) == 1, f"the arms built different graphs: {edges}"
        if not args.skip_model:
            compare(f"loader throughput vs model consumption: default egnn training step, batch {args.batch}, "
                    f"{args.threads} threads", {"model_step": model_consumption(atoms, args.batch, args.cutoff,
                                                                                args.threads), **stream},
                    "model_step", {"frames_per_s": RATE}, rounds=args.rounds, warmup=1,
                    json_path=out / "data_loader_vs_model.json", notes=notes)
        if not args.skip_integrity:
            integrity_cost(shard_dir, args, out, notes)


def integrity_cost(shard_dir: Path, args, out: Path, notes: dict) -> None:
    """Per-sample checksum cost: the same stream (0 workers: the check runs on the timed thread) with the
    integrity policy `fatal` (the default) against `off`, through the harness (alternated, medians)."""
    compare("integrity on read: ShardStream with per-sample checksums (fatal) vs without (off), 0 workers",
            {"integrity_off": lambda: time_stream(shard_dir, args.batch, args.cutoff, 0, integrity="off"),
             "integrity_fatal": lambda: time_stream(shard_dir, args.batch, args.cutoff, 0, integrity="fatal")},
            "integrity_off", {"frames_per_s": RATE}, rounds=max(args.rounds, 3),
            json_path=out / "data_integrity_cost.json", notes=notes)
    raw = [s for tar in sorted(shard_dir.glob("shard-*.tar")) for s in read_shard_samples(tar, file_sha256(tar))]
    t0 = time.perf_counter()
    for _ in range(5):
        for sample in raw:
            sample_problem(sample)
    check = (time.perf_counter() - t0) / (5 * len(raw))
    print(f"  the check alone: {check * 1e6:.0f} µs per sample")


if __name__ == "__main__":
    main()
