"""Quiet, useful output when stdout/stderr are not a terminal (issue 15 item 6): progress as periodic plain
lines instead of carriage-return redraws, few warnings, for generate, shards build, evaluate and md."""
from __future__ import annotations

import io
import os
import subprocess
import sys

from data_shards.progress import LineProgress, progress
from tests.helpers.paths import REPO, TINY_EXPORT


def _run(*args: str, interval: str = "0.5") -> str:
    env = {**os.environ, "MASKPOT_PROGRESS_EVERY_S": interval,
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("TQDM_DISABLE", None)          # the suite silences bars; here the progress output is the subject
    r = subprocess.run([sys.executable, "-m", "maskpot.cli", *args], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


def _assert_quiet(text: str, progress_desc: str) -> None:
    assert "\r" not in text, "carriage-return redraws in a non-TTY log"
    assert any(line.startswith(progress_desc + ":") for line in text.splitlines()), text[-2000:]
    warnings = [line for line in text.splitlines() if "Warning" in line or "WARNING" in line]
    assert len(warnings) <= 2, warnings


def test_progress_is_lines_off_a_terminal_and_a_bar_on_one(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    out = io.StringIO()
    bar = progress(total=10, desc="steps", unit="step", file=out)
    assert isinstance(bar, LineProgress)
    bar.interval = 0.0
    for _ in range(10):
        bar.update(1)
        bar.set_postfix(loss="0.1")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("steps: 10/10 steps (100%)") and "loss=0.1" in lines[-1]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert not isinstance(progress(total=3, file=Terminal()), LineProgress)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not isinstance(progress(total=3, file=out), LineProgress)


def test_generate_build_evaluate_md_print_lines_not_redraws(tmp_path):
    text = _run("generate", "tip3p", "--out", str(tmp_path / "gen"), "--molecules", "8", "--frames", "12",
                "--steps-between-frames", "10")
    _assert_quiet(text, "TIP3P 8 H2O")
    xyz = next((tmp_path / "gen").glob("*.extxyz"))
    text = _run("shards", "build", str(xyz), "--out", str(tmp_path / "shards"), "--serial", "--shard-size", "3")
    _assert_quiet(text, "shards")
    export = TINY_EXPORT
    text = _run("evaluate", str(export), str(xyz), "--out", str(tmp_path / "eval"))
    _assert_quiet(text, "evaluate")
    text = _run("md", str(export), str(xyz), "--steps", "40", "--temperature", "300", "--every", "10",
                "--out", str(tmp_path / "md.extxyz"), "--no-guards")
    _assert_quiet(text, "md langevin")
