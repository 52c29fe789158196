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
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from finetune.forcefield import metrics as M
from maskpot.study import report_grid as G
from maskpot.study.config import ABLATION_MARK

RUN_NAME = re.compile(r"^(?P<model>[a-z0-9]+)_(?P<variant>.+)_n(?P<budget>\d+)_s(?P<seed>\d+)(?:p(?P<pseed>\d+))?$")
SETTING_TITLES = {"dft_water": "DFT water (DeePMD data_0+1 → test data_3), pretraining on TIP3P",
                  "tip3p": "TIP3P → TIP3P (the paper's setting)",
                  "ethanol": "rMD17 ethanol (generic H-masking on the train positions) → test_MD.xyz"}
ORDER = ["scratch", "denoise", "mask", "mask+denoise", "supervised", "hmask", "hmask_farthest"]


def collect(out: Path) -> list[dict]:
    records = []
    for path in sorted((out / "finetune").glob("*/*/results.json")):
        m = RUN_NAME.match(path.parent.name)
        if not m:
            continue
        r = json.loads(path.read_text())
        test = r.get("test") or {}
        conv = r.get("converged") or {}
        config = path.parent.parent / f"{path.parent.name}.yaml"   # written by the study next to the run
        tags = ((yaml.safe_load(config.read_text()) or {}).get("tracking") or {}).get("tags", {}) \
            if config.is_file() else {}
        records.append({"setting": path.parent.parent.name, "model": m["model"], "variant": m["variant"],
                        "budget": int(m["budget"]), "seed": int(m["seed"]),
                        "pseed": int(m["pseed"]) if m["pseed"] else None,
                        "force": test.get(M.FORCE_RMSE, math.nan), "energy": test.get(M.ENERGY_RMSE, math.nan),
                        "force_conv": (conv.get("test") or {}).get(M.FORCE_RMSE, math.nan),
                        "energy_conv": (conv.get("test") or {}).get(M.ENERGY_RMSE, math.nan),
                        "steps_conv": conv.get("steps"), "stopped_early": conv.get("stopped_early"),
                        "history": [(h["step"], h[M.FORCE_RMSE]) for h in r.get("history") or []],
                        # an unfinished at-convergence read-out holds None in every key
                        "history_conv": [(h["step"], h[M.FORCE_RMSE]) for h in conv.get("history") or []],
                        "baseline": tags.get("study.baseline")})
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


def _mean_curve(runs: list[dict], history: str = "history") -> tuple[np.ndarray, np.ndarray]:
    """Validation force RMSE per step of read-out `history` ("history": fixed budget, "history_conv": at
    convergence), averaged over the seeds that reached that step."""
    by_step = defaultdict(list)
    for r in runs:
        for step, value in r[history]:
            by_step[step].append(value)
    steps = np.array(sorted(by_step))
    return steps, np.array([np.mean(by_step[s]) for s in steps])


def is_ablation(variant: str) -> bool:
    return ABLATION_MARK in variant


def split_variant(variant: str) -> tuple[str, str | None]:
    """"mask@lowlr" → ("mask", "lowlr"); "mask" → ("mask", None)."""
    base, _, name = variant.partition(ABLATION_MARK)
    return base, name or None


def summarize(records: list[dict]) -> dict:
    """{setting: {"rows": [...], "steps_to_scratch": [...]}} with means, stds and changes vs scratch
    (main runs only; ablation runs, VARIANT@NAME, are summarised by `summarize_ablations`)."""
    records = [r for r in records if not is_ablation(r["variant"])]
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
                c_mean, c_std = G.mean_std(G.values(group, "converged"))
                steps = [r["steps_conv"] for r in group if r["steps_conv"] is not None]
                rows.append({"model": model, "budget": budget, "variant": variant, "seeds": len(group),
                             "force_mean": f_mean, "force_std": f_std, "energy_mean": e_mean, "energy_std": e_std,
                             "force_change_vs_scratch_pct": 100.0 * (f_mean / base_f - 1.0),
                             "vs_scratch_spread": G.spread_mark(G.values(group, "budget"),
                                                                G.values(scratch or [], "budget")),
                             "force_conv_mean": c_mean, "force_conv_std": c_std,
                             "steps_conv_mean": float(np.mean(steps)) if steps else None,
                             "stopped_early": sum(bool(r["stopped_early"]) for r in group),
                             "conv_vs_scratch": G.compare(G.values(group, "converged"),
                                                          G.values(scratch or [], "converged"))})
                curve_steps, curve = _mean_curve(group)
                hit = curve_steps[curve <= target] if math.isfinite(target) and curve_steps.size else np.array([])
                reach.append({"model": model, "budget": budget, "variant": variant, "scratch_final_val_force": target,
                              "final_step": int(curve_steps[-1]) if curve_steps.size else 0,
                              "first_step_reaching": int(hit[0]) if hit.size else None})
        summary[setting] = {"rows": rows, "steps_to_scratch": reach}
    return summary


def _seed_matched(runs: list[dict], seeds: set[int]) -> list[dict]:
    """The runs of `runs` with a finetune seed in `seeds` (all of them when none of `seeds` ran)."""
    return [r for r in runs if r["seed"] in seeds] or runs


def _seed_matched_force(runs: list[dict], seeds: set[int]) -> float:
    """Mean test force RMSE (fixed budget) of `runs` over `seeds`, as `_seed_matched` picks them."""
    matched = [r["force"] for r in _seed_matched(runs, seeds)]
    return _mean_std(matched)[0] if matched else math.nan


def summarize_ablations(records: list[dict]) -> list[dict]:
    """One row per ablation × model × budget × variant: its test errors, the change against its baseline
    (scratch@NAME when the ablation re-ran scratch, else the main scratch) over the same seeds, and the same
    variant without the ablation (main runs, same seeds) for comparison."""
    by_key = _group(records, "setting", "model", "budget", "variant")
    rows = []
    for (setting, model, budget, variant), runs in sorted(by_key.items()):
        base, name = split_variant(variant)
        if name is None or base == "scratch":   # main runs, and an ablation's own baseline
            continue
        seeds = {r["seed"] for r in runs}
        named = runs[0].get("baseline") or f"scratch{ABLATION_MARK}{name}"   # the study records it per run
        own = by_key.get((setting, model, budget, named))
        scratch = own or by_key.get((setting, model, budget, "scratch"), [])
        main = by_key.get((setting, model, budget, base), [])
        f_mean, f_std = _mean_std([r["force"] for r in runs])
        e_mean, e_std = _mean_std([r["energy"] for r in runs])
        base_f = _seed_matched_force(scratch, seeds)
        main_f = _seed_matched_force(main, seeds) if main else math.nan
        main_scratch_f = _seed_matched_force(by_key.get((setting, model, budget, "scratch"), []), seeds)
        conv = G.values(runs, "converged")   # the at-convergence read-out, against the same baseline runs
        base_conv = G.values(_seed_matched(scratch, seeds), "converged")
        rows.append({"force_converged": G.fmt(conv), "converged_change_vs_baseline": G.compare(conv, base_conv),
                     "ablation": name, "setting": setting, "model": model, "budget": budget, "variant": base,
                     "seeds": sorted(seeds), "pretrainings": len({r["pseed"] for r in runs}),
                     "force_mean": f_mean, "force_std": f_std, "energy_mean": e_mean,
                     "energy_std": e_std, "baseline": named if own else "scratch",
                     "baseline_force": base_f, "force_change_vs_baseline_pct": 100.0 * (f_mean / base_f - 1.0),
                     "without_ablation_force": main_f,
                     "without_ablation_change_pct": 100.0 * (main_f / main_scratch_f - 1.0)})
    return rows


def ablations_markdown(rows: list[dict], notes: dict[str, str], images: list[str]) -> str:
    lines = ["# Ablations", "",
             "Each ablation re-runs some variants with one change; ΔF compares its test force RMSE with its "
             "baseline over the same seeds (scratch@NAME when the ablation changed the finetune, so that both "
             "get the same budget; else the main scratch). 'Without': the same variant in the main grid. "
             "At convergence: the second read-out (early stopping, step cap), against the same baseline runs.", "",
             "| ablation | model | labelled frames | variant | seeds | energy RMSE (meV/atom) | force RMSE (meV/Å) "
             "| baseline F (meV/Å) | ΔF vs baseline | without: F (ΔF) | F at convergence (meV/Å) "
             "| ΔF at convergence |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        without = "—" if not math.isfinite(r["without_ablation_force"]) else \
            f"{r['without_ablation_force']:.1f} ({r['without_ablation_change_pct']:+.1f}%)"
        pretrainings = f" × {r['pretrainings']} pretrainings" if r.get("pretrainings", 1) > 1 else ""
        lines.append(f"| {r['ablation']} | {r['model']} | {r['budget']} | {r['variant']} | "
                     f"{','.join(map(str, r['seeds']))}{pretrainings} | {_fmt(r['energy_mean'], r['energy_std'], 2)} | "
                     f"{_fmt(r['force_mean'], r['force_std'], 1)} | {r['baseline_force']:.1f} ({r['baseline']}) | "
                     f"{r['force_change_vs_baseline_pct']:+.1f}% | {without} | {r['force_converged']} | "
                     f"{r['converged_change_vs_baseline']} |")
    lines.append("")
    lines += [f"- **{name}**: {note}" for name, note in notes.items() if note]
    lines += [""] + [f"![{Path(p).stem}]({p})" for p in images] + [""]
    return "\n".join(lines)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


ABLATION_COLORS = ["black", "tab:cyan", "tab:olive", "tab:brown", "tab:gray"]   # none of ORDER's C0–C6


def _color(variant: str, i: int) -> str:
    """ORDER's variants keep one colour in every plot; ablation runs (dashed) take ABLATION_COLORS by `i`,
    their rank among the ablation runs of the panel."""
    if not is_ablation(variant):
        return f"C{ORDER.index(variant) if variant in ORDER else 7 + i % 3}"
    return ABLATION_COLORS[i % len(ABLATION_COLORS)]


def plot_learning_curves(records: list[dict], setting: str, model: str, path: Path, history: str = "history") -> Path:
    """Mean validation force RMSE vs finetune step per variant, one panel per budget; `history`: the read-out."""
    recs = [r for r in records if r["setting"] == setting and r["model"] == model]
    budgets = sorted({r["budget"] for r in recs})
    fig = Figure(figsize=(4.2 * len(budgets), 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(budgets), squeeze=False)[0])
    for ax, budget in zip(axes, budgets):
        runs = [r for r in recs if r["budget"] == budget]
        ablations = [v for v in _variants(runs) if is_ablation(v)]
        for i, variant in enumerate(_variants(runs)):
            group = [r for r in runs if r["variant"] == variant]
            steps, curve = _mean_curve(group, history)
            rank = ablations.index(variant) if variant in ablations else i
            ax.plot(steps, curve, "--" if is_ablation(variant) else "-", color=_color(variant, rank),
                    label=f"{variant} ({len(group)} run{'s' if len(group) > 1 else ''})")
        readout = " (at convergence)" if history == "history_conv" else ""
        ax.set(title=f"{model}, {budget} labelled frames{readout}", xlabel="finetune step",
               ylabel="validation force RMSE (meV/Å)", yscale="log")
        if readout and (seen := [v for r in runs for _, v in r[history]]):
            ax.set_ylim(top=3 * min(seen))   # long runs: the first steps would flatten what tells the arms apart
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


def convergence_markdown(rows: list[dict]) -> list[str]:
    if not any(math.isfinite(r["force_conv_mean"]) for r in rows):
        return []
    lines = ["At convergence (early stopping on the validation force RMSE, step cap in study.yaml):", "",
             "| model | labelled frames | variant | runs | F at budget (meV/Å) | F at convergence (meV/Å) | "
             "mean steps | stopped early | ΔF vs scratch at convergence |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        steps = "—" if r["steps_conv_mean"] is None else f"{r['steps_conv_mean']:.0f}"
        change = "—" if r["variant"] == "scratch" else r["conv_vs_scratch"]
        lines.append(f"| {r['model']} | {r['budget']} | {r['variant']} | {r['seeds']} | "
                     f"{_fmt(r['force_mean'], r['force_std'], 1)} | "
                     f"{_fmt(r['force_conv_mean'], r['force_conv_std'], 1)} | {steps} | {r['stopped_early']} | "
                     f"{change} |")
    return lines + [""]


def markdown(summary: dict, images: dict[str, list[str]]) -> str:
    lines = ["# Study results", "",
             "Mean ± sample std over runs (finetune seeds × pretraining seeds); test split; model chosen by "
             "validation force RMSE. ΔF: change of the mean test force RMSE against scratch at the same budget; "
             "a difference is 'larger than the spread' when |Δ mean| > std_a + std_b.", ""]
    for setting, data in summary.items():
        lines += [f"## {SETTING_TITLES.get(setting, setting)}", ""] + convergence_markdown(data["rows"]) + [
                  "At the fixed finetune budget:", "",
                  "| model | labelled frames | variant | seeds | energy RMSE (meV/atom) | force RMSE (meV/Å) "
                  "| ΔF vs scratch |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for r in data["rows"]:
            change = "—" if r["variant"] == "scratch" or not math.isfinite(r["force_change_vs_scratch_pct"]) \
                else f"{r['force_change_vs_scratch_pct']:+.1f}% ({r['vs_scratch_spread']})"
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
    write_ablations(out, [r for r in records if not G.experiment_tag(r["variant"])])
    scaling = G.scaling_markdown(rows, G.plot_scaling(rows, report / "scaling.png").name) \
        if (rows := G.scaling_rows(records)) else ""
    grid = "\n".join(part for part in (scaling, G.comparisons_markdown(records)) if part)   # a blank line between
    for (model, budget), runs in G.two_stage_groups(records).items():
        if not any(r["history_conv"] for r in runs):
            continue
        image = plot_learning_curves(runs, "dft_water", model, report / f"two_stage_{model}_n{budget}.png",
                                     history="history_conv")
        grid += f"\n![two-stage, {model}, {budget} frames, validation at convergence]({image.name})\n"
    records = [r for r in records if not is_ablation(r["variant"])]
    if not records:
        ablations = report / "ablations.md"
        return ablations.read_text() if ablations.is_file() else "# Study results\n\nOnly ablation baselines ran.\n"
    summary = summarize(records)
    images: dict[str, list[str]] = defaultdict(list)
    for (setting, model), _ in sorted(_group(records, "setting", "model").items()):
        curve = plot_learning_curves(records, setting, model, report / f"learning_curves_{setting}_{model}.png")
        images[setting].append(curve.name)
        rows = summary[setting]["rows"]
        if len({r["budget"] for r in rows if r["model"] == model}) > 1:
            eff = plot_data_efficiency(rows, model, setting, report / f"data_efficiency_{setting}_{model}.png")
            images[setting].append(eff.name)
    text = markdown(summary, images) + ("\n" + grid if grid else "") + "\n" + G.cpu_hours_markdown(out)
    (report / "summary.md").write_text(text)
    (report / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return text


def write_ablations(out: Path, records: list[dict]) -> None:
    """report/ablations.md, ablations.json and one learning-curve PNG per ablation (when any ran)."""
    rows = summarize_ablations(records)
    if not rows:
        return
    report = out / "report"
    notes = {}
    study_yaml = out / "study_ablations.yaml"
    if study_yaml.is_file():
        notes = {n: (a or {}).get("note", "") for n, a in (yaml.safe_load(study_yaml.read_text()) or {})
                 .get("ablations", {}).items()}
    images = []
    for name in dict.fromkeys(r["ablation"] for r in rows):
        for (setting, model) in dict.fromkeys((r["setting"], r["model"]) for r in rows if r["ablation"] == name):
            variants = {r["variant"] for r in rows if r["ablation"] == name}
            seeds = {s for r in rows if r["ablation"] == name for s in r["seeds"]}
            mine = [r for r in records if r["seed"] in seeds and (split_variant(r["variant"])[1] == name or
                    r["variant"] in variants | {"scratch"})]
            images.append(plot_learning_curves(mine, setting, model,
                                               report / f"ablation_{name}_{setting}_{model}.png").name)
    (report / "ablations.md").write_text(ablations_markdown(rows, notes, images))
    (report / "ablations.json").write_text(json.dumps(rows, indent=2, sort_keys=True))
