"""One trajectory with OpenMM: build, minimise, equilibrate, then stream labelled frames into an extxyz.

Periodic: a cube whose side follows from the density, PME with a cutoff of min(9 Å, 0.49 × side).
Cluster (periodic=False): the same molecules without a box (NoCutoff), pbc false in the frames.
Determinism as in data_shards.tip3p: seeded integrator and velocities, CPU platform with
DeterministicForces on one thread, so a trajectory is byte-identical run to run on one machine.
The extxyz is written to a temporary name and renamed when complete: a file under the final name is
always a whole trajectory (what resuming relies on).
"""
from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openmm as mm
from ase.io.extxyz import write_xyz
from openmm import app, unit

from data_shards.corpus.conditions import CorpusConfig, Trajectory
from data_shards.corpus.models import WaterModel, get_model
from data_shards.frame import Frame
from data_shards.tip3p import (
    ANGSTROM_PER_NM,
    AVOGADRO,
    CPU_THREADS,
    MAX_CUTOFF,
    WATER_MOLAR_MASS,
    WATER_SPECIES,
    evaluate,
    frame_to_atoms,
    random_rotation,
)


def box_side(molecules: int, density_g_cm3: float) -> float:
    """Å, the cube holding `molecules` waters at `density_g_cm3`."""
    return (molecules * WATER_MOLAR_MASS / AVOGADRO / density_g_cm3 * 1e24) ** (1.0 / 3.0)


def initial_positions(traj: Trajectory, model: WaterModel) -> np.ndarray:
    """(3N, 3) Å, O,H,H: random sites of a cubic lattice in the box, jittered, randomly oriented."""
    rng = np.random.default_rng(traj.md_seed)
    side = box_side(traj.molecules, traj.density_g_cm3)
    per_side = math.ceil(round(traj.molecules ** (1.0 / 3.0), 9))
    spacing = side / per_side
    grid = np.stack(np.meshgrid(*[np.arange(per_side)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    sites = grid[np.sort(rng.choice(len(grid), traj.molecules, replace=False))]
    oxygens = (sites + 0.5) * spacing + rng.uniform(-0.1, 0.1, size=sites.shape) * spacing
    half, b = model.hoh_angle / 2, model.oh_bond
    local = np.array([[0.0, 0.0, 0.0], [b * math.sin(half), b * math.cos(half), 0.0],
                      [-b * math.sin(half), b * math.cos(half), 0.0]])
    return np.concatenate([o + local @ random_rotation(rng).T for o in oxygens], axis=0)


def build_system(traj: Trajectory, model: WaterModel) -> mm.System:
    top = app.Topology()
    chain = top.addChain()
    for _ in range(traj.molecules):
        residue = top.addResidue("HOH", chain)
        o = top.addAtom("O", app.element.oxygen, residue)
        for name in ("H1", "H2"):
            top.addBond(o, top.addAtom(name, app.element.hydrogen, residue))
    forcefield = app.ForceField(model.forcefield)
    if not traj.periodic:
        return forcefield.createSystem(top, nonbondedMethod=app.NoCutoff, rigidWater=False, constraints=None)
    side = box_side(traj.molecules, traj.density_g_cm3)
    top.setPeriodicBoxVectors(np.eye(3) * side / ANGSTROM_PER_NM * unit.nanometer)
    cutoff = min(MAX_CUTOFF, 0.49 * side) / ANGSTROM_PER_NM
    return forcefield.createSystem(top, nonbondedMethod=app.PME, nonbondedCutoff=cutoff * unit.nanometer,
                                   rigidWater=False, constraints=None)


def iter_frames(cfg: CorpusConfig, traj: Trajectory) -> Iterator[Frame]:
    model = get_model(traj.model)
    integrator = mm.LangevinMiddleIntegrator(traj.temperature_k * unit.kelvin, cfg.friction_per_ps / unit.picosecond,
                                             cfg.timestep_fs * unit.femtosecond)
    integrator.setRandomNumberSeed(traj.md_seed + 1)
    context = mm.Context(build_system(traj, model), integrator, mm.Platform.getPlatformByName("CPU"),
                         {"DeterministicForces": "true", "Threads": str(CPU_THREADS)})
    context.setPositions(initial_positions(traj, model) / ANGSTROM_PER_NM)
    mm.LocalEnergyMinimizer.minimize(context, 1.0, 1000)
    context.setVelocitiesToTemperature(traj.temperature_k * unit.kelvin, traj.md_seed + 1)
    if cfg.equilibration_steps:
        integrator.step(cfg.equilibration_steps)
    species = np.tile(np.array(WATER_SPECIES, dtype=np.int64), traj.molecules)
    side = box_side(traj.molecules, traj.density_g_cm3)
    cell = np.eye(3) * side if traj.periodic else np.zeros((3, 3))
    info = {"model": traj.model, "temperature_k": traj.temperature_k, "density_g_cm3": traj.density_g_cm3,
            "md_seed": traj.md_seed}
    for index in range(cfg.frames_per_trajectory):
        integrator.step(cfg.steps_between_frames)
        energy, forces, positions = evaluate(context, traj.periodic)
        step = cfg.equilibration_steps + (index + 1) * cfg.steps_between_frames
        yield Frame(species=species.copy(), positions=positions, cell=cell.copy(),
                    pbc=np.full(3, traj.periodic, dtype=bool), energy=energy, forces=forces,
                    source=Path(traj.file_name).stem, index=index,
                    info={**info, "time_ps": round(step * cfg.timestep_fs * 1e-3, 9)})


def run_trajectory(cfg: CorpusConfig, traj: Trajectory, out_dir: str) -> dict:
    """Simulate `traj` and write OUT_DIR/traj-NNNNNN.extxyz atomically; returns its summary (the Ray task)."""
    final = Path(out_dir) / traj.file_name
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    started = time.perf_counter()
    frames = 0
    try:
        with open(tmp, "w") as fh:
            for frame in iter_frames(cfg, traj):
                write_xyz(fh, [frame_to_atoms(frame)])
                frames += 1
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    seconds = time.perf_counter() - started
    return {"index": traj.index, "file": final.name, "frames": frames, "atoms": 3 * traj.molecules,
            "seconds": seconds, "model": traj.model}
