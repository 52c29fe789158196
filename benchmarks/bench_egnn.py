"""The paper's EGNN function, fast form against its straightforward per-edge form, through the harness.

Every arm is a fresh process per round (peak RSS is that process's own, `os.wait4`), arms alternated
(reference fast fast_recompute … × `--rounds`), ratios paired per round against the `reference` arm:
`egnn_paper` with implementation "reference" (per-edge concatenation [h_i, h_j, d²] → Linear(2H+1, H),
torch SiLU, all activations kept) — the same function and weights (seed 0) as the fast arms.
Training step = forward + forces by autograd (create_graph) + backward of an L1 energy + force loss + AdamW
step; inference = energy + forces (no create_graph). Frames: the first `--batch` DFT-water frames of
../shared/data/water_deepmd data_0 (192 atoms each), else generated 64-water boxes. fp32 unless the arm
says bf16 (weights and edge geometry in bf16, E0 sum in float64).

Each child also reports: executed FLOPs of one step (FlopCounterMode: matmul-class ops only), the achieved
FLOP/s, a plain (E × H) @ (H × H) torch matmul's FLOP/s in the same process and dtype, and the RMS deviation
of its forces from float64 forces of the same weights (meV/Å; the bf16 accuracy cost).

    .venv/bin/python benchmarks/bench_egnn.py [--mode train infer] [--rounds 3] [--steps 3] [--threads 2]
        [--arms reference fast fast_recompute fast_bf16] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

from harness import RATE, SIZE, TIME, Command, compare, emit

SHARED_WATER = REPO.parent / "shared" / "data" / "water_deepmd" / "data" / "data_0"
ARMS = {   # name → (model name, params, dtype)
    "reference": ("egnn_paper", {"implementation": "reference"}, "float32"),
    "fast": ("egnn_paper", {"implementation": "fast", "recompute": False}, "float32"),
    "fast_recompute": ("egnn_paper", {"implementation": "fast", "recompute": True}, "float32"),
    "fast_bf16": ("egnn_paper", {"implementation": "fast", "recompute": True}, "bfloat16"),
    "fast_bf16_norecompute": ("egnn_paper", {"implementation": "fast", "recompute": False}, "bfloat16"),
    "maskpot_egnn": ("egnn", {"num_rbf": 0}, "float32"),   # the default EGNN (another function), for context
}
PAPER_SIZE = {"hidden": 128, "layers": 5, "cutoff": 3.5}


def load_frames(count: int):
    import numpy as np

    from tests.helpers.water_systems import make_sample, water_box

    if (SHARED_WATER / "type.raw").is_file():
        species = np.array([8, 1])[np.loadtxt(SHARED_WATER / "type.raw", dtype=np.int64)]
        folder = SHARED_WATER / "set.000"
        coords, boxes = np.load(folder / "coord.npy"), np.load(folder / "box.npy")
        energies, forces = np.load(folder / "energy.npy"), np.load(folder / "force.npy")
        return [make_sample(species, coords[i].reshape(-1, 3), boxes[i].reshape(3, 3), (True,) * 3,
                            energy=energies[i], forces=forces[i].reshape(-1, 3)) for i in range(count)], "DFT water"
    return [water_box(64, seed=i, box_length=12.4447, labelled=True) for i in range(count)], "generated water"


def child(arm: str, mode: str, batch_size: int, steps: int, threads: int) -> None:
    # imported here: the parent process only launches children and should not pay for torch
    import torch
    from harness import median_time
    from torch.utils.flop_counter import FlopCounterMode

    from data_shards import keys as K
    from pretrain.models import build_model
    from pretrain.objectives import energy_force_loss
    from tests.helpers.water_systems import to_batch

    torch.set_num_threads(threads)
    name, params, dtype_name = ARMS[arm]
    dtype = getattr(torch, dtype_name)
    frames, origin = load_frames(batch_size)
    batch = to_batch(frames, cutoff=PAPER_SIZE["cutoff"], dtype=torch.float32)
    torch.manual_seed(0)
    model = build_model(name, {**PAPER_SIZE, **params})
    mean_e = float(batch[K.ENERGY].mean() / batch[K.NATOMS].double().mean())
    model.set_normalisation(0.05, {8: mean_e, 1: mean_e})
    exact = None
    if dtype != torch.float32:   # float64 forces of the same weights: what the lower precision costs
        with torch.no_grad():
            exact = model.double().eval()(to_batch(frames, cutoff=PAPER_SIZE["cutoff"]))[K.PRED_FORCES].float()
    model = model.to(dtype)
    natoms, nedges = int(batch[K.NATOMS].sum()), int(batch[K.EDGE_INDEX].shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)

    def train_step():
        out = model(batch, compute_forces=True)
        loss = energy_force_loss(out[K.PRED_ENERGY], batch[K.ENERGY], out[K.PRED_FORCES].float(),
                                 batch[K.FORCES], batch[K.NATOMS], force_weight=1.0, energy_scale=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step():
        return model(batch, compute_forces=True)

    if mode == "train":
        model.train()
        step = train_step
    else:
        model.eval()
        step = infer_step
    deviation = model_rms = float("nan")
    if exact is not None:
        model_rms = float(exact.pow(2).mean().sqrt()) * 1000
        with torch.no_grad():
            forces = model.eval()(batch)[K.PRED_FORCES].float()
        deviation = float(((forces - exact) ** 2).mean().sqrt()) * 1000
    model.train(mode == "train")
    with FlopCounterMode(display=False) as counter:   # the warm-up step, counted
        step()
    flops = counter.get_total_flops()
    wall, cpu = [], []
    for _ in range(steps):   # wall and process CPU time of the same steps (CPU time: less sensitive to load)
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    seconds, cpu_seconds = statistics.median(wall), statistics.median(cpu)
    hidden = PAPER_SIZE["hidden"]
    a, b = torch.randn(nedges, hidden, dtype=dtype), torch.randn(hidden, hidden, dtype=dtype)
    matmul_s = median_time(lambda: a @ b, 20, warmup=2)
    emit({"s_per_step": seconds, "cpu_s_per_step": cpu_seconds, "atoms_per_s": natoms / seconds, "flops": flops,
          "achieved_gflops": flops / seconds / 1e9, "matmul_gflops": 2 * nedges * hidden * hidden / matmul_s / 1e9,
          "force_dev_vs_fp64_mev": deviation, "model_force_rms_mev": model_rms,
          "dft_force_rms_mev": float(batch[K.FORCES].pow(2).mean().sqrt()) * 1000,
          "natoms": natoms, "nedges": nedges, "data": origin, "threads": torch.get_num_threads()})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--arms", nargs="+", default=["reference", "fast", "fast_recompute", "fast_bf16"],
                        choices=sorted(ARMS))
    parser.add_argument("--baseline", default="reference", choices=sorted(ARMS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (median)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(BENCH / "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.mode[0], args.batch, args.steps, args.threads)
        return
    arms = [args.baseline] + [a for a in args.arms if a != args.baseline]
    for mode in args.mode:
        commands = {arm: Command([sys.executable, __file__, "--child", arm, "--mode", mode, "--batch",
                                  str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)],
                                 env={"OMP_NUM_THREADS": str(args.threads)}) for arm in arms}
        record = compare(f"egnn_paper {mode}, batch {args.batch}, {args.threads} threads", commands, args.baseline,
                         {"s_per_step": TIME, "cpu_s_per_step": TIME, "peak_rss_mb": SIZE,
                          "achieved_gflops": RATE}, rounds=args.rounds,
                         json_path=Path(args.out) / f"egnn_{mode}.json", notes={"command": " ".join(sys.argv)})
        for arm, rows in record["samples"].items():
            m = [row["metrics"] for row in rows]
            fraction = statistics.median(r["achieved_gflops"] / r["matmul_gflops"] for r in m)
            print(f"   {arm:>22s}: {statistics.median(r['atoms_per_s'] for r in m):8.0f} atoms/s, "
                  f"{m[0]['flops'] / 1e9:7.1f} GFLOP/step, achieved "
                  f"{statistics.median(r['achieved_gflops'] for r in m):6.1f}"
                  f" GFLOP/s = {fraction:.2f} of a plain matmul in the same process "
                  f"({statistics.median(r['matmul_gflops'] for r in m):6.1f} GFLOP/s); forces vs fp64: "
                  f"{m[0]['force_dev_vs_fp64_mev']:.3g} meV/Å RMS, of model forces {m[0]['model_force_rms_mev']:.3g} "
                  f"(DFT force RMS {m[0]['dft_force_rms_mev']:.0f})")
        print(json.dumps({"natoms": m[0]["natoms"], "nedges": m[0]["nedges"], "data": m[0]["data"],
                          "threads": m[0]["threads"]}))


if __name__ == "__main__":
    main()
