"""`maskpot evaluate MODEL DATA`: energy and force errors of an exported model on labelled structures.

DATA is anything the readers understand (extxyz file, DeePMD system folder or root, …) or a shard folder
with manifest.json (one split, `--split`). Writes OUT/metrics.json, OUT/metrics.md and parity plots, and
prints the table; OUT/predictions.extxyz holds every structure with the reference labels and the model's
(`maskpot_energy`, `maskpot_forces`, per-atom `maskpot_force_error`; finetune.forcefield.predictions).
Units: energies per atom in meV/atom, forces in meV/Å (see finetune.forcefield.metrics).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator

from data_shards import keys as K
from data_shards.frame import Frame, FrameError
from data_shards.progress import progress
from finetune.forcefield import metrics as M
from finetune.forcefield import plots

# torch, the graph code and plotting are imported where used: `maskpot --help` stays fast

METRICS_JSON = "metrics.json"
METRICS_MD = "metrics.md"
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


def frame_sample(frame: Frame) -> dict:
    return {K.SPECIES: frame.species, K.POSITIONS: frame.positions, K.CELL: frame.cell, K.PBC: frame.pbc,
            K.ENERGY: frame.energy, K.FORCES: frame.forces}


def frame_batches(path, fmt: str | None, batch_size: int, cutoff: float) -> Iterator:
    """Validated labelled frames of `path` as graph batches; the first bad frame raises its FrameError."""
    from data_shards.graph import collate, sample_to_data  # startup: ase+torch+vesin
    from data_shards.readers import count_frames, iter_frames  # startup: ase

    total = count_frames(path, fmt)
    if total == 0:
        raise ValueError(f"{path}: no frames to evaluate")
    pending = []
    for item in progress(iter_frames(path, fmt), total=total, desc="evaluate", unit="frame"):
        if isinstance(item, FrameError):
            raise item
        pending.append(sample_to_data(frame_sample(item.validate(require_labels=True)), cutoff))
        if len(pending) == batch_size:
            yield collate(pending)
            pending = []
    if pending:
        yield collate(pending)


def data_batches(data, fmt: str | None, split: str, batch_size: int, cutoff: float, integrity: str | None = None):
    data = Path(data)
    if (data / MANIFEST).is_file():
        from data_shards.stream import ShardStream  # startup: ase+torch+vesin

        if split not in SPLITS:
            raise ValueError(f"--split {split!r} is not valid; valid: {list(SPLITS)}")
        stream = ShardStream(data, split, batch_size, cutoff, integrity_policy=integrity)
        if not stream.manifest["splits"].get(split, {}).get("samples"):
            raise ValueError(f"{data / MANIFEST}: split {split!r} is empty")
        return stream
    return frame_batches(data, fmt, batch_size, cutoff)


def markdown_table(figures: dict, model: str, data: str) -> str:
    per_element = figures[M.FORCE_RMSE_PER_ELEMENT]
    rows = [("energy RMSE", "meV/atom", figures[M.ENERGY_RMSE]),
            ("energy RMSE, offset-corrected", "meV/atom", figures[M.ENERGY_RMSE_CORRECTED]),
            ("energy offset (mean error)", "meV/atom", figures[M.ENERGY_OFFSET]),
            ("energy MAE", "meV/atom", figures[M.ENERGY_MAE]),
            ("force RMSE", "meV/Å", figures[M.FORCE_RMSE]), ("force MAE", "meV/Å", figures[M.FORCE_MAE])]
    rows += [(f"force RMSE {K.CHEMICAL_SYMBOLS[int(z)]}", "meV/Å", value) for z, value in sorted(
        per_element.items(), key=lambda item: int(item[0]))]
    lines = [f"model: `{model}`  ", f"data: `{data}` ({figures[M.STRUCTURES]} structures, {figures[M.ATOMS]} atoms)",
             "", "| metric | unit | value |", "|---|---|---:|"]
    lines += [f"| {name} | {unit} | {value:.2f} |" for name, unit, value in rows]
    return "\n".join(lines) + "\n"


def evaluate_model(model_dir, data, out_dir, fmt: str | None = None, split: str = "test", batch_size: int = 8,
                   device: str = "auto", integrity: str | None = None) -> dict:
    """Evaluate the export `model_dir` on `data`; writes metrics.json, metrics.md, parity_*.png in `out_dir`."""
    from finetune.forcefield.calculator import resolve_device  # startup: ase+torch+vesin
    from finetune.forcefield.predictions import PREDICTIONS, Recorder, write_predictions  # startup: torch
    from pretrain.export import export_cutoff, load_export  # startup: safetensors+torch

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    where = resolve_device(device)  # CUDA asked for without CUDA: one line, before any work
    model, meta = load_export(model_dir)
    model.to(where)
    batches = data_batches(data, fmt, split, batch_size, export_cutoff(meta), integrity)
    recorder = Recorder(model)
    figures = M.evaluate(recorder, batches, device=where)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions = write_predictions(recorder.structures, figures[M.ARRAYS], out_dir / PREDICTIONS)
    label = split if (Path(data) / MANIFEST).is_file() else Path(data).name
    plot_paths = plots.parity_plots(figures[M.ARRAYS], figures, out_dir, label)
    summary = {**M.without_arrays(figures), "model": str(model_dir), "data": str(data),
               "split": split if (Path(data) / MANIFEST).is_file() else None,
               "plots": [p.name for p in plot_paths], "predictions": predictions.name}
    if hasattr(batches, "integrity_skipped"):  # shards: samples left out for a bad checksum (integrity=skip)
        summary["integrity"] = {"policy": batches.cfg.integrity, "skipped": batches.integrity_skipped}
    (out_dir / METRICS_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / METRICS_MD).write_text(markdown_table(figures, str(model_dir), str(data)))
    return summary


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="energy/force errors of an exported model on labelled data (tables + parity plots)",
        description="Evaluate an export folder on labelled structures. DATA: an extxyz file, a DeePMD folder, "
                    "or a shard folder with manifest.json (then --split picks the split). Writes OUT/metrics.json, "
                    "OUT/metrics.md, OUT/parity_energy.png, OUT/parity_forces.png and OUT/predictions.extxyz "
                    "(reference energy [eV]/forces [eV/Å] kept, maskpot_energy, maskpot_forces, per-atom "
                    "maskpot_force_error [eV/Å], maskpot_stress [eV/Å³] when the model gives one).")
    p.add_argument("model", metavar="MODEL", help="export folder (model.json + model.safetensors)")
    p.add_argument("data", metavar="DATA", help="labelled data: file/folder a reader understands, or shard folder")
    p.add_argument("--format", default=None, help="reader name (default: detected from DATA)")
    p.add_argument("--split", default="test", help="split of a shard folder (default: test)")
    p.add_argument("--out", default="evaluation", metavar="DIR", help="output folder (default: ./evaluation)")
    p.add_argument("--batch-size", type=int, default=8, help="structures per forward pass (default: 8)")
    p.add_argument("--device", default="auto", help="auto (cuda when available; default) | cpu | cuda | cuda:N")
    p.add_argument("--integrity", choices=["fatal", "skip", "off"], default=None,
                   help="shards: a sample failing its checksum stops the run (fatal, default; or $MASKPOT_INTEGRITY), "
                        "is left out and counted (skip), or is not checked (off)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    summary = evaluate_model(args.model, args.data, args.out, args.format, args.split, args.batch_size, args.device,
                             args.integrity)
    print((Path(args.out) / METRICS_MD).read_text(), end="")
    if summary.get("integrity", {}).get("skipped"):
        print(f"integrity: {summary['integrity']['skipped']} sample(s) failed their checksum and were left out")
    print(f"written: {Path(args.out) / METRICS_JSON}, {', '.join(summary['plots'])}, {summary['predictions']}")
    return 0
