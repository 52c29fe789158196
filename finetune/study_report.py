"""Tables and plots of a finished (or partly finished) study: `RUN/report/summary.md` and friends.

Reads every `RUN/finetune/SETTING/MODEL_VARIANT_nBUDGET_sSEED/results.json`; nothing else. Means and
standard deviations are over seeds (sample std, 0 with one seed). Force RMSE in meV/Å, energy RMSE in
meV/atom, both on the setting's test split with the model chosen by validation force RMSE.
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from finetune import metrics as M

RUN_NAME = re.compile(r"^(?P<model>[a-z0-9]+)_(?P<variant>.+)_n(?P<budget>\d+)_s(?P<seed>\d+)$")
SETTING_TITLES = {"dft_water": "DFT water (DeePMD data_0+1 → test data_3), pretraining on TIP3P",
                  "tip3p": "TIP3P → TIP3P (the paper's setting)",
                  "ethanol": "rMD17 ethanol (generic H-masking on the train positions) → test_MD.xyz"}
ORDER = ["scratch", "denoise", "mask", "mask+denoise", "hmask"]


def collect(out: Path) -> list[dict]:
    records = []
    for path in sorted((out / "finetune").glob("*/*/results.json")):
        m = RUN_NAME.match(path.parent.name)
        if not m:
            continue
        r = json.loads(path.read_text())
        test = r.get("test") or {}
        records.append({"setting": path.parent.parent.name, "model": m["model"], "variant": m["variant"],
                        "budget": int(m["budget"]), "seed": int(m["seed"]),
                        "force": test.get(M.FORCE_RMSE, math.nan), "energy": test.get(M.ENERGY_RMSE, math.nan),
                        "history": [(h["step"], h[M.FORCE_RMSE]) for h in r.get("history", [])]})
    return records


def _group(records: list[dict], *keys: str) -> dict:
    groups = defaultdict(list)
    for r in records:
        groups[tuple(r[k] for k in keys)].append(r)
    return groups


def _variants(records: list[dict]) -> list[str]:
    present = {r["variant"] for r in records}
    return [v for v in ORDER if v in present] + sorted(present - set(ORDER))


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _mean_curve(runs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Validation force RMSE per step, averaged over the seeds that reached that step."""
    by_step = defaultdict(list)
    for r in runs:
        for step, value in r["history"]:
            by_step[step].append(value)
    steps = np.array(sorted(by_step))
    return steps, np.array([np.mean(by_step[s]) for s in steps])


def summarize(records: list[dict]) -> dict:
    """{setting: {"rows": [...], "steps_to_scratch": [...]}} with means, stds and changes vs scratch."""
    summary = {}
    for (setting,), recs in sorted(_group(records, "setting").items()):
        rows, reach = [], []
        for (model, budget), runs in sorted(_group(recs, "model", "budget").items()):
            by_variant = _group(runs, "variant")
            scratch = by_variant.get(("scratch",))
            base_f = _mean_std([r["force"] for r in scratch])[0] if scratch else math.nan
            target = _mean_curve(scratch)[1][-1] if scratch and scratch[0]["history"] else math.nan
            for variant in _variants(runs):
                group = by_variant[(variant,)]
                f_mean, f_std = _mean_std([r["force"] for r in group])
                e_mean, e_std = _mean_std([r["energy"] for r in group])
                rows.append({"model": model, "budget": budget, "variant": variant, "seeds": len(group),
                             "force_mean": f_mean, "force_std": f_std, "energy_mean": e_mean, "energy_std": e_std,
                             "force_change_vs_scratch_pct": 100.0 * (f_mean / base_f - 1.0)})
                steps, curve = _mean_curve(group)
                hit = steps[curve <= target] if math.isfinite(target) and steps.size else np.array([])
                reach.append({"model": model, "budget": budget, "variant": variant,
                              "scratch_final_val_force": target, "final_step": int(steps[-1]) if steps.size else 0,
                              "first_step_reaching": int(hit[0]) if hit.size else None})
        summary[setting] = {"rows": rows, "steps_to_scratch": reach}
    return summary


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_learning_curves(records: list[dict], setting: str, model: str, path: Path) -> Path:
    recs = [r for r in records if r["setting"] == setting and r["model"] == model]
    budgets = sorted({r["budget"] for r in recs})
    fig = Figure(figsize=(4.2 * len(budgets), 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(budgets), squeeze=False)[0])
    for ax, budget in zip(axes, budgets):
        runs = [r for r in recs if r["budget"] == budget]
        for i, variant in enumerate(_variants(runs)):
            group = [r for r in runs if r["variant"] == variant]
            steps, curve = _mean_curve(group)
            ax.plot(steps, curve, "-", color=f"C{ORDER.index(variant) if variant in ORDER else i}",
                    label=f"{variant} ({len(group)} seeds)")
        ax.set(title=f"{model}, {budget} labelled frames", xlabel="finetune step",
               ylabel="validation force RMSE (meV/Å)", yscale="log")
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_data_efficiency(rows: list[dict], model: str, setting: str, path: Path) -> Path:
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    mine = [r for r in rows if r["model"] == model]
    for i, variant in enumerate(_variants(mine)):
        pts = sorted((r["budget"], r["force_mean"], r["force_std"]) for r in mine if r["variant"] == variant)
        b, f, s = (np.array(x) for x in zip(*pts))
        ax.errorbar(b, f, yerr=s, marker="o", capsize=3,
                    color=f"C{ORDER.index(variant) if variant in ORDER else i}", label=variant)
    ax.set(xscale="log", yscale="log", xlabel="labelled training frames", ylabel="test force RMSE (meV/Å)",
           title=f"{model}: {setting}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _fmt(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(mean) else "—"


def markdown(summary: dict, images: dict[str, list[str]]) -> str:
    lines = ["# Study results", "",
             "Mean ± sample std over seeds; test split; model chosen by validation force RMSE. "
             "ΔF: change of the mean test force RMSE against scratch at the same budget.", ""]
    for setting, data in summary.items():
        lines += [f"## {SETTING_TITLES.get(setting, setting)}", "",
                  "| model | labelled frames | variant | seeds | energy RMSE (meV/atom) | force RMSE (meV/Å) | ΔF vs scratch |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for r in data["rows"]:
            change = "—" if r["variant"] == "scratch" or not math.isfinite(r["force_change_vs_scratch_pct"]) \
                else f"{r['force_change_vs_scratch_pct']:+.1f}%"
            lines.append(f"| {r['model']} | {r['budget']} | {r['variant']} | {r['seeds']} | "
                         f"{_fmt(r['energy_mean'], r['energy_std'], 2)} | {_fmt(r['force_mean'], r['force_std'], 1)} "
                         f"| {change} |")
        lines += ["", "First finetune step at which the seed-averaged validation force RMSE reaches scratch's "
                      "final one (— never, within the budget):", "",
                  "| model | labelled frames | variant | scratch final val F (meV/Å) | first step | of |",
                  "|---|---:|---|---:|---:|---:|"]
        for r in data["steps_to_scratch"]:
            step = "—" if r["first_step_reaching"] is None else str(r["first_step_reaching"])
            lines.append(f"| {r['model']} | {r['budget']} | {r['variant']} | {r['scratch_final_val_force']:.1f} | "
                         f"{step} | {r['final_step']} |")
        lines += [""] + [f"![{Path(p).stem}]({p})" for p in images.get(setting, [])] + [""]
    return "\n".join(lines)


def write_report(out: Path) -> str:
    """Write report/summary.md, summary.json and PNGs under `out`; returns the markdown."""
    out = Path(out)
    records = collect(out)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    if not records:
        text = f"# Study results\n\nNo finished finetune runs under {out / 'finetune'} yet.\n"
        (report / "summary.md").write_text(text)
        return text
    summary = summarize(records)
    images: dict[str, list[str]] = defaultdict(list)
    for (setting, model), _ in sorted(_group(records, "setting", "model").items()):
        curve = plot_learning_curves(records, setting, model, report / f"learning_curves_{setting}_{model}.png")
        images[setting].append(curve.name)
        rows = summary[setting]["rows"]
        if len({r["budget"] for r in rows if r["model"] == model}) > 1:
            eff = plot_data_efficiency(rows, model, setting, report / f"data_efficiency_{setting}_{model}.png")
            images[setting].append(eff.name)
    text = markdown(summary, images)
    timings = out / "timings.json"
    if timings.is_file():
        t = json.loads(timings.read_text())
        text += "\nWall time per stage (s, summed over resumed invocations): " + \
                ", ".join(f"{k} {v:.0f}" for k, v in sorted(t.items())) + "\n"
    (report / "summary.md").write_text(text)
    (report / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return text
