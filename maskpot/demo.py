"""`maskpot demo`: the whole chain on an embedded default, no downloads.

TIP3P corpus (OpenMM) → Ray → WebDataset shards → DeepSpeed masked pretraining on 2 processes →
finetune twice on the same small labelled budget (scratch, pretrained) → a table of test errors.
Every stage writes its config into the run folder, so each can be rerun by hand with the printed command.
Stages whose outputs exist are reused (delete the folder, or pass --fresh, to start over).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from data_shards.config_io import load_config, merge
from maskpot.dft_water import dft_water_inputs
from pretrain import cli as pretrain_cli
from pretrain.tracking_links import ui_command


@dataclass(frozen=True)
class DemoScale:
    molecules: int                  # water molecules per box
    corpus_frames: int              # unlabelled pretraining corpus (TIP3P seed 0)
    labelled_frames: int            # TIP3P labelled set (seed 1), split 0.6 / 0.2 / 0.2
    steps_between_frames: int       # MD steps of 0.5 fs between recorded frames
    model: dict                     # EGNN parameters
    pretrain_steps: int
    pretrain_batch: int             # structures per rank per step
    finetune_steps: int
    finetune_batch: int
    label_budget: int               # labelled training frames used by both finetunes
    val_every: int


SCALES = {
    # CI / tests: checks the plumbing only, numbers mean nothing.
    "tiny": DemoScale(molecules=16, corpus_frames=24, labelled_frames=30, steps_between_frames=20,
                      model={"hidden": 16, "layers": 2, "cutoff": 3.5}, pretrain_steps=6, pretrain_batch=2,
                      finetune_steps=8, finetune_batch=2, label_budget=8, val_every=4),
    # `make demo`: ~10 minutes on 2 CPU cores.
    "default": DemoScale(molecules=64, corpus_frames=600, labelled_frames=150, steps_between_frames=40,
                         model={"hidden": 64, "layers": 4, "cutoff": 3.5}, pretrain_steps=400,
                         pretrain_batch=4, finetune_steps=300, finetune_batch=4, label_budget=30,
                         val_every=50),
}


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the whole chain (corpus → shards → pretrain → 2 finetunes) and print a table",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--scale", choices=sorted(SCALES), default="default",
                   help="default: ~10 min on 2 cores; tiny: ~2 min plumbing check (numbers meaningless)")
    p.add_argument("--dft-water", metavar="PATH", default=None,
                   help="finetune on DFT water in DeePMD layout instead of TIP3P labels: a folder holding "
                        "data_0..data_3, directly or under data/ (train data_0+1, val data_2, test data_3), "
                        "e.g. ../shared/data/water_deepmd")
    p.add_argument("--nproc", type=int, default=2, help="DeepSpeed ranks for pretraining (default 2)")
    p.add_argument("--ray-address", default=None,
                   help="join a running Ray cluster (HOST:PORT) instead of starting one in-process")
    p.add_argument("--fresh", action="store_true", help="delete the run folder first")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    scale = SCALES[args.scale]
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    corpus, labelled = stage_shards(out, scale, args)
    export = stage_pretrain(out, scale, corpus, args.nproc)
    results = {name: stage_finetune(out, scale, labelled, name, init)
               for name, init in (("scratch", None), ("pretrained", export))}
    labels = f"DFT water ({args.dft_water})" if args.dft_water else "TIP3P water (seed 1 trajectory)"
    print_table(results, scale, labels, time.perf_counter() - t0, out)
    results_file = out / f"demo_results_{labelled.name.removeprefix('labelled_')}.json"
    results_file.write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
    return 0


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def stage_shards(out: Path, scale: DemoScale, args) -> tuple[Path, Path]:
    from data_shards.build import build_shards  # startup: imports torch (+7 s); kept off the maskpot CLI start
    from data_shards.tip3p import generate_tip3p  # startup: OpenMM + ase (+3 s) off the maskpot CLI start

    # labelled shards and finetune runs are named by their label source, so runs on TIP3P and on DFT
    # labels can share one folder (and one pretrained export)
    corpus_dir = out / "shards" / "corpus"
    labelled_dir = out / "shards" / ("labelled_dft" if args.dft_water else "labelled_tip3p")
    if not (corpus_dir / "manifest.json").is_file():
        _banner(f"1/4 generating the TIP3P pretraining corpus: {scale.corpus_frames} frames × "
                f"{scale.molecules} H2O (OpenMM, 300 K)")
        xyz = generate_tip3p(out / "data", n_molecules=scale.molecules, n_frames=scale.corpus_frames, seed=0,
                             steps_between_frames=scale.steps_between_frames)
        _banner("2/4 sharding with Ray → WebDataset tars")
        build_shards([str(xyz)], str(corpus_dir), shard_size=max(scale.corpus_frames // 8, 4),
                     split_fractions=(0.9, 0.1, 0.0), ray_address=args.ray_address)
    if not (labelled_dir / "manifest.json").is_file():
        if args.dft_water:
            inputs = dft_water_inputs(args.dft_water, "--dft-water")
        else:
            _banner(f"generating a separate labelled TIP3P trajectory: {scale.labelled_frames} frames (seed 1)")
            inputs = [str(generate_tip3p(out / "data", n_molecules=scale.molecules,
                                         n_frames=scale.labelled_frames, seed=1,
                                         steps_between_frames=scale.steps_between_frames))]
        build_shards(inputs, str(labelled_dir), shard_size=40, split_fractions=(0.6, 0.2, 0.2),
                     ray_address=args.ray_address)
    return corpus_dir, labelled_dir


def stage_pretrain(out: Path, scale: DemoScale, corpus: Path, nproc: int) -> Path:
    run_dir = out / "pretrain"
    export = run_dir / "export"
    if (export / "model.json").is_file():
        return export
    path = _write_config(out / "pretrain.yaml", pretrain_config(scale, corpus, run_dir))
    _banner(f"3/4 masked pretraining with DeepSpeed on {nproc} processes: {scale.pretrain_steps} steps\n"
            f"    maskpot pretrain --config {path} --nproc {nproc}")
    args = argparse.Namespace(config=str(path), nproc=nproc, override=[], resume="auto",
                              allow_config_change=False, init=None)
    code = pretrain_cli.run(args)
    if code != 0:
        raise RuntimeError(f"pretraining failed with exit code {code}; see the output above")
    return export


def stage_finetune(out: Path, scale: DemoScale, labelled: Path, name: str, init: Path | None) -> dict:
    from finetune.config import FinetuneConfig  # startup: imports torch (+7 s); kept off the maskpot CLI start
    from finetune.loop import run_finetune  # startup: imports torch (+7 s); kept off the maskpot CLI start

    source = labelled.name.removeprefix("labelled_")
    run_dir = out / f"finetune_{source}_{name}"
    if (run_dir / "results.json").is_file():
        return json.loads((run_dir / "results.json").read_text())
    config = finetune_config(scale, labelled, init, run_dir, f"sqlite:///{out / 'mlflow.db'}", f"{source}-{name}")
    path = _write_config(out / f"finetune_{source}_{name}.yaml", config)
    _banner(f"4/4 finetuning ({name}) on {scale.label_budget} labelled frames, {scale.finetune_steps} steps\n"
            f"    maskpot finetune --config {path}")
    return run_finetune(load_config(FinetuneConfig, path))


def pretrain_config(scale: DemoScale, corpus: Path, run_dir: Path) -> dict:
    """configs/demo/pretrain.yaml with the scale's steps, sizes and paths merged in."""
    steps = scale.pretrain_steps
    return merge(shipped_config("pretrain.yaml"), {
        "data": {"manifest_dir": str(corpus), "batch_size": scale.pretrain_batch},
        "model": {"params": scale.model},
        "optim": {"warmup_steps": max(steps // 20, 1)},
        "train": {"max_steps": steps, "log_every": max(steps // 40, 1), "val_every": max(steps // 4, 1),
                  "checkpoint_every": max(steps // 2, 1), "out_dir": str(run_dir)}})


def finetune_config(scale: DemoScale, labelled: Path, init: Path | None, run_dir: Path, tracking_uri: str,
                    run_name: str) -> dict:
    """configs/demo/finetune.yaml with the scale's steps, budget, sizes and paths merged in."""
    return merge(shipped_config("finetune.yaml"), {
        "data": {"manifest_dir": str(labelled), "train_frames": scale.label_budget, "batch_size": scale.finetune_batch},
        "model": {"params": scale.model},
        "init": str(init) if init else None,
        "optim": {"warmup_steps": max(scale.finetune_steps // 20, 1)},
        "train": {"max_steps": scale.finetune_steps, "val_every": scale.val_every, "out_dir": str(run_dir)},
        "tracking": {"uri": tracking_uri, "run_name": run_name}})


def shipped_config(name: str) -> dict:
    """configs/demo/NAME, shipped as package data (maskpot.configs): the demo's fixed settings."""
    return yaml.safe_load((resources.files("maskpot.configs") / "demo" / name).read_text())


def _write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def print_table(results: dict, scale: DemoScale, labels: str, seconds: float, out: Path) -> None:
    rows = []
    for name, r in results.items():
        test = r["test"]
        rows.append(f"| {name:<10} | {scale.label_budget:>12} | {scale.finetune_steps:>5} | "
                    f"{test['energy_rmse_mev_per_atom']:>22.2f} | {test['force_rmse_mev_per_a']:>19.1f} |")
    scratch, pre = results["scratch"]["test"], results["pretrained"]["test"]
    change = 100.0 * (pre["force_rmse_mev_per_a"] / scratch["force_rmse_mev_per_a"] - 1.0)
    store = f"sqlite:///{out / 'mlflow.db'}"
    experiment_id = (results["pretrained"].get("tracking") or {}).get("experiment_id")
    print("\n" + "\n".join([
        f"Test errors on {labels}, same finetune budget for both runs:",
        "| run        | train frames | steps | energy RMSE (meV/atom) | force RMSE (meV/Å) |",
        "|------------|--------------|-------|------------------------|--------------------|",
        *rows,
        f"Pretrained vs scratch, force RMSE: {change:+.1f}%.   Wall time {seconds / 60:.1f} min.",
        f"Open the runs:  {ui_command(store, experiment_id)}",
    ]), flush=True)
