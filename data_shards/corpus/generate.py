"""`maskpot generate corpus`: one task per trajectory (Ray in-process, on a cluster by address, or serial).

OUT/corpus.json records the settings and every trajectory's conditions before any work starts, and the
per-trajectory results (frames, seconds, model) when the run ends. A rerun into the same OUT with the
same settings skips every trajectory whose extxyz exists (they are renamed into place only when whole)
and runs the rest; other settings in the same OUT refuse to start. The files are then a corpus for
`maskpot shards build OUT/*.extxyz` (e.g. `--split-by input`, one trajectory per split).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path

from tqdm.auto import tqdm

from data_shards.corpus.conditions import CorpusConfig, Trajectory, plan
from data_shards.corpus.simulate import run_trajectory
from data_shards.manifest import write_json_atomic
from data_shards.ray_tasks import run_ray_tasks

log = logging.getLogger("data_shards.corpus")

CORPUS_FILE = "corpus.json"
CORPUS_VERSION = 1
TMP_PATTERN = re.compile(r"^\.traj-\d{6}\.extxyz\.tmp-")


def _settings(cfg: CorpusConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _check_out(out: Path, cfg: CorpusConfig) -> dict:
    """The earlier record in OUT (same settings), {} for a fresh folder; ValueError for other settings."""
    path = out / CORPUS_FILE
    if not path.is_file():
        return {}
    rec = json.loads(path.read_text())
    if rec.get("settings") != _settings(cfg):
        changed = sorted(k for k, v in _settings(cfg).items() if rec.get("settings", {}).get(k) != v)
        raise ValueError(f"{path}: this folder holds a corpus generated with other settings (differing: "
                         f"{changed}); use another --out or the same settings to resume")
    return rec


def _run_serial(cfg, todo, out, on_result) -> None:
    for traj in todo:
        on_result(run_trajectory(cfg, traj, str(out)))


def _run_ray(cfg, todo, out, on_result, ray_address: str | None, num_cpus: int | None) -> None:
    run_ray_tasks(run_trajectory, [(cfg, traj, str(out)) for traj in todo], on_result, ray_address, num_cpus)


def cost_per_frame(results: list[dict]) -> dict:
    """{model: {"ms_per_frame", "ms_per_frame_per_molecule"}} over trajectories timed in this run."""
    costs: dict[str, dict] = {}
    for model in sorted({r["model"] for r in results if r.get("seconds")}):
        rs = [r for r in results if r["model"] == model and r.get("seconds")]
        frames = sum(r["frames"] for r in rs)
        seconds = sum(r["seconds"] for r in rs)
        molecule_frames = sum(r["frames"] * r["atoms"] / 3 for r in rs)
        costs[model] = {"ms_per_frame": 1000 * seconds / frames,
                        "ms_per_frame_per_molecule": 1000 * seconds / molecule_frames, "frames": frames}
    return costs


def generate_corpus(cfg: CorpusConfig, out_dir, ray_address: str | None = None, num_cpus: int | None = None,
                    use_ray: bool = True, progress: bool = True) -> dict:
    """Generate (or finish) the corpus in `out_dir`; returns the content of corpus.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    earlier = _check_out(out, cfg)
    trajectories = plan(cfg)
    record = {"corpus_version": CORPUS_VERSION, "settings": _settings(cfg),
              "trajectories": [dataclasses.asdict(t) for t in trajectories]}
    write_json_atomic(out / CORPUS_FILE, {**earlier, **record})
    for p in out.iterdir():
        if TMP_PATTERN.match(p.name):   # a killed task's partial file
            p.unlink()
    todo = [t for t in trajectories if not (out / t.file_name).is_file()]
    if len(todo) < len(trajectories):
        log.info("resuming: %d of %d trajectories already in %s", len(trajectories) - len(todo), len(trajectories),
                 out)
    results = {r["index"]: r for r in earlier.get("results", [])}
    bar = tqdm(total=len(todo) * cfg.frames_per_trajectory, unit="frame", desc="corpus",
               **({} if progress else {"disable": True}))
    fresh: list[dict] = []

    def on_result(result: dict) -> None:
        results[result["index"]] = result
        fresh.append(result)
        bar.update(result["frames"])

    started = time.perf_counter()
    try:
        if todo:
            (_run_ray(cfg, todo, out, on_result, ray_address, num_cpus) if use_ray
             else _run_serial(cfg, todo, out, on_result))
    finally:
        bar.close()
    wall = time.perf_counter() - started
    frames = sum(r["frames"] for r in fresh)
    record.update(results=[results.get(t.index, _untimed(t, cfg)) for t in trajectories],
                  last_run={"trajectories": len(fresh), "frames": frames, "seconds": wall,
                            "frames_per_second": frames / wall if wall > 0 and frames else None,
                            "cost_per_frame": cost_per_frame(fresh)})
    write_json_atomic(out / CORPUS_FILE, record)
    return record


def _untimed(traj: Trajectory, cfg: CorpusConfig) -> dict:
    """A trajectory found on disk from a run that ended before recording it."""
    return {"index": traj.index, "file": traj.file_name, "frames": cfg.frames_per_trajectory,
            "atoms": 3 * traj.molecules, "seconds": None, "model": traj.model}
