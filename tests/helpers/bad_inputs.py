"""Small input files for the bad-input tests (issue 12), and the `maskpot` CLI in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.helpers.paths import REPO


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


def build_water_shards(root: Path, n_train: int = 6, n_val: int = 4, n_test: int = 4) -> Path:
    """train/val/test shards of small labelled water frames (in-process, no Ray)."""
    from data_shards.build import build_shards

    root.mkdir(parents=True, exist_ok=True)
    inputs = []
    for split, n, seed in (("train", n_train, 11), ("val", n_val, 12), ("test", n_test, 13)):
        inputs.append(f"{split}={write_extxyz(root / f'{split}.xyz', water_frames(n, seed=seed))}")
    out = root / "shards"
    build_shards(inputs, str(out), shard_size=100, use_ray=False, progress=False)
    return out


def rewrite_member(tar_path: Path, change, manifest_too: bool = True) -> str:
    """Rewrite a shard with `change(name, data) -> (name, data)` applied to its members (first change wins);
    the manifest's sha256 and size follow (as a careless rebuild would), so only the samples can tell."""
    import hashlib
    import io
    import json
    import tarfile

    members, changed = [], None
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            name, data = m.name, tf.extractfile(m).read()
            if changed is None:
                new_name, new_data = change(name, data)
                if (new_name, new_data) != (name, data):
                    changed, name, data = name, new_name, new_data
            members.append((name, data))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    tar_path.write_bytes(buf.getvalue())
    if manifest_too:
        manifest_path = tar_path.parent / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        for shard in manifest["shards"]:
            if shard["name"] == tar_path.name:
                shard["sha256"], shard["bytes"] = hashlib.sha256(buf.getvalue()).hexdigest(), len(buf.getvalue())
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    assert changed is not None, "nothing changed"
    return changed


def flip_energy_digit(name: str, data: bytes):
    """The first json member with its energy's last-but-one digit changed."""
    import json
    import re

    if not name.endswith(".json"):
        return name, data
    text = data.decode()
    energy = str(json.loads(text)["energy"])
    match = re.search(re.escape(energy), text)
    k = match.start() + len(energy) - 2
    digit = text[k]
    assert digit.isdigit()
    return name, (text[:k] + str((int(digit) + 1) % 10) + text[k + 1:]).encode()
