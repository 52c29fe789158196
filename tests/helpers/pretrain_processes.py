"""Shared by the robustness tests of real 2-rank pretrainings: a tiny shard set and `maskpot pretrain`."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.paths import REPO
from tests.helpers.shards import write_water_frames

TINY = REPO / "configs" / "pretrain" / "tiny.yaml"


def build_tiny_shards(root: Path) -> Path:
    from data_shards.build import build_shards

    write_water_frames(root / "train.xyz", 16, seed=1)
    write_water_frames(root / "val.xyz", 8, seed=2)
    out = root / "shards"
    build_shards([f"train={root / 'train.xyz'}", f"val={root / 'val.xyz'}"], str(out), shard_size=4,
                 use_ray=False, progress=False)
    return out


def maskpot(*argv: str, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    """The `maskpot` console script in a subprocess (this tree first on the path)."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **env)
    return subprocess.run([sys.executable, "-m", "maskpot.cli", *argv], env=full_env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, check=False)


def pretrain_argv(shards: Path, out_dir: Path, *overrides: str, resume: str = "auto") -> list[str]:
    return ["pretrain", "--config", str(TINY), "--nproc", "2", "--resume", resume, "--override",
            f"data.manifest_dir={shards}", f"train.out_dir={out_dir}", "optim.decay_steps=10", *overrides]


def start_pretrain(shards: Path, out_dir: Path, *overrides: str, step_sleep: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               MASKPOT_TEST_STEP_SLEEP_S=str(step_sleep))
    return subprocess.Popen([sys.executable, "-m", "maskpot.cli", *pretrain_argv(shards, out_dir, *overrides)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    raise TimeoutError(f"{path} did not appear within {timeout} s")
