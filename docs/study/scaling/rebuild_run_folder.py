"""Rebuild a study run folder for `maskpot study --report-only` from the results kept in this directory.

The scaling curve's runs were made over several sessions, and the run folder of the earlier ones did not
survive to the fifteenth (a fresh machine). The report reads only RUN/finetune/SETTING/NAME/results.json and
RUN/timings.json, so this folder's NAME.json copies (results.json of every run, history included) plus a newer
run folder's finished runs rebuild it; the stage times are summed (this directory's timings.json holds the
totals before the newer folder's). Read-only on both sources.

    python docs/study/scaling/rebuild_run_folder.py runs/study_water_small /tmp/scaling_report/study_water_small
    maskpot study --config configs/study/water.yaml --scale small --out /tmp/scaling_report/study_water_small \
        --report-only
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

KEPT = Path(__file__).resolve().parent


def rebuild(newer: Path, out: Path) -> list[str]:
    """Write `out` (refused if it exists); return the names taken from `newer` (a finished at-convergence
    read-out replaces a kept copy of the same name; an unfinished run of `newer` is left out)."""
    if out.exists():
        raise SystemExit(f"{out} exists; give a new folder")
    runs = out / "finetune" / "dft_water"
    for kept in sorted(KEPT.glob("egnn_*.json")):
        (runs / kept.stem).mkdir(parents=True)
        shutil.copy(kept, runs / kept.stem / "results.json")
    taken = []
    for results in sorted((newer / "finetune" / "dft_water").glob("*/results.json")):
        if "converged" in json.loads(results.read_text()):
            (runs / results.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(results, runs / results.parent.name / "results.json")
            taken.append(results.parent.name)
    totals = json.loads((KEPT / "timings.json").read_text())
    newer_timings = newer / "timings.json"
    for stage, t in (json.loads(newer_timings.read_text()) if newer_timings.is_file() else {}).items():
        acc = totals.setdefault(stage, {"cpu_s": 0.0, "wall_s": 0.0})
        acc["cpu_s"] += t["cpu_s"]
        acc["wall_s"] += t["wall_s"]
    (out / "timings.json").write_text(json.dumps(totals, indent=2, sort_keys=True))
    return taken


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("newer", type=Path,
                   help="a study run folder whose finished runs are added (e.g. runs/study_water_small)")
    p.add_argument("out", type=Path, help="the folder to write (must not exist)")
    args = p.parse_args()
    taken = rebuild(args.newer, args.out)
    print(f"{args.out}: {len(list(KEPT.glob('egnn_*.json')))} kept runs, {len(taken)} from {args.newer}: "
          f"{', '.join(taken) or 'none'}")


if __name__ == "__main__":
    main()
