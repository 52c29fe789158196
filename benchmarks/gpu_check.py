"""The GPU path, end to end, in about five minutes on one GPU: run it whenever a GPU machine is lent.

Assumes: a CUDA build of torch already installed, then `DS_BUILD_OPS=0 pip install -e .` in the repo
(nothing else is installed or downloaded); run from the repository root:

    python benchmarks/gpu_check.py [--out runs/gpu_check] [--json gpu_check.json]     # or benchmarks/gpu_check.sh

Checks, in order (each result lands in one JSON file; any failure is recorded and the script exits 1):
  1. NCCL DeepSpeed pretraining through `maskpot pretrain` (torchrun, train.device=cuda; min(2, GPUs) ranks,
     so 1 rank on a 1-GPU machine: NCCL refuses two ranks on one GPU) for fp32 and bf16 × ZeRO 1 and 2: 6
     steps with validation and the linear probe, a checkpoint at step 3, and an exact resume: a copy of the
     run cut back to its step-3 checkpoint resumes to step 6 with the same losses (bitwise equality recorded;
     GPU atomics allow last-bit differences, see RESUME_TOLERANCE);
  2. finetuning on CUDA (`maskpot finetune train.device=cuda`, from the fp32 ZeRO-1 export);
  3. the ASE calculator on CUDA against the CPU calculator (float64, same structure);
  4. training-step throughput (atoms/s) of EGNN, GNS and ForceNet at paper size, batch 16 (64-water
     frames, masked), fp32 and bf16, with peak GPU memory (torch.cuda.max_memory_allocated).
Without CUDA it exits 2 with one line, before doing anything (the project's modules are imported inside the
checks for that reason: the refusal costs only the torch import).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # tests.helpers (generated water boxes) and this tree first
sys.path.insert(0, str(REPO / "benchmarks"))

PRETRAIN_TINY = REPO / "configs" / "pretrain" / "tiny.yaml"
FINETUNE_TINY = REPO / "configs" / "finetune" / "tiny.yaml"
ENGINES = [("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)]
# CUDA scatter-adds (atomics) make two runs differ in the last bits even from one checkpoint: the check records
# bitwise equality and passes a resume whose losses agree to this relative tolerance (a wrong data position or
# LR schedule is off by far more). On CPU resumes are bit-identical (tests/maskpot/test_gpu_check.py).
RESUME_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}


def require_cuda() -> None:
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__} (CUDA_VISIBLE_DEVICES="
              f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): run it on a GPU machine with a CUDA build of torch",
              file=sys.stderr)
        sys.exit(2)


def write_frames(path: Path, frames: int, seed: int) -> None:
    """Waters of `water_box` (8 molecules, 6.5 Å) with made-up labels in eV and eV/Å."""
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    from data_shards import keys as K
    from tests.helpers.water_systems import water_box

    rng = np.random.default_rng(seed)
    structures = []
    for i in range(frames):
        s = water_box(8, seed=seed * 1000 + i, box_length=6.5)
        atoms = Atoms(numbers=s[K.SPECIES], positions=s[K.POSITIONS], cell=s[K.CELL], pbc=True)
        atoms.calc = SinglePointCalculator(atoms, energy=-470.0 * 8 + rng.normal(0, 0.3),
                                           forces=rng.normal(0, 0.5, (len(atoms), 3)))
        structures.append(atoms)
    ase.io.write(str(path), structures, format="extxyz")


def build_shards(root: Path) -> Path:
    from data_shards.build import build_shards as build

    root.mkdir(parents=True, exist_ok=True)
    for name, frames, seed in (("train", 16, 1), ("val", 8, 2), ("test", 8, 3)):
        write_frames(root / f"{name}.xyz", frames, seed)
    out = root / "shards"
    build([f"{n}={root / f'{n}.xyz'}" for n in ("train", "val", "test")], str(out), shard_size=4,
          use_ray=False, progress=False)
    return out


def maskpot(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "maskpot.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout, check=False)


def losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def pretrain_check(shards: Path, out: Path, precision: str, zero: int, nproc: int, device: str = "cuda") -> dict:
    run = out / f"pretrain_{precision}_zero{zero}"
    common = ["--config", str(PRETRAIN_TINY), "--nproc", str(nproc), "--override", f"data.manifest_dir={shards}",
              f"train.device={device}", f"deepspeed.precision={precision}", f"deepspeed.zero_stage={zero}",
              "train.max_steps=6", "train.val_every=3", "train.checkpoint_every=3", "train.keep_last=3",
              "train.linear_probe=true", "optim.decay_steps=10"]
    started = time.perf_counter()
    full = maskpot("pretrain", *common, f"train.out_dir={run}", "--resume", "never")
    result = {"precision": precision, "zero_stage": zero, "ranks": nproc,
              "backend": "nccl" if device == "cuda" else "gloo",
              "seconds": round(time.perf_counter() - started, 1)}
    if full.returncode != 0:
        return {**result, "ok": False, "error": (full.stdout + full.stderr)[-1500:]}
    expected = losses(run)
    cut = out / f"pretrain_{precision}_zero{zero}_resumed"
    shutil.rmtree(cut, ignore_errors=True)
    shutil.copytree(run, cut)
    for tag in (cut / "checkpoints").glob("step*"):
        if int(tag.name[4:]) > 3:
            shutil.rmtree(tag)
    (cut / "checkpoints" / "best.json").unlink(missing_ok=True)
    kept = [x for x in (cut / "metrics.jsonl").read_text().splitlines() if json.loads(x).get("step", 0) <= 3]
    (cut / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    resumed = maskpot("pretrain", *common, f"train.out_dir={cut}", "--resume", "auto")
    if resumed.returncode != 0:
        return {**result, "ok": False, "error": "resume: " + (resumed.stdout + resumed.stderr)[-1500:]}
    again = losses(cut)
    exact = all(again.get(s) == expected.get(s) for s in range(4, 7))
    if sorted(expected) != list(range(1, 7)) or sorted(again) != list(range(1, 7)):
        return {**result, "ok": False, "error": f"steps logged: {sorted(expected)} and resumed {sorted(again)}"}
    rel = max(abs(again[s] - expected[s]) / max(abs(expected[s]), 1e-12) for s in range(4, 7))
    return {**result, "ok": exact or rel <= RESUME_TOLERANCE[precision], "losses": expected,
            "resumed_losses": {s: again[s] for s in range(4, 7)}, "exact_resume": exact,
            "max_rel_diff": rel, "export": str(run / "export")}


def finetune_check(shards: Path, out: Path, init: Path | None, device: str = "cuda") -> dict:
    run = out / "finetune"
    args = ["--config", str(FINETUNE_TINY), "--override", f"data.manifest_dir={shards}", f"train.out_dir={run}",
            f"train.device={device}", "train.max_steps=10", "tracking.enabled=false"]
    started = time.perf_counter()
    done = maskpot("finetune", *args, *(["--init", str(init)] if init else []))
    if done.returncode != 0:
        return {"ok": False, "error": (done.stdout + done.stderr)[-1500:]}
    results = json.loads((run / "results.json").read_text())
    return {"ok": results["device"].startswith(device), "device": results["device"], "best_step": results["best_step"],
            "val_force_rmse_mev_per_a": results["best_val"]["force_rmse_mev_per_a"] if results["best_val"] else None,
            "seconds": round(time.perf_counter() - started, 1)}


def calculator_check(export: Path) -> dict:
    from ase import Atoms

    from data_shards import keys as K
    from finetune.forcefield.calculator import MaskpotCalculator
    from tests.helpers.water_systems import water_box

    s = water_box(32, seed=7)
    atoms = Atoms(numbers=s[K.SPECIES], positions=s[K.POSITIONS], cell=s[K.CELL], pbc=True)
    figures = {}
    for device in ("cpu", "cuda"):
        atoms.calc = MaskpotCalculator(export, dtype="float64", device=device)
        started = time.perf_counter()
        figures[device] = (atoms.get_potential_energy(), atoms.get_forces().copy())
        figures[device + "_s"] = time.perf_counter() - started
    de = abs(figures["cuda"][0] - figures["cpu"][0])
    df = float(np.abs(figures["cuda"][1] - figures["cpu"][1]).max())
    return {"ok": de < 1e-6 and df < 1e-6, "atoms": len(atoms), "energy_diff_ev": de, "max_force_diff_ev_per_a": df,
            "device": str(atoms.calc.device)}


def throughput(model_name: str, precision: str, frames: int = 16, steps: int = 5) -> dict:
    from bench_pretrain import PAPER_MODELS, masked_batch, train_step

    from pretrain.engine import MODEL_INPUT_FLOATS
    from pretrain.models import build_model

    device = torch.device("cuda")
    torch.manual_seed(0)
    batch = masked_batch(model_name, frames).to(device)
    model = build_model(model_name, PAPER_MODELS[model_name]).to(device).train()
    if precision == "bf16":
        model = model.to(torch.bfloat16)
        for key in MODEL_INPUT_FLOATS:
            if key in batch and batch[key].is_floating_point():
                batch[key] = batch[key].to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.cuda.reset_peak_memory_stats()
    train_step(model, optimizer, batch, precision == "bf16")
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = train_step(model, optimizer, batch, precision == "bf16")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    atoms = int(batch.num_nodes)
    step_s = float(np.median(times))
    return {"model": model_name, "precision": precision, "frames": frames, "atoms": atoms, "step_s": step_s,
            "atoms_per_s": atoms / step_s, "finite": bool(torch.isfinite(loss)),
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/gpu_check", help="work folder (default runs/gpu_check)")
    p.add_argument("--json", default=None, help="results file (default OUT/gpu_check.json)")
    args = p.parse_args()
    require_cuda()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    report: dict = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                    "torch": torch.__version__, "cuda": torch.version.cuda,
                    "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    started = time.perf_counter()
    shards = build_shards(out / "data")
    nproc = min(2, torch.cuda.device_count())
    report["pretrain"] = [pretrain_check(shards, out, precision, zero, nproc) for precision, zero in ENGINES]
    print(json.dumps(report["pretrain"], indent=1)[:4000], flush=True)
    first = report["pretrain"][0]
    export = Path(first["export"]) if first.get("ok") else None
    report["finetune"] = finetune_check(shards, out, export)
    report["calculator"] = calculator_check(export or REPO / "tests" / "assets" / "egnn_tiny_export")
    report["throughput"] = []
    for name in ("egnn", "gns", "forcenet"):
        for precision in ("fp32", "bf16"):
            try:
                report["throughput"].append(throughput(name, precision))
            except RuntimeError as e:  # e.g. out of memory: recorded, the others still run
                report["throughput"].append({"model": name, "precision": precision, "error": str(e)[:300]})
            torch.cuda.empty_cache()
    report["seconds"] = round(time.perf_counter() - started, 1)
    checks = [*report["pretrain"], report["finetune"], report["calculator"]]
    report["ok"] = all(c.get("ok") for c in checks) and all("error" not in t for t in report["throughput"])
    path = Path(args.json) if args.json else out / "gpu_check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    for t in report["throughput"]:
        print(f"{t['model']:9s}{t['precision']:5s} " + (f"{t['atoms_per_s']:>10.0f} atoms/s  "
              f"peak {t['peak_gpu_memory_gb']:.2f} GB" if "error" not in t else t["error"]))
    print(f"gpu_check {'ok' if report['ok'] else 'FAILED'} in {report['seconds']:.0f} s: {path}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
