"""Report sections of the extended study: both read-outs, the spread rule, the scaling curve, diversity,
two-stage and the CPU-hours per stage (maskpot.study.report calls these; records come from its `collect`).

Read-outs: "budget" (the fixed finetune budget, test force RMSE of results.json) and "converged" (early
stopping with a step cap, results.json["converged"]). Means ± sample std are over every run of a row
(finetune seeds × pretraining seeds). A difference between two rows is "larger than the spread" when
|mean_a − mean_b| > std_a + std_b, "within the spread" when not, and "n/a (runs: 2 vs 1)" when either row has
one run (the counts say which).
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from maskpot.study.config import ABLATION_MARK

EXPERIMENT_TAG = re.compile(r"^(corpus\d+|single\d+|twostage)$")   # VARIANT@dft_positions stays an ablation run too
READOUTS = {"budget": "force", "converged": "force_conv"}


def experiment_tag(variant: str) -> str | None:
    """"mask@corpus4000" → "corpus4000"; None for main runs and ablations."""
    _, _, tag = variant.partition(ABLATION_MARK)
    return tag if EXPERIMENT_TAG.match(tag) else None


def values(runs: list[dict], readout: str) -> list[float]:
    return [r[READOUTS[readout]] for r in runs if math.isfinite(r[READOUTS[readout]])]


def mean_std(vals: list[float]) -> tuple[float, float]:
    if not vals:
        return math.nan, math.nan
    a = np.asarray(vals, float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def spread_mark(a: list[float], b: list[float]) -> str:
    """Is the difference of the means of `a` and `b` larger than the spread (std_a + std_b)?"""
    if len(a) < 2 or len(b) < 2:
        return f"n/a (runs: {len(a)} vs {len(b)})"
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    return "larger than the spread" if abs(ma - mb) > sa + sb else "within the spread"


def compare(a: list[float], b: list[float]) -> str:
    """"−12.3% (larger than the spread)": change of mean(a) against mean(b)."""
    if not a or not b:
        return "—"
    return f"{100.0 * (mean_std(a)[0] / mean_std(b)[0] - 1.0):+.1f}% ({spread_mark(a, b)})"


def fmt(vals: list[float], digits: int = 1) -> str:
    m, s = mean_std(vals)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if math.isfinite(m) else "—"


def _by(records: list[dict], *keys: str) -> dict:
    groups = defaultdict(list)
    for r in records:
        groups[tuple(r[k] for k in keys)].append(r)
    return groups


def _best_readout(runs: list[dict]) -> str:
    return "converged" if values(runs, "converged") else "budget"


def scaling_rows(records: list[dict]) -> list[dict]:
    dft = [r for r in records if r["setting"] == "dft_water"]
    scratch = _by([r for r in dft if r["variant"] == "scratch"], "model", "budget")
    rows = []
    for (model, variant, budget), runs in sorted(_by(dft, "model", "variant", "budget").items()):
        tag = experiment_tag(variant)
        if not tag or not tag.startswith("corpus"):
            continue
        base = scratch.get((model, budget), [])
        readout = _best_readout(runs)
        rows.append({"model": model, "variant": variant.partition(ABLATION_MARK)[0], "budget": budget,
                     "frames": int(tag.removeprefix("corpus")), "runs": runs, "scratch": base, "readout": readout})
    return sorted(rows, key=lambda r: (r["model"], r["variant"], r["budget"], r["frames"]))


def scaling_markdown(rows: list[dict], image: str | None) -> str:
    lines = ["## Scaling: test force RMSE vs corpus size (same pretraining steps for every size)", "",
             "| model | variant | labelled frames | corpus frames | runs | F at budget (meV/Å) | F at convergence "
             "(meV/Å) | ΔF vs scratch (converged, else budget) |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['budget']} | {r['frames']} | {len(r['runs'])} | "
                     f"{fmt(values(r['runs'], 'budget'))} | {fmt(values(r['runs'], 'converged'))} | "
                     f"{compare(values(r['runs'], r['readout']), values(r['scratch'], r['readout']))} |")
    for (model, variant, budget), group in sorted(_by(rows, "model", "variant", "budget").items()):
        means = [mean_std(values(r["runs"], r["readout"]))[0] for r in group]
        if len(group) < 2:   # one corpus size: a point, not a curve
            lines.append(f"\n{model} {variant}, {budget} frames: one corpus size so far ({group[0]['frames']} "
                         f"frames, {means[0]:.1f} meV/Å), no curve.")
            continue
        falls = all(b < a for a, b in pairwise(means))
        steps = "; ".join(f"{a['frames']} → {b['frames']} frames: "
                          f"{compare(values(b['runs'], b['readout']), values(a['runs'], a['readout']))}"
                          for a, b in pairwise(group))
        lines.append(f"\n{model} {variant}, {budget} frames: the curve {'falls' if falls else 'does not fall'} "
                     f"monotonically with corpus size ({', '.join(f'{m:.1f}' for m in means)} meV/Å); "
                     f"each step: {steps}.")
    return "\n".join(lines + ([f"\n![scaling]({image})"] if image else []) + [""])


def plot_scaling(rows: list[dict], path: Path) -> Path:
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for i, ((model, variant, budget), group) in enumerate(sorted(_by(rows, "model", "variant", "budget").items())):
        readout = group[0]["readout"]
        stats = [mean_std(values(r["runs"], readout)) for r in group]
        ax.errorbar([r["frames"] for r in group], [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                    capsize=3, color=f"C{i}", label=f"{model} {variant}, {budget} frames ({readout})")
        base = mean_std(values(group[0]["scratch"], readout))[0]
        if math.isfinite(base):
            ax.axhline(base, ls="--", color=f"C{i}", lw=0.8)
    ax.set(xscale="log", xlabel="corpus frames", ylabel="DFT water test force RMSE (meV/Å)",
           title="scaling (dashed: scratch)")
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _table(title: str, rows: list[tuple[str, list[dict]]], pairs: list[tuple[int, int]], key: str) -> list[str]:
    lines = [f"### {title}", "", "| row | runs | F at budget (meV/Å) | F at convergence (meV/Å) | ΔF vs scratch |",
             "|---|---:|---:|---:|---|"]
    readout = "converged" if any(values(runs, "converged") for _, runs in rows) else "budget"
    scratch = values(rows[0][1], readout)
    for label, runs in rows:
        change = "—" if label == "scratch" else compare(values(runs, readout), scratch)
        lines.append(f"| {label} | {len(runs)} | {fmt(values(runs, 'budget'))} | {fmt(values(runs, 'converged'))} "
                     f"| {change} |")
    lines.append("")
    lines += [f"- {rows[a][0]} vs {rows[b][0]} ({readout}): "
              f"{compare(values(rows[a][1], readout), values(rows[b][1], readout))}" for a, b in pairs]
    return lines + [""]


def two_stage_groups(records: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """{(model, budget): the DFT-water runs of every two-stage table's rows (scratch, corpus only, paper
    recipe, two-stage)} for the budgets where a two-stage run finished."""
    dft = [r for r in records if r["setting"] == "dft_water"]
    groups = {}
    for model, budget, variant in sorted({(r["model"], r["budget"], r["variant"]) for r in dft}):
        base, _, tag = variant.partition(ABLATION_MARK)
        if tag == "twostage":
            rows = {"scratch", base, f"{base}{ABLATION_MARK}dft_positions", variant}
            groups[(model, budget)] = [r for r in dft if (r["model"], r["budget"]) == (model, budget)
                                       and r["variant"] in rows]
    return groups


def comparisons_markdown(records: list[dict]) -> str:
    """Two-stage (against corpus-only, the paper recipe and scratch) and diversity (one condition against
    sampled conditions at the same corpus size), per model × labelled budget."""
    dft = _by([r for r in records if r["setting"] == "dft_water"], "model", "budget", "variant")
    lines = []
    for (model, budget, variant) in sorted(dft):
        base, _, tag = variant.partition(ABLATION_MARK)

        def runs(v: str, model=model, budget=budget) -> list[dict]:
            return dft.get((model, budget, v), [])
        if tag == "twostage":
            lines += _table(f"Two-stage, {model} {base}, {budget} labelled frames",
                            [("scratch", runs("scratch")), ("corpus only", runs(base)),
                             ("paper recipe (DFT positions)", runs(f"{base}@dft_positions")),
                             ("two-stage", runs(variant))],
                            [(3, 2), (3, 1)], variant)
        elif tag.startswith("single"):
            n = tag.removeprefix("single")
            lines += _table(f"Diversity at {n} corpus frames, {model} {base}, {budget} labelled frames",
                            [("scratch", runs("scratch")), ("one condition", runs(variant)),
                             ("sampled conditions and models", runs(f"{base}@corpus{n}"))], [(2, 1)], variant)
    return ("## Two-stage and diversity\n\n" + "\n".join(lines)) if lines else ""


def cpu_hours_markdown(out: Path) -> str:
    """Wall and CPU hours of each stage (timings.json, summed over resumed invocations)."""
    rows = []
    for name in ("timings.json", "timings_ablations.json"):
        path = out / name
        if path.is_file():
            for stage, t in json.loads(path.read_text()).items():
                t = t if isinstance(t, dict) else {"wall_s": t, "cpu_s": math.nan}
                rows.append((f"{stage}{' (ablations)' if 'ablations' in name else ''}", t["wall_s"], t["cpu_s"]))
    if not rows:
        return ""
    lines = ["## Time per stage", "", "CPU time: this process and the processes it waited for (pretraining ranks, "
             "finetune workers); Ray workers (corpus generation, sharding) are not counted.", "",
             "| stage | wall hours | CPU hours |", "|---|---:|---:|"]
    lines += [f"| {s} | {w / 3600:.3f} | {c / 3600:.3f} |" for s, w, c in rows]
    return "\n".join(lines) + "\n"
