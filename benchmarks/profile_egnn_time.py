"""Where a step of the paper's EGNN spends its CPU time: a torch.profiler breakdown by op class.

A training step (`--mode train`: energy + force loss, double backward, AdamW) or an inference (`--mode infer`:
energy + forces). One warm-up step, then one profiled step per arm (same frames, model and weights as
benchmarks/bench_egnn.py).
Self CPU time of every aten op is summed into classes: matmul (mm, addmm, bmm, linear's kernels), gather /
scatter (index_select, index_add, scatter, gather), elementwise (everything else that touches tensors), and
the rest. Printed per arm: seconds and the share of each class, the matmul FLOPs of the step and the rate
the matmul kernels achieved while they ran — against a plain (E × H) @ (H × H) matmul in the same process.
If matmuls dominate, a faster step needs fewer FLOPs, not tighter glue code.

    .venv/bin/python benchmarks/profile_egnn_time.py [--mode train|infer] [--batch 4] [--threads 1]
        [--arms reference fast fast_recompute]
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from bench_egnn import ARMS, PAPER_SIZE, build_arm, load_frames, make_step, plain_matmul_gflops

from data_shards import keys as K
from tests.helpers.water_systems import to_batch

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::addmv", "aten::mv"}
GATHER_SCATTER = {"aten::index_select", "aten::index_add_", "aten::index_add", "aten::scatter_add_",
                  "aten::gather", "aten::index", "aten::index_put_", "aten::scatter_add", "aten::_index_put_impl_"}
NOT_KERNELS = {"aten::empty", "aten::empty_strided", "aten::zeros", "aten::zero_", "aten::fill_", "aten::detach",
               "aten::view", "aten::as_strided", "aten::t", "aten::transpose", "aten::expand", "aten::slice",
               "aten::select", "aten::reshape", "aten::_reshape_alias", "aten::resolve_conj", "aten::resolve_neg"}


def op_class(name: str) -> str:
    if name in MATMUL:
        return "matmul"
    if name in GATHER_SCATTER:
        return "gather/scatter"
    if name.startswith("aten::") and name not in NOT_KERNELS:
        return "elementwise/other aten"
    return "framework (autograd, python, allocation)"


def profile_arm(arm: str, frames, batch, mode: str) -> tuple[dict[str, float], float]:
    """({class: self CPU seconds of one step}, matmul GFLOP of that step)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = build_arm(arm, frames, batch)
    step = make_step(model, batch, mode)
    with FlopCounterMode(display=False) as counter:   # warm-up step, counted
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    seconds: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        seconds[op_class(event.key)] += event.self_cpu_time_total / 1e6
    return dict(seconds), counter.get_total_flops() / 1e9


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="train", choices=["train", "infer"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arms", nargs="+", default=["reference", "fast", "fast_recompute"], choices=sorted(ARMS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    frames, origin = load_frames(args.batch)
    batch = to_batch(frames, cutoff=PAPER_SIZE["cutoff"], dtype=torch.float32)
    nedges = int(batch[K.EDGE_INDEX].shape[1])
    print(f"{args.batch} frames ({origin}), {nedges} edges, {args.threads} thread(s); self CPU s of one "
          f"{args.mode} step by op class")
    for arm in args.arms:
        seconds, gflop = profile_arm(arm, frames, batch, args.mode)
        total = sum(seconds.values())
        matmul_rate = gflop / seconds.get("matmul", float("nan"))
        shares = ", ".join(f"{name} {s:.2f} s ({s / total:.0%})" for name, s in sorted(seconds.items(),
                                                                                       key=lambda kv: -kv[1]))
        print(f"  {arm:>16s}: {total:.2f} s — {shares}; {gflop:.1f} GFLOP at {matmul_rate:.1f} GFLOP/s inside "
              f"the matmul kernels (plain matmul now: "
              f"{plain_matmul_gflops(nedges, int(PAPER_SIZE['hidden']), torch.float32):.1f})")


if __name__ == "__main__":
    main()
