"""Rebuild a study run folder for `maskpot study --report-only` from the results kept in this directory.

The scaling curve's runs were made over several sessions, and the run folder of the earlier ones did not
survive to the fifteenth (a fresh machine). The report reads only RUN/finetune/SETTING/NAME/results.json and
RUN/timings.json, so this directory's NAME.json copies (results.json of every run, history included) rebuild
it, and timings.json here holds the stage totals of those runs. `--newer RUN` adds a newer run folder's
finished runs (a finished at-convergence read-out replaces a kept copy of the same name) and its stage times;
once its runs are copied here with their totals, the kept files alone give the same report. Read-only on both.

    python docs/study/scaling/rebuild_run_folder.py /tmp/scaling_report/study_water_small
    maskpot study --config configs/study/water.yaml --scale small --out /tmp/scaling_report/study_water_small \
        --report-only
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

KEPT = Path(__file__).resolve().parent


def rebuild(out: Path, newer: Path | None = None) -> list[str]:
    """Write `out` (refused if it exists); return the names taken from `newer` (an unfinished run of `newer`,
    one without its at-convergence read-out, is left out)."""
    if out.exists():
        raise SystemExit(f"{out} exists; give a new folder")
    runs = out / "finetune" / "dft_water"
    for kept in sorted(KEPT.glob("egnn_*.json")):
        (runs / kept.stem).mkdir(parents=True)
        shutil.copy(kept, runs / kept.stem / "results.json")
    taken = []
    for results in sorted((newer / "finetune" / "dft_water").glob("*/results.json")) if newer else []:
        if "converged" in json.loads(results.read_text()):
            (runs / results.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(results, runs / results.parent.name / "results.json")
            taken.append(results.parent.name)
    totals = json.loads((KEPT / "timings.json").read_text())
    newer_timings = newer / "timings.json" if newer else None
    added = json.loads(newer_timings.read_text()) if newer_timings and newer_timings.is_file() else {}
    for stage, t in added.items():
        acc = totals.setdefault(stage, {"cpu_s": 0.0, "wall_s": 0.0})
        acc["cpu_s"] += t["cpu_s"]
        acc["wall_s"] += t["wall_s"]
    (out / "timings.json").write_text(json.dumps(totals, indent=2, sort_keys=True))
    return taken


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the folder to write (must not exist)")
    p.add_argument("--newer", type=Path, default=None,
                   help="a study run folder whose finished runs and stage times are added "
                        "(e.g. runs/study_water_small)")
    args = p.parse_args()
    taken = rebuild(args.out, args.newer)
    added = f", {len(taken)} from {args.newer}: {', '.join(taken) or 'none'}" if args.newer else ""
    print(f"{args.out}: {len(list(KEPT.glob('egnn_*.json')))} kept runs{added}")


if __name__ == "__main__":
    main()
