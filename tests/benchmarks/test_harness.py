"""benchmarks/harness.py: ratios only against arms measured in the same run; no benchmark divides by a constant."""
from __future__ import annotations

import ast
import json
import re
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness

# unit conversions a benchmark may divide by: powers of ten and of 1024, and 2 (halves, per-thread)
ALLOWED_DENOMINATORS = {1, 2, 8, 60, 1024, 1024**2, 1024**3, 1e3, 1e6, 1e9, 1e12, 3600}
SUSPECT_NAME = re.compile(r"(REFERENCE|BASELINE|PAPER|MEASURED|REMEMBERED).*", re.IGNORECASE)


def numeric(node: ast.AST) -> float | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = numeric(node.operand)
        return None if inner is None else -inner
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):   # 1024**2
        left, right = numeric(node.left), numeric(node.right)
        return None if left is None or right is None else left ** right
    return None


def constant_offences(source: str) -> list[str]:
    """Numeric literals (or module constants holding one) used as a ratio's denominator, and module-level
    numeric constants named like a remembered reference / baseline / target figure."""
    tree = ast.parse(source)
    module_numbers = {}
    offences = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and numeric(node.value) is not None:
            for target in node.targets:
                if isinstance(target, ast.Name):
                    module_numbers[target.id] = numeric(node.value)
                    if SUSPECT_NAME.match(target.id):
                        offences.append(f"line {node.lineno}: module constant {target.id} = {numeric(node.value)}")
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):   # not //: it cuts counts
            value = numeric(node.right)
            if value is None and isinstance(node.right, ast.Name):
                value = module_numbers.get(node.right.id)
            if value is not None and value not in ALLOWED_DENOMINATORS:
                offences.append(f"line {node.lineno}: divides by the constant {value:g}")
    return offences


def test_the_check_catches_the_old_hard_coded_baseline():
    old = ("REFERENCE_TRAIN_ATOMS_PER_S = 637\n"
           "ratio = natoms / seconds / REFERENCE_TRAIN_ATOMS_PER_S\n"
           "other = rate / 1709\n"
           "fine = nbytes / 1e6 + rss / 1024**2\n")
    offences = constant_offences(old)
    assert any("637" in o for o in offences) and any("1709" in o for o in offences)
    assert not any("1e+06" in o or "1048576" in o for o in offences), offences


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_no_benchmark_divides_by_a_remembered_figure(path):
    assert constant_offences(path.read_text()) == [], path


def test_every_benchmark_uses_the_harness():
    for path in BENCH.glob("bench_*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module == "harness" for alias in node.names}
        assert "compare" in imported, f"{path.name} does not report through harness.compare"


def test_two_tiny_callables_alternated_paired_and_recorded(tmp_path):
    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.3)
        return {"items_per_s": 50.0 + len(calls), "seconds": 0.3}

    def fast():
        calls.append("fast")
        time.sleep(0.03)
        return {"items_per_s": 200.0 + len(calls), "seconds": 0.03}

    printed = []
    started = time.time()
    record = harness.compare("tiny", {"slow": slow, "fast": fast}, "slow",
                             {"seconds": harness.TIME, "wall_s": harness.TIME, "items_per_s": harness.RATE},
                             rounds=4, json_path=tmp_path / "tiny.json", printer=printed.append)
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved["run_id"] == record["run_id"]
    assert calls == ["slow", "fast"] * 4 and saved["order"] == calls            # A B A B …
    for arm in ("slow", "fast"):
        rows = saved["samples"][arm]
        assert len(rows) == 4 and [r["round"] for r in rows] == [0, 1, 2, 3]
        assert all(r["run_id"] == saved["run_id"] and started <= r["time"] <= time.time() for r in rows)
    for key in ("load_average_start", "load_average_end", "machine", "versions"):
        assert saved[key], key
    assert saved["machine"]["cores"] >= 1 and saved["versions"]["python"]
    # every printed ratio: its baseline values are this run's baseline samples, and the ratio follows from them
    assert sum("round 3 fast:" in line for line in printed) == 1       # progress, one line per sample
    ratio_lines = [line for line in printed if "RATIO" in line]
    assert len(ratio_lines) == len(saved["ratios"]) == 3
    for ratio, line in zip(saved["ratios"], ratio_lines):
        base = [r["metrics"][ratio["metric"]] for r in saved["samples"][ratio["baseline"]]]
        arm = [r["metrics"][ratio["metric"]] for r in saved["samples"][ratio["arm"]]]
        assert ratio["baseline_values"] == base and ratio["arm_values"] == arm
        paired = [b / a if ratio["kind"] == harness.TIME else a / b for a, b in zip(arm, base)]
        assert ratio["paired"] == pytest.approx(paired)
        assert f"median {ratio['median']:.3f}" in line and f"{ratio['arm']} vs {ratio['baseline']}" in line
    by_metric = {r["metric"]: r for r in saved["ratios"]}
    assert by_metric["seconds"]["median"] == pytest.approx(10.0)
    assert by_metric["wall_s"]["median"] > 1.5                                  # measured, not given
    assert by_metric["items_per_s"]["paired"][0] == pytest.approx(202.0 / 51.0)


def test_fresh_process_arms_report_their_own_peak_rss(tmp_path):
    prelude = f"import sys; sys.path.insert(0, {str(BENCH)!r}); import harness; "
    small = harness.Command([sys.executable, "-c", prelude + "harness.emit({'n': 1})"])
    big = harness.Command([sys.executable, "-c", prelude + "b = bytearray(200 * 1024**2); "
                           "b[::4096] = b'x' * len(b[::4096]); harness.emit({'n': 2})"])
    record = harness.compare("rss", {"small": small, "big": big}, "small", {"peak_rss_mb": harness.SIZE},
                             rounds=3, printer=lambda _: None)
    ratio = record["ratios"][0]
    assert all(v > 200 for v in ratio["arm_values"]) and all(v < 150 for v in ratio["baseline_values"])
    assert ratio["median"] > 2


def test_rejects_fewer_than_three_rounds_and_unknown_baseline():
    with pytest.raises(ValueError, match="rounds must be >= 3"):
        harness.compare("x", {"a": dict, "b": dict}, "a", {"wall_s": harness.TIME}, rounds=2)
    with pytest.raises(ValueError, match="baseline 'c' is not an arm"):
        harness.compare("x", {"a": dict, "b": dict}, "c", {"wall_s": harness.TIME})
