"""`maskpot generate corpus`: sampled-condition water trajectories (OpenMM), one Ray task per trajectory."""
from __future__ import annotations

import argparse
import json
import logging

from data_shards.corpus.conditions import CorpusConfig
from data_shards.corpus.models import WATER_MODELS


def add_command(kinds, positive_int) -> None:
    p = kinds.add_parser(
        "corpus", help="water MD over sampled conditions (temperature, density, box size, water model; periodic "
                       "or clusters), one extxyz per trajectory, one Ray task per trajectory; resumable",
        description="Trajectory i draws its conditions from (seed, i): the corpus is reproducible per seed and a "
                    "rerun into the same --out finishes only the missing trajectories. Writes OUT/traj-NNNNNN.extxyz "
                    "and OUT/corpus.json (settings, conditions, cost per frame per model, frames/s).")
    p.add_argument("--out", required=True, help="output folder (created if missing; rerun into it to resume)")
    p.add_argument("--trajectories", type=positive_int, default=4, help="trajectories (default: 4)")
    p.add_argument("--frames-per-trajectory", type=positive_int, default=50, help="frames each (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default: 0)")
    p.add_argument("--temperature-range", type=float, nargs=2, default=[250.0, 450.0], metavar=("LO", "HI"),
                   help="thermostat temperature, uniform per trajectory, K (default: 250 450)")
    p.add_argument("--density-range", type=float, nargs=2, default=[0.9, 1.1], metavar=("LO", "HI"),
                   help="density, uniform per trajectory, g/cm³ (default: 0.9 1.1 = ±10%%)")
    p.add_argument("--molecules-range", type=int, nargs=2, default=[32, 128], metavar=("LO", "HI"),
                   help="water molecules per box, uniform integers (default: 32 128)")
    p.add_argument("--models", nargs="+", default=["tip3p", "spcfw"], choices=sorted(WATER_MODELS),
                   help="flexible water models, one drawn per trajectory (default: tip3p spcfw)")
    p.add_argument("--cluster", action="store_true", help="non-periodic clusters (no box, no cutoff)")
    p.add_argument("--steps-between-frames", type=positive_int, default=100,
                   help="MD steps of 0.5 fs between frames (default: 100)")
    p.add_argument("--equilibration-steps", type=int, default=2000, help="MD steps before the first frame (2000)")
    p.add_argument("--ray-address", default=None, help="join a running Ray cluster at HOST:PORT (default: local)")
    p.add_argument("--num-cpus", type=positive_int, default=None, help="workers of the local Ray runtime")
    p.add_argument("--serial", action="store_true", help="run trajectories one after another without Ray")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_shards.corpus.generate import generate_corpus  # startup: OpenMM (+3 s) off the maskpot CLI start

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = CorpusConfig(trajectories=args.trajectories, frames_per_trajectory=args.frames_per_trajectory,
                       seed=args.seed, temperature_k=tuple(args.temperature_range),
                       density_g_cm3=tuple(args.density_range), molecules=tuple(args.molecules_range),
                       models=tuple(args.models), periodic=not args.cluster,
                       steps_between_frames=args.steps_between_frames, equilibration_steps=args.equilibration_steps)
    record = generate_corpus(cfg, args.out, ray_address=args.ray_address, num_cpus=args.num_cpus,
                             use_ray=not args.serial)
    print(json.dumps({"out": args.out, "trajectories": len(record["trajectories"]), **record["last_run"]},
                     indent=2, default=float))
    return 0
