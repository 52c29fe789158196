"""The MACE route on DFT water, against EGNN at equal wall time: shards → masked pretraining (2 DeepSpeed
ranks, stopped by SIGTERM at the budget; the export holds the best-validation weights) → finetune (steps
set from a calibration run so both arms get the same wall time) → test force RMSE → short NPT density.

    PYTHONPATH=. python benchmarks/mace_route.py --out runs/mace_route --pretrain-s 300 --finetune-s 420

Writes OUT/summary.json and prints a markdown table. The machine is shared: wall times are measured and
reported, not assumed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "water_deepmd" / "data"
ARCHS = {
    "egnn": {"hidden": 64, "layers": 4, "cutoff": 3.5},
    # MACE-small as in TARGETS.md: 32x0e, max_L 0, r_max 5 Å, correlation 3, 2 interactions
    "mace": {"num_channels": 32, "max_L": 0, "correlation": 3, "num_interactions": 2, "r_max": 5.0,
             "avg_num_neighbors": 50.0, "elements": [1, 8]},
}


def cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "maskpot.cli", *args], env=env, cwd=REPO,
                            start_new_session=True)


def run(*args: str) -> float:
    started = time.perf_counter()
    proc = cli(*args)
    if proc.wait() != 0:
        raise SystemExit(f"failed: maskpot {' '.join(args)}")
    return time.perf_counter() - started


def pretrain(out: Path, arch: str, budget_s: float) -> dict:
    done = out / f"pretrain_{arch}.json"
    if done.exists():   # a rerun keeps a finished pretraining
        return json.loads(done.read_text())
    base = yaml.safe_load((REPO / "configs" / "pretrain" / "tiny.yaml").read_text())
    base["data"].update(manifest_dir=str(out / "shards"), batch_size=2)
    base["model"] = {"name": arch, "params": ARCHS[arch]}
    base["objective"].update(kind="mask", water_grouping="nearest_oxygen")
    base["optim"].update(lr=1e-3, warmup_steps=10, min_lr=1e-5)
    base["train"].update(max_steps=100000, val_every=10, val_batches=2, checkpoint_every=0, log_every=5,
                         out_dir=str(out / f"pretrain_{arch}"), linear_probe=False)
    base["optim"]["decay_steps"] = 2000
    config = out / f"pretrain_{arch}.yaml"
    config.write_text(yaml.safe_dump(base))
    started = time.perf_counter()
    proc = cli("pretrain", "--config", str(config), "--nproc", "2", "--resume", "never")
    try:
        proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        for pid_file in (out / f"pretrain_{arch}").glob("rank*.pid"):   # each rank checkpoints and exits 0
            os.kill(int(pid_file.read_text()), signal.SIGUSR1)
        proc.wait()
    seconds = time.perf_counter() - started
    metrics = [json.loads(x) for x in (out / f"pretrain_{arch}" / "metrics.jsonl").read_text().splitlines()]
    steps = max(m["step"] for m in metrics)
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    result = {"seconds": seconds, "steps": steps, "best_val_loss": min(val) if val else None}
    done.write_text(json.dumps(result))
    return result


def finetune(out: Path, arch: str, steps: int, tag: str) -> dict:
    """Validation on a few batches only (it would otherwise dominate a short run); test on all of data_3.
    The calibration run validates only at its first and last step."""
    base = yaml.safe_load((REPO / "configs" / "finetune" / "tiny.yaml").read_text())
    base["data"].update(manifest_dir=str(out / "shards"), batch_size=4)
    base["init"] = str(out / f"pretrain_{arch}" / "export")
    base["optim"].update(lr=2e-3, min_lr=1e-5, warmup_steps=min(30, steps // 4))
    base["loss"].update(energy_weight=1.0, force_weight=10.0)
    base["train"].update(max_steps=steps, val_every=steps if tag == "calib" else max(steps // 2, 1),
                         val_batches=1 if tag == "calib" else 4,
                         log_every=max(steps // 10, 1),
                         out_dir=str(out / f"finetune_{arch}_{tag}"))
    base["tracking"]["enabled"] = False
    config = out / f"finetune_{arch}_{tag}.yaml"
    config.write_text(yaml.safe_dump(base))
    seconds = run("finetune", "--config", str(config))
    results = json.loads((out / f"finetune_{arch}_{tag}" / "results.json").read_text())
    return {"seconds": seconds, "steps": steps, "train_seconds": results.get("train_seconds"),
            "test": results.get("test")}


def npt(out: Path, arch: str, steps: int) -> dict:
    traj = out / f"npt_{arch}.extxyz"
    seconds = run("md", str(out / f"finetune_{arch}_final" / "export"), str(DATA / "data_3"), "--ensemble", "npt",
                  "--steps", str(steps), "--temperature", "300", "--timestep", "0.5", "--every", "10", "--pdamp", "200",
                  "--out", str(traj))
    log = [line.split() for line in traj.with_suffix(".log").read_text().splitlines() if not line.startswith("#")]
    density = [float(row[7]) for row in log]
    temperature = [float(row[5]) for row in log]
    return {"seconds": seconds, "steps": steps, "density_start": density[0], "density_end": density[-1],
            "density_mean_second_half": sum(density[len(density) // 2:]) / len(density[len(density) // 2:]),
            "temperature_end": temperature[-1]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/mace_route")
    p.add_argument("--pretrain-s", type=float, default=300.0)
    p.add_argument("--finetune-s", type=float, default=420.0)
    p.add_argument("--calibrate-steps", type=int, default=6)
    p.add_argument("--npt-steps", type=int, default=200)
    args = p.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"budgets_s": {"pretrain": args.pretrain_s, "finetune": args.finetune_s}, "archs": ARCHS}
    if not (out / "shards" / "manifest.json").exists():
        run("shards", "build", f"train={DATA / 'data_0'}", f"train={DATA / 'data_1'}", f"val={DATA / 'data_2'}",
            f"test={DATA / 'data_3'}", "--out", str(out / "shards"), "--shard-size", "40", "--serial")
    for arch in ARCHS:
        summary[arch] = {"pretrain": pretrain(out, arch, args.pretrain_s)}
        calib = finetune(out, arch, args.calibrate_steps, "calib")
        per_step = calib["train_seconds"] / args.calibrate_steps
        steps = max(int(args.finetune_s / per_step), 10)
        summary[arch]["finetune"] = finetune(out, arch, steps, "final")
        summary[arch]["finetune"]["calibration_s_per_step"] = per_step
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for arch in ARCHS:
        summary[arch]["npt"] = npt(out, arch, args.npt_steps)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("| model | pretrain s (steps) | finetune s (steps) | test force RMSE meV/Å | test energy RMSE meV/atom "
          "| NPT density start → end g/cm³ |\n|---|---|---|---|---|---|")
    for arch in ARCHS:
        s = summary[arch]
        test = s["finetune"]["test"]
        print(f"| {arch} | {s['pretrain']['seconds']:.0f} ({s['pretrain']['steps']}) | "
              f"{s['finetune']['train_seconds']:.0f} ({s['finetune']['steps']}) | "
              f"{test['force_rmse_mev_per_a']:.1f} | {test['energy_rmse_mev_per_atom']:.2f} | "
              f"{s['npt']['density_start']:.3f} → {s['npt']['density_end']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
