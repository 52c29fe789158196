"""Small input files for the bad-input tests (issue 12), and the `maskpot` CLI in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def water_frames(n: int, seed: int = 0, periodic: bool = True, offset: float = 0.0):
    """`n` labelled 4-water ase.Atoms (O,H,H order), jittered on a grid in a 6.2 Å box (or open)."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    grid = np.array([[0, 0, 0], [3.1, 0, 0], [0, 3.1, 0], [0, 0, 3.1]]) + 1.0
    frames = []
    for _ in range(n):
        pos = []
        for oxygen in grid + rng.normal(0, 0.1, (4, 3)):
            q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
            pos += [oxygen, oxygen + 0.96 * q[0], oxygen + 0.96 * (np.cos(1.82) * q[0] + np.sin(1.82) * q[1])]
        atoms = Atoms("OH2" * 4, positions=np.array(pos) + offset, cell=np.eye(3) * 6.2 if periodic else None,
                      pbc=periodic)
        atoms.calc = SinglePointCalculator(atoms, energy=-470.0 * 4 + rng.normal(0, 0.3),
                                           forces=rng.normal(0, 0.5, (12, 3)))
        frames.append(atoms)
    return frames


def write_extxyz(path: Path, frames) -> Path:
    import ase.io

    ase.io.write(str(path), frames, format="extxyz")
    return path


def maskpot(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", "maskpot.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, check=False)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The single error line of a failed command (asserts exit 2 and no traceback)."""
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = [x for x in done.stderr.splitlines() if ": error: " in x]
    assert len(lines) == 1, done.stderr[-2000:]
    return lines[0]


def read_samples(shard_dir: Path) -> list[dict]:
    import tarfile

    from data_shards.sample import decode_sample

    samples = []
    for tar in sorted(Path(shard_dir).glob("shard-*.tar")):
        members: dict[str, dict] = {}
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
        samples += [decode_sample(s) for s in members.values()]
    return samples
