"""Corpus generation throughput: frames/s of `generate_corpus` with 1 and 2 Ray workers, and each water
model's cost per frame.

    .venv/bin/python benchmarks/bench_corpus.py [--trajectories 4] [--frames 10] [--molecules 32] [--repeats 3]

Through benchmarks/harness.py: arms alternate (1, 2, 1, 2, ...) in one run, ratios paired per round; Ray is
started before the clock (its start-up is not counted)
and restarted for each arm with that many CPUs; every arm generates the same trajectories into a fresh
folder. Reported: the median frames/s per arm, their ratio, and the median ms per frame (production +
minimisation + equilibration, divided by the frames) per model over all arms. Timings on a shared
machine are noisy: compare only within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
for _name, _value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                      "RAY_AUTH_MODE": "disabled"}.items():
    os.environ.setdefault(_name, _value)
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import ray
from harness import RATE, compare

from data_shards.corpus.conditions import CorpusConfig
from data_shards.corpus.generate import generate_corpus


def one_arm(cfg: CorpusConfig, workers: int, root: Path, tag: str) -> dict:
    ray.init(address="local", num_cpus=workers, include_dashboard=False, object_store_memory=128 * 1024**2,
             logging_level="WARNING")
    try:
        t0 = time.perf_counter()
        record = generate_corpus(cfg, root / tag, progress=False)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    frames = record["last_run"]["frames"]
    return {"workers": workers, "frames": frames, "seconds": wall, "frames_per_second": frames / wall,
            "cost_per_frame": record["last_run"]["cost_per_frame"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trajectories", type=int, default=4)
    p.add_argument("--frames", type=int, default=10, help="frames per trajectory")
    p.add_argument("--molecules", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="rounds (>= 3)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()
    cfg = CorpusConfig(trajectories=args.trajectories, frames_per_trajectory=args.frames, seed=0,
                       molecules=(args.molecules, args.molecules), steps_between_frames=100, equilibration_steps=500)
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(10**6))
        arms = {f"{w}worker": (lambda w=w: one_arm(cfg, w, Path(tmp), f"a{next(counter)}w{w}")) for w in (1, 2)}
        record = compare(f"corpus generation, {args.trajectories} trajectories × {args.frames} frames of "
                         f"{args.molecules} molecules", arms, "1worker", {"frames_per_second": RATE},
                         rounds=args.repeats, json_path=Path(args.out) / "corpus.json",
                         notes={"command": " ".join(sys.argv)})
    runs = [row["metrics"] for rows in record["samples"].values() for row in rows]
    models = sorted({m for x in runs for m in x["cost_per_frame"]})
    cost = {m: statistics.median(x["cost_per_frame"][m]["ms_per_frame"] for x in runs if m in x["cost_per_frame"])
            for m in models}
    print(json.dumps({"median_ms_per_frame_by_model": cost}, indent=2))


if __name__ == "__main__":
    main()
