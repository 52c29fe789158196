"""Same-run, alternated, paired benchmark harness: every figure is a ratio to a baseline measured in the run.

    result = compare("egnn training", arms={"slow": slow_fn, "fast": fast_fn}, baseline="slow",
                     metrics={"s_per_step": TIME, "peak_rss_mb": SIZE}, rounds=3, json_path=...)

An arm is either an in-process callable returning a dict of metrics (the harness adds `wall_s`, the call's
own wall time), or a `Command` (argv) run in a fresh process per round, whose stdout carries one line
`HARNESS_RESULT {json}` (written by `emit`, which adds `peak_rss_mb`, the child's own VmHWM); the harness
adds `wall_s` of the whole
process and the child's `os.wait4` rusage maxrss (not the cumulative RUSAGE_CHILDREN).

Rounds run the arms in the same order, A B A B … (≥ 3 rounds, after `warmup` unrecorded rounds). Each
round gives one *paired* ratio arm/baseline per metric (TIME metrics: baseline/arm, a speed-up; RATE and SIZE
metrics: arm/baseline); the printout gives the median and min–max of the paired ratios and the medians of
both arms. Load average (1/5/15 min) at start and end, machine (CPU model, cores) and versions (python,
torch, maskpot git sha) go into a JSON beside the printout, with every sample (run id, round, time stamp),
so a ratio can be recomputed from the samples of this run alone. There is no way to give a baseline as a
number: a ratio's denominator is always an arm of the same `compare` call.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "HARNESS_RESULT "
TIME = "time"   # lower is better; ratio printed = baseline / arm (speed-up)
RATE = "rate"   # higher is better; ratio = arm / baseline
SIZE = "size"   # memory etc.; ratio = arm / baseline (≤ 1 is smaller)


@dataclass
class Command:
    """An arm run as a fresh process per round: argv, optional extra environment."""
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 1800.0


def emit(metrics: dict) -> None:
    """Child side of a `Command` arm: hand the metrics back to the harness, with this process's peak RSS."""
    hwm = own_peak_rss_mb()
    if hwm is not None:
        metrics = {"peak_rss_mb": hwm, **metrics}
    print(RESULT_PREFIX + json.dumps(metrics), flush=True)


def own_peak_rss_mb() -> float | None:
    """VmHWM of this process's own address space. Not ru_maxrss: after fork + exec that also counts the
    parent's pages the child held before exec (a large parent would inflate every child's figure)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "cores": os.cpu_count(), "platform": platform.platform(),
            "hostname": platform.node()}


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    torch = sys.modules.get("torch")
    out["torch"] = getattr(torch, "__version__", None) if torch else _child_torch_version()
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        out["maskpot_git_sha"] = sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        out["maskpot_git_sha"] = None
    return out


def _child_torch_version() -> str | None:
    # torch not imported by this process (subprocess arms only): ask a child rather than pay the import here
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                          text=True, timeout=120, check=False)
    return done.stdout.strip() or None


def run_command(command: Command) -> dict:
    """Run one fresh process; its emitted metrics + its own peak RSS (MB) and wall seconds."""
    env = {**os.environ, **command.env}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command.argv, stdout=out, stderr=err, env=env, cwd=REPO)
        deadline = start + command.timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise TimeoutError(f"benchmark arm timed out after {command.timeout_s} s: {command.argv}")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark arm failed (exit {proc.returncode}): {command.argv}\n{stderr[-4000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError(f"benchmark arm printed no {RESULT_PREFIX.strip()} line: {command.argv}\n{stdout[-2000:]}")
    metrics = json.loads(lines[-1][len(RESULT_PREFIX):])
    metrics["rusage_maxrss_mb"] = usage.ru_maxrss / 1024.0   # Linux: KiB; includes pre-exec pages of the fork
    metrics.setdefault("peak_rss_mb", metrics["rusage_maxrss_mb"])   # children that do not call emit()
    metrics.setdefault("wall_s", wall)
    return metrics


def run_arm(arm) -> dict:
    if isinstance(arm, Command):
        return run_command(arm)
    start = time.perf_counter()
    metrics = dict(arm() or {})
    metrics.setdefault("wall_s", time.perf_counter() - start)
    return metrics


def _ratio(kind: str, arm: float, base: float) -> float:
    if kind == TIME:
        return base / arm if arm > 0 else float("inf")
    return arm / base if base > 0 else float("inf")


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def compare(title: str, arms: dict, baseline: str, metrics: dict[str, str], rounds: int = 3, warmup: int = 0,
            json_path: str | Path | None = None, notes: dict | None = None, printer=print) -> dict:
    """Run `arms` alternated for `rounds` rounds; print and return paired ratios against `baseline`."""
    if baseline not in arms:
        raise ValueError(f"baseline {baseline!r} is not an arm; arms: {sorted(arms)}")
    if len(arms) < 2:
        raise ValueError("compare needs a baseline arm and at least one other arm")
    if rounds < 3:
        raise ValueError(f"rounds must be >= 3 (alternated A B A B …), got {rounds}")
    bad = {name: kind for name, kind in metrics.items() if kind not in (TIME, RATE, SIZE)}
    if bad:
        raise ValueError(f"metric kinds must be one of {[TIME, RATE, SIZE]}, got {bad}")
    run_id = uuid.uuid4().hex
    record = {"title": title, "run_id": run_id, "baseline": baseline, "arms": list(arms), "rounds": rounds,
              "warmup_rounds": warmup, "metrics": metrics, "machine": machine(), "argv": sys.argv,
              "load_average_start": load_average(), "started": time.time(), "notes": notes or {}}
    printer(f"== {title}  (run {run_id[:8]}, {rounds} rounds alternated {' '.join(arms)} …, "
            f"load avg at start {record['load_average_start']})")
    for _ in range(warmup):
        for arm in arms.values():
            run_arm(arm)
    samples = {name: [] for name in arms}
    order = []
    for k in range(rounds):
        for name, arm in arms.items():
            result = run_arm(arm)
            missing = [m for m in metrics if m not in result]
            if missing:
                raise RuntimeError(f"arm {name!r} returned no {missing}; it returned {sorted(result)}")
            samples[name].append({"run_id": run_id, "round": k, "time": time.time(), "metrics": result})
            order.append(name)
            shown = ", ".join(f"{m} {_fmt(result[m])}" for m in metrics)
            printer(f"   round {k} {name}: {shown} (load {load_average()[0]})")
            if json_path is not None:   # a run cut short still leaves its samples (complete: false)
                _write(json_path, {**record, "samples": samples, "order": order, "complete": False})
    record.update(samples=samples, order=order, load_average_end=load_average(), finished=time.time(),
                  versions=versions(), complete=True)
    record["ratios"] = _ratios(samples, baseline, metrics)
    _print(record, printer)
    if json_path is not None:
        _write(json_path, record)
        printer(f"   JSON: {json_path}")
    return record


def _write(path: str | Path, record: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1, default=str) + "\n")


def _ratios(samples: dict, baseline: str, metrics: dict[str, str]) -> list[dict]:
    out = []
    for name, rows in samples.items():
        if name == baseline:
            continue
        for metric, kind in metrics.items():
            pairs = [(a["metrics"][metric], b["metrics"][metric]) for a, b in zip(rows, samples[baseline])]
            paired = [_ratio(kind, arm, base) for arm, base in pairs]
            out.append({"arm": name, "baseline": baseline, "metric": metric, "kind": kind,
                        "arm_values": [a for a, _ in pairs], "baseline_values": [b for _, b in pairs],
                        "baseline_rounds": [s["round"] for s in samples[baseline]],
                        "paired": paired, "median": statistics.median(paired), "min": min(paired),
                        "max": max(paired)})
    return out


def _print(record: dict, printer) -> None:
    baseline = record["baseline"]
    for metric in record["metrics"]:
        for name, rows in record["samples"].items():
            values = [row["metrics"][metric] for row in rows]
            printer(f"   {metric:>20s} {name:>14s}: median {_fmt(statistics.median(values))} "
                    f"(min {_fmt(min(values))}, max {_fmt(max(values))}, n={len(values)})")
    for ratio in record["ratios"]:
        what = "speed-up" if ratio["kind"] == TIME else "ratio"
        printer(f"   RATIO {ratio['metric']} {what} {ratio['arm']} vs {baseline}: median {ratio['median']:.3f} "
                f"(min {ratio['min']:.3f}, max {ratio['max']:.3f}; paired over rounds {ratio['baseline_rounds']})")
    printer(f"   load avg start {record['load_average_start']} end {record['load_average_end']}; "
            f"{record['machine']['cpu_model']}, {record['machine']['cores']} cores; {record['versions']}")


def median_time(fn: Callable[[], object], steps: int, warmup: int = 1) -> float:
    """Median wall seconds of `steps` calls after `warmup` calls (inside one arm's sample)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
