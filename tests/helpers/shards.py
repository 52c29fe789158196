"""Input files the shard tests write (extxyz, DeePMD folders, small labelled water boxes) and checks of
what a build wrote (shard tars read back without WebDataset, manifest against disk)."""
from __future__ import annotations

import tarfile
from pathlib import Path

import ase
import ase.io
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

from data_shards import keys as K
from data_shards.manifest import MANIFEST_DIR, file_sha256
from data_shards.sample import decode_sample


def write_xyz(path: Path, atoms: list[ase.Atoms]) -> str:
    ase.io.write(path, atoms, format="extxyz")
    return str(path)


def write_deepmd_system(root: Path, types: list[int], type_map: list[str], sets: list[int], seed: int = 0,
                        periodic: bool = True) -> dict:
    """A DeePMD folder with random arrays; returns the arrays written, concatenated over sets."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "type.raw").write_text("\n".join(map(str, types)) + "\n")
    (root / "type_map.raw").write_text("\n".join(type_map) + "\n")
    if not periodic:
        (root / "nopbc").touch()
    n = len(types)
    written: dict[str, list] = {"coord": [], "box": [], "energy": [], "force": []}
    for k, nframes in enumerate(sets):
        set_dir = root / f"set.{k:03d}"
        set_dir.mkdir()
        arrays = {"coord": rng.uniform(0, 8, size=(nframes, 3 * n)).astype(np.float32),
                  "box": np.tile(np.diag([8.0, 9.0, 10.0]).reshape(1, 9), (nframes, 1)).astype(np.float32),
                  "energy": rng.normal(-50, 1, size=nframes).astype(np.float32),
                  "force": rng.normal(size=(nframes, 3 * n)).astype(np.float32)}
        for name, array in arrays.items():
            np.save(set_dir / f"{name}.npy", array)
            written[name].append(array)
    return {name: np.concatenate(parts) for name, parts in written.items()}


def water_grid_frames(n: int, seed: int, labelled: bool = True, oxygen_only: bool = False) -> list[ase.Atoms]:
    """8 waters (O,H,H order) on a jittered 2×2×2 grid in a 6.2 Å periodic box, made-up labels; without
    labels when `labelled` is false (a trajectory of any MD code), only the oxygens with `oxygen_only`."""
    rng = np.random.default_rng(seed)
    box = 6.2
    grid = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)], dtype=float) * box / 2
    structures = []
    for _ in range(n):
        pos = []
        for oxygen in grid + 0.8 + rng.normal(0, 0.15, (8, 3)):
            q, _ = np.linalg.qr(rng.normal(size=(3, 3)))  # random orientation
            pos += [oxygen] if oxygen_only else [oxygen, oxygen + 0.96 * q[0],
                                                 oxygen + 0.96 * (np.cos(1.82) * q[0] + np.sin(1.82) * q[1])]
        atoms = ase.Atoms("O8" if oxygen_only else "OH2" * 8, positions=np.array(pos), cell=np.eye(3) * box, pbc=True)
        forces = rng.normal(0, 0.5, (len(atoms), 3))
        energy = -470.0 * 8 + rng.normal(0, 0.3)
        if labelled:
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        structures.append(atoms)
    return structures


def write_water_frames(path: Path, frames: int, seed: int) -> None:
    """`water_grid_frames` with labels, as extxyz."""
    ase.io.write(str(path), water_grid_frames(frames, seed), format="extxyz")


def tar_samples(path: str) -> list[dict]:
    """Decode every sample of one shard straight from the tar (no WebDataset), in file order."""
    members: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    return [decode_sample(s) for s in members.values()]


def assert_manifest_matches_disk(manifest: dict) -> None:
    folder = Path(manifest[MANIFEST_DIR])
    for shard in manifest["shards"]:
        path = folder / shard["name"]
        assert file_sha256(path) == shard["sha256"]
        assert path.stat().st_size == shard["bytes"]
        samples = tar_samples(str(path))
        assert len(samples) == shard["samples"]
        assert sum(len(s[K.SPECIES]) for s in samples) == shard["atoms"]
    for split, summary in manifest["splits"].items():
        assert summary["samples"] == sum(s["samples"] for s in manifest["shards"] if s["split"] == split)
    t = manifest["totals"]
    assert t["frames_read"] == t["samples_written"] + t["quarantined"] + t["duplicates"]
    assert t["samples_written"] == sum(s["samples"] for s in manifest["shards"])
