"""Shared by the robustness tests of real 2-rank pretrainings: a tiny shard set and `maskpot pretrain`."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.helpers.paths import REPO

TINY = REPO / "configs" / "pretrain" / "tiny.yaml"


def write_water(path: Path, frames: int, seed: int) -> None:
    """8 waters (O,H,H) on a jittered grid in a 6.2 Å periodic box, made-up labels (extxyz)."""
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    box = 6.2
    grid = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)], dtype=float) * box / 2
    structures = []
    for _ in range(frames):
        pos = []
        for oxygen in grid + 0.8 + rng.normal(0, 0.15, (8, 3)):
            q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
            pos += [oxygen, oxygen + 0.96 * q[0], oxygen + 0.96 * (np.cos(1.82) * q[0] + np.sin(1.82) * q[1])]
        atoms = Atoms("OH2" * 8, positions=np.array(pos), cell=np.eye(3) * box, pbc=True)
        atoms.calc = SinglePointCalculator(atoms, energy=-470.0 * 8 + rng.normal(0, 0.3),
                                           forces=rng.normal(0, 0.5, (24, 3)))
        structures.append(atoms)
    ase.io.write(str(path), structures, format="extxyz")


def build_tiny_shards(root: Path) -> Path:
    from data_shards.build import build_shards

    write_water(root / "train.xyz", 16, seed=1)
    write_water(root / "val.xyz", 8, seed=2)
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
