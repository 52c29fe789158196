"""EGNN training and inference throughput at paper size, against a naive (reference-style) evaluation.

Training step = forward + forces by autograd (create_graph) + backward of an L1 energy + force loss +
AdamW step, on a batch of 16 frames of 64 waters (192 atoms). Frames come from
../shared/data/water_deepmd when present, else generated boxes of the same size.
The baseline is the *same* model and weights evaluated the reference way: the first edge-MLP layer
applied to the per-edge concatenation [h_i, h_j, d²], torch's SiLU (whose derivative torch builds from
~6 elementwise ops when differentiated twice). Outputs are checked equal before timing.

    .venv/bin/python benchmarks/bench_egnn.py [--steps 5] [--batch 16] [--threads 2]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # tests.helpers, and this tree before any installed copy

from data_shards import keys as K  # noqa: E402
from pretrain.models import build_model  # noqa: E402
from pretrain.models.egnn import SiLU  # noqa: E402
from pretrain.objectives import energy_force_loss  # noqa: E402
from tests.helpers.water_systems import make_sample, to_batch, water_box  # noqa: E402

SHARED_WATER = REPO.parent / "shared" / "data" / "water_deepmd" / "data" / "data_0"
REFERENCE_TRAIN_ATOMS_PER_S = 637    # TARGETS.md, the paper's EGNN code on this machine
REFERENCE_INFER_ATOMS_PER_S = 1709


def load_frames(count: int) -> tuple[list[dict], str]:
    if (SHARED_WATER / "type.raw").is_file():
        types_ = np.loadtxt(SHARED_WATER / "type.raw", dtype=np.int64)
        species = np.array([8, 1])[types_]
        folder = SHARED_WATER / "set.000"
        coords, boxes = np.load(folder / "coord.npy"), np.load(folder / "box.npy")
        energies, forces = np.load(folder / "energy.npy"), np.load(folder / "force.npy")
        frames = [make_sample(species, coords[i].reshape(-1, 3), boxes[i].reshape(3, 3), (True,) * 3,
                              energy=energies[i], forces=forces[i].reshape(-1, 3)) for i in range(count)]
        return frames, f"water_deepmd data_0 ({len(species)} atoms)"
    frames = [water_box(64, seed=i, box_length=12.4447, labelled=True) for i in range(count)]
    return frames, "generated 64-water boxes (shared data absent)"


def naive_layer_forward(layer, h, vectors, src, dst, envelope):
    """Reference style: Linear(2H+1 → H) on the per-edge concatenation [h_i, h_j, d²], torch's SiLU."""
    silu = torch.nn.functional.silu
    dist2 = (vectors * vectors).sum(-1, keepdim=True)
    weight = torch.cat([layer.edge_src.weight, layer.edge_dst.weight, layer.edge_dist[:, None]], dim=1)
    edge_features = torch.cat([h[src], h[dst], dist2], dim=-1)
    messages = silu(layer.edge_out(silu(torch.nn.functional.linear(edge_features, weight, layer.edge_src.bias))))
    aggregated = torch.zeros_like(h).index_add_(0, src, messages * envelope)
    h = h + layer.node_mlp(torch.cat([h, aggregated], dim=-1))
    if layer.coord_mlp is not None:
        weight = layer.coord_mlp(messages) * envelope / (dist2.sqrt() + 1.0)
        delta = vectors.new_zeros(h.shape[0], 3).index_add_(0, src, -vectors * weight)
        vectors = vectors + delta[dst] - delta[src]
    return h, vectors


def make_naive(model):
    """The same function and weights, evaluated the reference way."""
    for layer in model.layers:
        layer.forward = types.MethodType(naive_layer_forward, layer)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, SiLU):
                setattr(module, name, torch.nn.SiLU())
    return model


def train_step(model, optimizer, batch):
    out = model(batch, compute_forces=True)
    loss = energy_force_loss(out[K.PRED_ENERGY], batch[K.ENERGY], out[K.PRED_FORCES], batch[K.FORCES],
                             batch[K.NATOMS], force_weight=1.0, energy_scale=0.05)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def timed(fn, steps: int, warmup: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds per call after `warmup` calls.

    The machine is shared: CPU seconds / threads is what the step costs when it has the cores to itself.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(wall)), float(np.median(cpu))


def time_training(model, batch, steps: int) -> tuple[float, float]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    return timed(lambda: train_step(model, optimizer, batch), steps, warmup=3)


def time_inference(model, batch, steps: int) -> tuple[float, float]:
    model.eval()
    return timed(lambda: model(batch), steps, warmup=1)


def training_flops(model, batch) -> int:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with FlopCounterMode(display=False) as counter:
        train_step(model, optimizer, batch)
    return counter.get_total_flops()


def matmul_flops_per_s(rows: int, hidden: int, repeats: int = 20) -> float:
    a, b = torch.randn(rows, hidden), torch.randn(hidden, hidden)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * rows * hidden * hidden * repeats / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    frames, origin = load_frames(args.batch)
    params = {"hidden": args.hidden, "layers": args.layers, "cutoff": 3.5, "num_rbf": 0}  # the paper's EGNN
    model = build_model("egnn", params)
    batch = to_batch(frames, cutoff=3.5, dtype=torch.float32)
    mean_e = float(batch[K.ENERGY].mean() / batch[K.NATOMS].double().mean())
    model.set_normalisation(0.05, {8: mean_e, 1: mean_e})
    natoms, nedges = int(batch[K.NATOMS].sum()), batch[K.EDGE_INDEX].shape[1]
    nparams = sum(p.numel() for p in model.parameters())
    print(f"data: {origin}; batch {args.batch} frames = {natoms} atoms, {nedges} directed edges "
          f"({nedges / args.batch:.0f}/frame); model {params}, {nparams / 1e6:.2f} M parameters; "
          f"{torch.get_num_threads()} threads")

    naive = make_naive(build_model("egnn", params))
    naive.load_state_dict(model.state_dict())
    with torch.no_grad():  # no graphs kept alive: they would count in the peak RSS below
        ours_out, naive_out = model.eval()(batch), naive.eval()(batch)
    assert torch.allclose(ours_out[K.PRED_ENERGY], naive_out[K.PRED_ENERGY], rtol=0, atol=1e-3)
    assert torch.allclose(ours_out[K.PRED_FORCES], naive_out[K.PRED_FORCES], rtol=1e-3, atol=1e-4)
    del ours_out, naive_out

    ours_train = time_training(model, batch, args.steps)
    ours_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    ours_infer = time_inference(model, batch, args.steps)
    naive_train = time_training(naive, batch, args.steps)
    naive_infer = time_inference(naive, batch, args.steps)

    threads = torch.get_num_threads()
    rows = [("train s/step (wall)", ours_train[0], naive_train[0]),
            ("train s/step (cpu/thr)", ours_train[1] / threads, naive_train[1] / threads),
            ("infer s/call (wall)", ours_infer[0], naive_infer[0]),
            ("infer s/call (cpu/thr)", ours_infer[1] / threads, naive_infer[1] / threads)]
    print(f"{'':26s}{'ours':>10s}{'naive':>10s}{'ratio':>8s}{'ours atoms/s':>14s}{'naive atoms/s':>15s}")
    for name, ours, naive_s in rows:
        print(f"{name:26s}{ours:10.3f}{naive_s:10.3f}{naive_s / ours:8.2f}{natoms / ours:14.0f}"
              f"{natoms / naive_s:15.0f}")
    print(f"vs the reference code (TARGETS.md), wall: training "
          f"{natoms / ours_train[0] / REFERENCE_TRAIN_ATOMS_PER_S:.2f}x of {REFERENCE_TRAIN_ATOMS_PER_S} atoms/s, "
          f"inference {natoms / ours_infer[0] / REFERENCE_INFER_ATOMS_PER_S:.2f}x of "
          f"{REFERENCE_INFER_ATOMS_PER_S} atoms/s")
    print(f"peak RSS after our training steps: {ours_rss_gb:.2f} GB")

    flops_ours, flops_naive = training_flops(model, batch), training_flops(naive, batch)
    peak = matmul_flops_per_s(nedges, args.hidden)
    print(f"training step FLOPs: ours {flops_ours / 1e9:.1f} G, naive {flops_naive / 1e9:.1f} G; achieved "
          f"{flops_ours / ours_train[0] / 1e9:.1f} GFLOP/s vs plain ({nedges}x{args.hidden})@({args.hidden}x"
          f"{args.hidden}) matmul {peak / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
