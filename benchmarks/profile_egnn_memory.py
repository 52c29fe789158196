"""What the training step of the paper's EGNN keeps alive for the double backward: a saved-tensor profile.

After the forward and the force pass (autograd.grad with create_graph), just before loss.backward — the peak —
every tensor autograd still holds (saved_tensors_hooks, weak references, storages counted once) is summed
by shape class: edge-sized (first dim = number of edges), node-sized, parameter-sized. Same frames, model and
weights as benchmarks/bench_egnn.py; sizes in MB, so no timing and no ratio: this says *what* dominates.

    .venv/bin/python benchmarks/profile_egnn_memory.py [--batch 4] [--arms reference fast fast_recompute]
"""
from __future__ import annotations

import argparse
import sys
import weakref
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from bench_egnn import ARMS, PAPER_SIZE, load_frames

from data_shards import keys as K
from pretrain.models import build_model
from tests.helpers.water_systems import to_batch


def profile(arm: str, batch) -> dict[str, float]:
    name, params, dtype_name = ARMS[arm]
    torch.manual_seed(0)
    model = build_model(name, {**PAPER_SIZE, **params}).to(getattr(torch, dtype_name)).train()
    nedges, natoms = batch[K.EDGE_INDEX].shape[1], batch[K.SPECIES].shape[0]
    saved: list[tuple[weakref.ref, int, int, str]] = []

    def pack(t):
        kind = "edge" if t.dim() and t.shape[0] == nedges else "node" if t.dim() and t.shape[0] == natoms else "other"
        saved.append((weakref.ref(t), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes(), kind))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch, compute_forces=True)
    alive = {}
    for ref, ptr, nbytes, kind in saved:
        if ref() is not None:
            alive[ptr] = (nbytes, kind)
    totals = {"edge": 0.0, "node": 0.0, "other": 0.0}
    for nbytes, kind in alive.values():
        totals[kind] += nbytes / 1e6
    totals["tensors"] = len(alive)
    totals["edge_tensors_per_layer"] = sum(1 for _, k in alive.values() if k == "edge") / PAPER_SIZE["layers"]
    del out
    return totals


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--arms", nargs="+", default=["reference", "fast", "fast_recompute"], choices=sorted(ARMS))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    frames, origin = load_frames(args.batch)
    batch = to_batch(frames, cutoff=PAPER_SIZE["cutoff"], dtype=torch.float32)
    print(f"{args.batch} frames ({origin}), {batch[K.EDGE_INDEX].shape[1]} edges, {batch[K.SPECIES].shape[0]} atoms; "
          "MB held by autograd before loss.backward (storages counted once)")
    for arm in args.arms:
        t = profile(arm, batch)
        print(f"  {arm:>16s}: edge-sized {t['edge']:8.1f}  node-sized {t['node']:6.1f}  other {t['other']:6.1f}  "
              f"({t['tensors']} tensors, {t['edge_tensors_per_layer']:.1f} edge-sized per layer)")


if __name__ == "__main__":
    main()
