"""Learning curve and parity plots as PNG files (matplotlib Figure + Agg canvas; no pyplot state)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from data_shards.keys import CHEMICAL_SYMBOLS
from finetune.forcefield import metrics as M

DPI = 120


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def learning_curve(train: list[tuple[int, float]], val: list[dict], path: str | Path) -> Path:
    """Train loss per step (left) and validation energy/force RMSE per evaluation (right).

    `val` items: {"step", M.ENERGY_RMSE, M.FORCE_RMSE} (finetune.forcefield.metrics keys).
    """
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_val = fig.subplots(1, 2)
    if train:
        steps, losses = zip(*train)
        ax_loss.plot(steps, losses, lw=1)
        if min(losses) > 0:
            ax_loss.set_yscale("log")
    ax_loss.set(xlabel="step", ylabel="train loss (normalised)", title="training loss")
    if val:
        val_steps = [v["step"] for v in val]
        ax_val.plot(val_steps, [v[M.FORCE_RMSE] for v in val], "o-", color="C1", label="force RMSE (meV/Å)")
        ax_energy = ax_val.twinx()
        ax_energy.plot(val_steps, [v[M.ENERGY_RMSE] for v in val], "s--", color="C2",
                       label="energy RMSE (meV/atom)")
        ax_energy.set_ylabel("energy RMSE (meV/atom)", color="C2")
        best = min(val, key=lambda v: v[M.FORCE_RMSE])
        ax_val.axvline(best["step"], color="grey", ls=":", lw=1, label=f"best (step {best['step']})")
        ax_val.legend(loc="upper right", fontsize=8)
    ax_val.set(xlabel="step", title="validation")
    ax_val.set_ylabel("force RMSE (meV/Å)", color="C1")
    return _save(fig, path)


def parity(ref: np.ndarray, pred: np.ndarray, path: str | Path, quantity: str, unit: str,
           rmse_value: float, rmse_unit: str, groups: np.ndarray | None = None,
           group_names: dict | None = None) -> Path:
    """Predicted vs reference with the y = x line; `groups` colours points (e.g. forces by element)."""
    ref, pred = np.asarray(ref, np.float64).ravel(), np.asarray(pred, np.float64).ravel()
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    size = 16 if ref.size < 200 else 4
    if groups is None:
        ax.scatter(ref, pred, s=size, alpha=0.6, lw=0)
    else:
        groups = np.asarray(groups).ravel()
        for g in np.unique(groups):
            sel = groups == g
            name = (group_names or {}).get(g, str(g))
            ax.scatter(ref[sel], pred[sel], s=size, alpha=0.4, lw=0, label=name)
        ax.legend(markerscale=4, fontsize=8)
    if ref.size:
        lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
    ax.set(xlabel=f"reference {quantity} ({unit})", ylabel=f"predicted {quantity} ({unit})",
           title=f"{quantity}: RMSE {rmse_value:.1f} {rmse_unit} (n={ref.size})")
    ax.set_aspect("equal", adjustable="datalim")
    return _save(fig, path)


def parity_plots(arrays: dict, figures: dict, out_dir: str | Path, split: str) -> list[Path]:
    """parity_energy.png and parity_forces.png from `finetune.forcefield.metrics.evaluate` output."""
    out_dir = Path(out_dir)
    species = np.repeat(arrays["species"], 3)  # forces are flattened component-wise
    names = {z: CHEMICAL_SYMBOLS[int(z)] for z in np.unique(species)}
    return [
        parity(arrays["energy_per_atom_ref"], arrays["energy_per_atom_pred"], out_dir / "parity_energy.png",
               f"{split} energy per atom", "eV/atom", figures[M.ENERGY_RMSE], "meV/atom"),
        parity(arrays["forces_ref"], arrays["forces_pred"], out_dir / "parity_forces.png",
               f"{split} force components", "eV/Å", figures[M.FORCE_RMSE], "meV/Å", species, names),
    ]
