"""Masked-pretraining training-step throughput of EGNN, GNS and ForceNet at paper size, fp32 and bf16.

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
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # tests.helpers, and this tree before any installed copy

from data_shards import keys as K  # noqa: E402
from pretrain.engine import MODEL_INPUT_FLOATS  # noqa: E402
from pretrain.models import build_model  # noqa: E402
from pretrain.objectives import cosine_mask_loss  # noqa: E402
from pretrain.transforms import WaterMasking  # noqa: E402
from tests.helpers.water_systems import to_batch, water_box  # noqa: E402

PAPER_MODELS = {
    "egnn": {"hidden": 128, "layers": 5, "cutoff": 3.5},
    "gns": {"latent": 128, "steps": 10, "mlp_layers": 2, "cutoff": 3.4},
    "forcenet": {"hidden": 128, "blocks": 5, "cutoff": 3.4},
}
BOX_64_WATERS = 12.4447  # Å, 64 waters at ~1 g/cm³ (the RPBE boxes' size)


def masked_batch(model_name: str, frames: int):
    cutoff = PAPER_MODELS[model_name]["cutoff"]
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
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    if not bf16:
        sgd = torch.optim.SGD(model.parameters(), lr=0.0)
        with FlopCounterMode(display=False) as counter:
            train_step(model, sgd, batch, bf16=False)
        result["flops"] = counter.get_total_flops()
    return result


def matmul_peak(n: int, dtype: torch.dtype, threads: int, repeats: int = 10) -> tuple[float, float]:
    """(FLOP/s by wall time, FLOP/s by process CPU time / threads) of an (n × n) @ (n × n) matmul."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        a @ b
        wall.append(time.perf_counter() - start)
        cpu.append((time.process_time() - start_cpu) / threads)
    return 2 * n**3 / min(wall), 2 * n**3 / max(min(cpu), 1e-9)


def run_worker(args, model_name: str, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", model_name, precision, "--batch", str(args.batch),
           "--steps", str(args.steps), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"model": model_name, "precision": precision, "error": proc.stderr.strip().splitlines()[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


HEADER = (f"{'model':9s}{'prec':6s}{'params M':>9s}{'s/step':>9s}{'cpu s/thr':>10s}{'atoms/s':>10s}"
          f"{'struct/s':>10s}{'RSS GB':>8s}{'GFLOP/step':>11s}{'GFLOP/s':>9s}{'% matmul':>9s}{'cpu GFLOP/s':>12s}"
          f"{'cpu % matmul':>13s}")


def format_row(r: dict, fp32_flops: dict[str, float], peaks: dict[str, tuple[float, float]]) -> str:
    if "error" in r:
        return f"{r['model']:9s}{r['precision']:6s}  failed: {r['error']}"
    step_flops = fp32_flops.get(r["model"], float("nan"))  # the fp32 count: autocast does not change it
    achieved, achieved_cpu = step_flops / r["step_s"], step_flops / r["cpu_s"]
    peak, peak_cpu = peaks[r["precision"]]
    return (f"{r['model']:9s}{r['precision']:6s}{r['params_m']:9.2f}{r['step_s']:9.2f}{r['cpu_s']:10.2f}"
            f"{r['atoms'] / r['step_s']:10.0f}{r['frames'] / r['step_s']:10.2f}{r['peak_rss_gb']:8.2f}"
            f"{step_flops / 1e9:11.1f}{achieved / 1e9:9.2f}{100 * achieved / peak:9.1f}"
            f"{achieved_cpu / 1e9:12.2f}{100 * achieved_cpu / peak_cpu:13.1f}")


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
    env = {**__import__("os").environ, "TQDM_DISABLE": "1", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": str(max(1, 2 // nproc))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr).strip().splitlines()[-1][:160]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["structures_per_s"] for r in rows if "structures_per_s" in r][steps // 3:]
    return {"structures_per_s": float(np.median(rates))}


def distributed_section(args) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        shards = corpus_shards(Path(tmp), max(4 * args.ds_batch, 32))
        print(f"\nDeepSpeed (maskpot pretrain, ZeRO-1, gloo), global batch {args.ds_batch} frames, "
              f"{args.ds_steps} steps; structures/s (steady state)")
        for model_name in args.models:
            for precision in args.precisions:
                rates = {}
                for nproc in args.ranks:
                    r = deepspeed_rate(shards, Path(tmp) / f"{model_name}_{precision}_{nproc}", model_name,
                                       precision, nproc, args.ds_batch, args.ds_steps)
                    rates[nproc] = r.get("structures_per_s")
                    shown = f"{rates[nproc]:.2f} struct/s = {rates[nproc] * 192:.0f} atoms/s" \
                        if rates[nproc] else f"failed: {r['error']}"
                    print(f"  {model_name:9s}{precision:6s}{nproc} rank(s): {shown}", flush=True)
                if rates.get(1) and rates.get(2):
                    print(f"  {model_name:9s}{precision:6s}2 ranks / 1 rank: {rates[2] / rates[1]:.2f}×", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median) after one warm-up step")
    parser.add_argument("--batch", type=int, default=16, help="64-water frames per step (paper: 16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(PAPER_MODELS), choices=list(PAPER_MODELS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--matmul-n", type=int, default=1024)
    parser.add_argument("--ranks", nargs="*", type=int, default=[], choices=[1, 2],
                        help="also time `maskpot pretrain --nproc N` for these N (e.g. --ranks 1 2)")
    parser.add_argument("--ds-batch", type=int, default=8, help="global batch (frames) of the DeepSpeed runs")
    parser.add_argument("--ds-steps", type=int, default=9, help="steps of each DeepSpeed run")
    parser.add_argument("--skip-steps", action="store_true", help="only the DeepSpeed section")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch, args.steps, args.threads)))
        return

    if args.skip_steps:
        distributed_section(args)
        return
    peaks = {"fp32": matmul_peak(args.matmul_n, torch.float32, args.threads),
             "bf16": matmul_peak(args.matmul_n, torch.bfloat16, args.threads)}
    print(f"batch {args.batch} frames of 64 waters (192 atoms each, 160 after masking), {args.steps} timed "
          f"steps, {args.threads} threads, 1 process; plain {args.matmul_n}³ matmul (same run), wall | cpu: "
          f"fp32 {peaks['fp32'][0] / 1e9:.1f} | {peaks['fp32'][1] / 1e9:.1f}, "
          f"bf16 {peaks['bf16'][0] / 1e9:.1f} | {peaks['bf16'][1] / 1e9:.1f} GFLOP/s")
    print(HEADER, flush=True)
    fp32_flops: dict[str, float] = {}
    for model_name in args.models:
        for precision in args.precisions:
            row = run_worker(args, model_name, precision)
            if "flops" in row:
                fp32_flops[model_name] = row["flops"]
            print(format_row(row, fp32_flops, peaks), flush=True)
    if args.ranks:
        distributed_section(args)


if __name__ == "__main__":
    main()
