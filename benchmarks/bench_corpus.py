"""Corpus generation throughput: frames/s of `generate_corpus` with 1 and 2 Ray workers, and each water
model's cost per frame.

    .venv/bin/python benchmarks/bench_corpus.py [--trajectories 4] [--frames 10] [--molecules 32] [--repeats 3]

Arms alternate (1, 2, 1, 2, ...) in one run; Ray is started before the clock (its start-up is not counted)
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
sys.path.insert(0, str(REPO))

import ray  # noqa: E402

from data_shards.corpus.conditions import CorpusConfig  # noqa: E402
from data_shards.corpus.generate import generate_corpus  # noqa: E402


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
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cfg = CorpusConfig(trajectories=args.trajectories, frames_per_trajectory=args.frames, seed=0,
                       molecules=(args.molecules, args.molecules), steps_between_frames=100, equilibration_steps=500)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for workers in (1, 2):
                runs.append(one_arm(cfg, workers, Path(tmp), f"r{r}w{workers}"))
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "cost_per_frame"}), flush=True)
    medians = {w: statistics.median(x["frames_per_second"] for x in runs if x["workers"] == w) for w in (1, 2)}
    models = sorted({m for x in runs for m in x["cost_per_frame"]})
    cost = {m: statistics.median(x["cost_per_frame"][m]["ms_per_frame"] for x in runs if m in x["cost_per_frame"])
            for m in models}
    print(json.dumps({"cpus": os.cpu_count(), "trajectories": args.trajectories, "frames_per_trajectory": args.frames,
                      "molecules": args.molecules, "median_frames_per_second": medians,
                      "speedup_2_vs_1": medians[2] / medians[1], "median_ms_per_frame_by_model": cost}, indent=2))


if __name__ == "__main__":
    main()
