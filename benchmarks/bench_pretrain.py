"""Masked-pretraining training-step throughput of EGNN, GNS and ForceNet at paper size, and MACE-small
(mace-torch, when installed), fp32 and bf16.

A step = water masking (ratio 0.5, done once, outside the timing) → forward with forces (EGNN: −∂E/∂x with
create_graph, i.e. double backward) → per-atom cosine loss → backward → AdamW step, on `--batch` frames of
64 waters (generated boxes at liquid density, 12.42 Å). bf16 = weights and geometry cast to bf16, loss in
fp32, as `maskpot pretrain` runs DeepSpeed bf16 (DeepSpeed also keeps fp32 master weights; here AdamW
steps the bf16 weights). One process per (model, precision), so each
peak RSS (ru_maxrss) is that configuration's own; one rank, `--threads` torch threads. atoms/s and
structures/s use the wall time; "cpu s/thr" (process CPU seconds / threads) is what a step costs with the
cores to itself, the better figure on a shared, loaded machine.

Achieved FLOP/s = FlopCounterMode's count for one fp32 step (matmul-class ops only: elementwise work is not
counted) / the median step time, against a plain (n × n) @ (n × n) torch matmul timed in the same run (fp32
and bf16), each by wall time and by CPU time / threads.

`--ranks 1 2` adds the full DeepSpeed path: a real `maskpot pretrain --nproc N` (torchrun, ZeRO-1, gloo) on
WebDataset shards of the same frames, the same global batch split over N ranks (2 threads for 1 rank, 1
each for 2), structures/s from the steady-state steps of OUT_DIR/metrics.jsonl, and the ratio 2 ranks / 1.

    nice -n 19 .venv/bin/python benchmarks/bench_pretrain.py [--steps 3] [--batch 16] [--models egnn gns]
        [--ranks 1 2] [--ds-batch 8] [--ds-steps 8]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO)]

from harness import RATE, SIZE, TIME, Command, compare, emit, median_time

from data_shards import keys as K
from pretrain.engine import MODEL_INPUT_FLOATS
from pretrain.models import build_model
from pretrain.models.mace import mace_modules
from pretrain.objectives import cosine_mask_loss
from pretrain.transforms import WaterMasking
from tests.helpers.water_systems import to_batch, water_box

PAPER_MODELS = {
    "egnn": {"hidden": 128, "layers": 5, "cutoff": 3.5},
    "gns": {"latent": 128, "steps": 10, "mlp_layers": 2, "cutoff": 3.4},
    "forcenet": {"hidden": 128, "blocks": 5, "cutoff": 3.4},
}
if mace_modules() is not None:  # MACE-small (32x0e, max_L 0, r_max 5 Å, correlation 3, 2 interactions)
    PAPER_MODELS["mace"] = {"num_channels": 32, "max_L": 0, "correlation": 3, "num_interactions": 2,
                            "r_max": 5.0, "avg_num_neighbors": 50.0, "elements": [1, 8]}
BOX_64_WATERS = 12.4447  # Å, 64 waters at ~1 g/cm³ (the RPBE boxes' size)


def masked_batch(model_name: str, frames: int):
    params = PAPER_MODELS[model_name]
    cutoff = params.get("cutoff", params.get("r_max"))
    masking = WaterMasking(ratio=0.5, seed=0)
    samples = [masking(water_box(64, seed=i, box_length=BOX_64_WATERS), 0) for i in range(frames)]
    return to_batch(samples, cutoff=cutoff, dtype=torch.float32)


def train_step(model, optimizer, batch, bf16: bool):
    out = model(batch, compute_forces=True)
    loss = cosine_mask_loss(out[K.PRED_FORCES].float(), batch[K.MASK_TARGET], batch[K.MASK_FLAG])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def worker(model_name: str, precision: str, frames: int, steps: int, threads: int) -> dict:
    """One (model, precision) in this process; returns the figures as a dict."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch = masked_batch(model_name, frames)
    model = build_model(model_name, PAPER_MODELS[model_name]).train()
    bf16 = precision == "bf16"
    if bf16:  # as DeepSpeed bf16 runs it (pretrain.engine.to_model_precision): weights and geometry in bf16
        model = model.to(torch.bfloat16)
        for key in MODEL_INPUT_FLOATS:
            if key in batch and batch[key].is_floating_point():
                batch[key] = batch[key].to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    result = {"model": model_name, "precision": precision, "frames": frames,
              "atoms": int(batch[K.NATOMS].sum()), "edges": int(batch[K.EDGE_INDEX].shape[1]),
              "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    try:
        loss = train_step(model, optimizer, batch, bf16)  # warm-up
        times, cpu = [], []
        for _ in range(steps):
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = train_step(model, optimizer, batch, bf16)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()}")
    except (RuntimeError, FloatingPointError) as e:  # e.g. an op without a bf16 CPU kernel
        return {**result, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    result["step_s"] = float(np.median(times))
    result["cpu_s"] = float(np.median(cpu)) / threads  # what a step costs with the cores to itself
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    with FlopCounterMode(display=False) as counter:
        train_step(model, sgd, batch, bf16=bf16)
    result["flops"] = counter.get_total_flops()
    result["achieved_gflops"] = result["flops"] / result["step_s"] / 1e9
    result["matmul_gflops"] = matmul_flops(1024, torch.bfloat16 if bf16 else torch.float32)
    result["atoms_per_s"] = result["atoms"] / result["step_s"]
    return result


def matmul_flops(n: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """FLOP/s (median wall time) of a plain (n × n) @ (n × n) matmul in this process."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_time(lambda: a @ b, repeats, warmup=2)


def corpus_shards(root: Path, frames: int) -> Path:
    """Unlabelled WebDataset shards of `frames` 64-water boxes (the frames the step timings use)."""
    import ase
    import ase.io

    from data_shards.build import build_shards

    atoms = [ase.Atoms(numbers=s[K.SPECIES], positions=s[K.POSITIONS], cell=s[K.CELL], pbc=True)
             for s in (water_box(64, seed=i, box_length=BOX_64_WATERS) for i in range(frames))]
    ase.io.write(root / "boxes.extxyz", atoms, format="extxyz")
    build_shards([f"train={root / 'boxes.extxyz'}"], str(root / "shards"), shard_size=max(frames // 4, 1),
                 require_labels=False, use_ray=False, progress=False)
    return root / "shards"


def deepspeed_rate(shards: Path, out: Path, model_name: str, precision: str, nproc: int, global_batch: int,
                   steps: int) -> dict:
    """structures/s of `maskpot pretrain --nproc N` (steady state: the first third of the steps dropped)."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "pretrain" / "tiny.yaml").read_text())
    config["model"] = {"name": model_name, "params": PAPER_MODELS[model_name]}   # replaced, not merged
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "maskpot.cli", "pretrain", "--config", str(out.parent / f"{out.name}.yaml"),
           "--nproc", str(nproc), "--resume", "never", "--override", f"data.manifest_dir={shards}",
           f"data.batch_size={global_batch // nproc}",
           f"deepspeed.precision={precision}", "deepspeed.zero_stage=1", f"train.max_steps={steps}",
           f"train.val_every={10 * steps}", f"train.checkpoint_every={10 * steps}", "train.log_every=1",
           f"train.out_dir={out}"]
    env = {**os.environ, "TQDM_DISABLE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, 2 // nproc))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if proc.returncode != 0:
        raise RuntimeError((proc.stdout + proc.stderr).strip()[-2000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["structures_per_s"] for r in rows if "structures_per_s" in r][steps // 3:]
    return {"structures_per_s": float(np.median(rates))}


def steps_section(args) -> None:
    for model_name in args.models:
        commands = {precision: Command([sys.executable, __file__, "--worker", model_name, precision, "--batch",
                                        str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)],
                                       env={"OMP_NUM_THREADS": str(args.threads)})
                    for precision in args.precisions}
        record = compare(f"{model_name} masked-pretraining step, batch {args.batch}, {args.threads} threads",
                         commands, args.precisions[0], {"step_s": TIME, "peak_rss_mb": SIZE},
                         rounds=args.rounds, json_path=Path(args.out) / f"pretrain_step_{model_name}.json",
                         notes={"command": " ".join(sys.argv)})
        for precision, rows in record["samples"].items():
            m = [row["metrics"] for row in rows]
            print(f"   {precision}: {np.median([r['atoms_per_s'] for r in m]):.0f} atoms/s, "
                  f"{m[0]['flops'] / 1e9:.1f} GFLOP/step, achieved {np.median([r['achieved_gflops'] for r in m]):.1f} "
                  f"GFLOP/s vs a plain 1024³ matmul {np.median([r['matmul_gflops'] for r in m]):.1f} GFLOP/s "
                  f"in the same process", flush=True)


def distributed_section(args) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        shards = corpus_shards(Path(tmp), max(4 * args.ds_batch, 32))
        for model_name in args.models:
            for precision in args.precisions:
                commands = {f"{n}rank": Command([sys.executable, __file__, "--ds-child", model_name, precision,
                                                 str(n), str(shards), str(Path(tmp) / f"{model_name}_{precision}"),
                                                 "--ds-batch", str(args.ds_batch), "--ds-steps", str(args.ds_steps)])
                            for n in args.ranks}
                compare(f"DeepSpeed ZeRO-1 {model_name} {precision}, global batch {args.ds_batch}, "
                        f"{args.ds_steps} steps (structures/s, steady state)", commands, f"{args.ranks[0]}rank",
                        {"structures_per_s": RATE}, rounds=args.rounds,
                        json_path=Path(args.out) / f"deepspeed_{model_name}_{precision}.json",
                        notes={"command": " ".join(sys.argv)})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median) after one warm-up step")
    parser.add_argument("--batch", type=int, default=16, help="64-water frames per step (paper: 16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(PAPER_MODELS), choices=list(PAPER_MODELS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="the first is the baseline arm")
    parser.add_argument("--ranks", nargs="*", type=int, default=[], choices=[1, 2],
                        help="also time `maskpot pretrain --nproc N` for these N (e.g. --ranks 1 2; first = baseline)")
    parser.add_argument("--ds-batch", type=int, default=8, help="global batch (frames) of the DeepSpeed runs")
    parser.add_argument("--ds-steps", type=int, default=9, help="steps of each DeepSpeed run")
    parser.add_argument("--skip-steps", action="store_true", help="only the DeepSpeed section")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--ds-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(*args.worker, args.batch, args.steps, args.threads)
        if "error" in result:
            raise SystemExit(result["error"])
        emit(result)
        return
    if args.ds_child:
        model_name, precision, nproc, shards, out = args.ds_child
        emit(deepspeed_rate(Path(shards), Path(out) / f"n{nproc}", model_name, precision, int(nproc),
                            args.ds_batch, args.ds_steps))
        return
    if not args.skip_steps:
        steps_section(args)
    if args.ranks:
        distributed_section(args)


if __name__ == "__main__":
    main()
