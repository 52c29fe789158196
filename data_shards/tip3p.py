"""Flexible TIP3P water corpus with OpenMM: N molecules in a periodic cube → one labelled extxyz file.

Molecules are built in O,H,H order on a jittered cubic lattice with random orientations, the box side
set by the density. OpenMM's `tip3p.xml` with rigidWater=False and no constraints (harmonic O-H bonds and
H-O-H angle), PME, Langevin thermostat. After energy minimisation and equilibration a frame is recorded
every `steps_between_frames` steps. Units out: Å, eV, eV/Å.

Determinism: the integrator and the initial velocities are seeded from `seed`, and the CPU platform runs
with DeterministicForces on ONE thread: with 2 threads even DeterministicForces gave different forces,
minimised structures and trajectories run to run (measured, OpenMM 8.6.1). One thread costs little on this
2-core machine (64 H2O: ~12-22 frames/s at 100 steps/frame vs ~20 with 2 threads). Same config and
machine → byte-identical file.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import openmm as mm
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io.extxyz import write_xyz
from openmm import app, unit

from data_shards.frame import Frame
from data_shards.progress import progress as progress_bar

AVOGADRO = 6.02214076e23          # 1/mol, exact (SI 2019)
ELEMENTARY_CHARGE = 1.602176634e-19  # C, exact (SI 2019)
EV_PER_KJ_PER_MOL = 1000.0 / (AVOGADRO * ELEMENTARY_CHARGE)   # 1 / 96.48533212...
ANGSTROM_PER_NM = 10.0
EV_PER_ANGSTROM_PER_KJ_PER_MOL_NM = EV_PER_KJ_PER_MOL / ANGSTROM_PER_NM

WATER_MOLAR_MASS = 15.999 + 2 * 1.008   # g/mol, IUPAC standard atomic weights
OH_BOND = 0.9572                        # Å, TIP3P
HOH_ANGLE = math.radians(104.52)        # TIP3P
WATER_SPECIES = (8, 1, 1)
MAX_CUTOFF = 9.0                        # Å; shrunk to just under half the box for small boxes
PLATFORMS = ("CPU", "Reference")
CPU_THREADS = 1                         # one thread: with more, PME sums differ run to run (measured)
MAX_SEED = 2**31 - 3                    # OpenMM seeds are int32 and 0 means "random"; we pass seed + 1


@dataclass(frozen=True)
class TIP3PConfig:
    n_molecules: int = 64
    n_frames: int = 100
    seed: int = 0
    temperature: float = 300.0          # K
    timestep_fs: float = 0.5
    steps_between_frames: int = 100
    equilibration_steps: int = 2000
    density_g_cm3: float = 1.0
    friction_per_ps: float = 1.0
    cutoff_angstrom: float | None = None  # None: min(9 Å, 0.49 × box side)
    platform: str = "CPU"

    def __post_init__(self):
        for name in ("n_molecules", "n_frames", "steps_between_frames"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.equilibration_steps, int) or self.equilibration_steps < 0:
            raise ValueError(f"equilibration_steps must be an integer >= 0, got {self.equilibration_steps!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in 0..{MAX_SEED}, got {self.seed!r}")
        for name in ("temperature", "timestep_fs", "density_g_cm3", "friction_per_ps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.platform not in PLATFORMS:
            raise ValueError(f"platform must be one of {list(PLATFORMS)}, got {self.platform!r}")
        if self.cutoff_angstrom is not None and not 0 < self.cutoff_angstrom < 0.5 * self.box_angstrom:
            raise ValueError(f"cutoff_angstrom must be in (0, half the box = {0.5 * self.box_angstrom:.3f} Å), "
                             f"got {self.cutoff_angstrom!r}")

    @property
    def box_angstrom(self) -> float:
        volume_cm3 = self.n_molecules * WATER_MOLAR_MASS / AVOGADRO / self.density_g_cm3
        return (volume_cm3 * 1e24) ** (1.0 / 3.0)

    @property
    def cutoff(self) -> float:
        return self.cutoff_angstrom if self.cutoff_angstrom is not None else min(MAX_CUTOFF, 0.49 * self.box_angstrom)

    @property
    def file_name(self) -> str:
        return f"tip3p_{self.n_molecules}w_seed{self.seed}.extxyz"


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def initial_positions(cfg: TIP3PConfig) -> np.ndarray:
    """(3N, 3) Å, O,H,H per molecule: random sites of a cubic lattice, jittered, randomly oriented."""
    rng = np.random.default_rng(cfg.seed)
    per_side = math.ceil(round(cfg.n_molecules ** (1.0 / 3.0), 9))
    spacing = cfg.box_angstrom / per_side
    grid = np.stack(np.meshgrid(*[np.arange(per_side)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    sites = grid[np.sort(rng.choice(len(grid), cfg.n_molecules, replace=False))]
    oxygens = (sites + 0.5) * spacing + rng.uniform(-0.1, 0.1, size=sites.shape) * spacing
    half = HOH_ANGLE / 2
    local = np.array([[0.0, 0.0, 0.0],
                      [OH_BOND * math.sin(half), OH_BOND * math.cos(half), 0.0],
                      [-OH_BOND * math.sin(half), OH_BOND * math.cos(half), 0.0]])
    molecules = [o + local @ random_rotation(rng).T for o in oxygens]
    return np.concatenate(molecules, axis=0)


def build_system(cfg: TIP3PConfig) -> tuple[app.Topology, mm.System]:
    top = app.Topology()
    chain = top.addChain()
    for _ in range(cfg.n_molecules):
        residue = top.addResidue("HOH", chain)
        o = top.addAtom("O", app.element.oxygen, residue)
        h1 = top.addAtom("H1", app.element.hydrogen, residue)
        h2 = top.addAtom("H2", app.element.hydrogen, residue)
        top.addBond(o, h1)
        top.addBond(o, h2)
    side_nm = cfg.box_angstrom / ANGSTROM_PER_NM
    top.setPeriodicBoxVectors(np.eye(3) * side_nm * unit.nanometer)
    system = app.ForceField("tip3p.xml").createSystem(
        top, nonbondedMethod=app.PME, nonbondedCutoff=cfg.cutoff / ANGSTROM_PER_NM * unit.nanometer,
        rigidWater=False, constraints=None)
    return top, system


def make_context(cfg: TIP3PConfig, positions: np.ndarray, platform: str | None = None) -> mm.Context:
    """An OpenMM context at `positions` (Å) with the seeded Langevin integrator."""
    _, system = build_system(cfg)
    integrator = mm.LangevinMiddleIntegrator(cfg.temperature * unit.kelvin, cfg.friction_per_ps / unit.picosecond,
                                             cfg.timestep_fs * unit.femtosecond)
    integrator.setRandomNumberSeed(cfg.seed + 1)
    name = platform or cfg.platform
    properties = {"DeterministicForces": "true", "Threads": str(CPU_THREADS)} if name == "CPU" else {}
    context = mm.Context(system, integrator, mm.Platform.getPlatformByName(name), properties)
    context.setPositions(np.asarray(positions, dtype=np.float64) / ANGSTROM_PER_NM)
    return context


def evaluate(context: mm.Context, periodic: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """(energy eV, forces (n,3) eV/Å, positions (n,3) Å; molecules wrapped whole into the box when periodic)."""
    state = context.getState(getEnergy=True, getForces=True, getPositions=True, enforcePeriodicBox=periodic)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) * EV_PER_KJ_PER_MOL
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    return (float(energy), np.asarray(forces, dtype=np.float64) * EV_PER_ANGSTROM_PER_KJ_PER_MOL_NM,
            np.asarray(positions, dtype=np.float64) * ANGSTROM_PER_NM)


def iter_tip3p_frames(cfg: TIP3PConfig, progress: bool = True) -> Iterator[Frame]:
    """Minimise, equilibrate, then yield `n_frames` labelled frames `steps_between_frames` steps apart."""
    context = make_context(cfg, initial_positions(cfg))
    mm.LocalEnergyMinimizer.minimize(context, 1.0, 1000)
    context.setVelocitiesToTemperature(cfg.temperature * unit.kelvin, cfg.seed + 1)
    integrator = context.getIntegrator()
    if cfg.equilibration_steps:
        integrator.step(cfg.equilibration_steps)
    species = np.tile(np.array(WATER_SPECIES, dtype=np.int64), cfg.n_molecules)
    cell = np.eye(3) * cfg.box_angstrom
    source = Path(cfg.file_name).stem
    disable = not progress or os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")
    with progress_bar(total=cfg.n_frames, desc=f"TIP3P {cfg.n_molecules} H2O", unit="frame",
                      disable=disable) as bar:
        for index in range(cfg.n_frames):
            integrator.step(cfg.steps_between_frames)
            energy, forces, positions = evaluate(context)
            step = cfg.equilibration_steps + (index + 1) * cfg.steps_between_frames
            yield Frame(species=species.copy(), positions=positions, cell=cell.copy(), pbc=np.ones(3, dtype=bool),
                        energy=energy, forces=forces, source=source, index=index,
                        info={"seed": cfg.seed, "time_ps": round(step * cfg.timestep_fs * 1e-3, 9)})
            bar.update(1)


def tip3p_frames(progress: bool = False, **config) -> list[Frame]:
    """In-memory frames for `TIP3PConfig(**config)`."""
    return list(iter_tip3p_frames(TIP3PConfig(**config), progress=progress))


def frame_to_atoms(frame: Frame):
    atoms = Atoms(numbers=frame.species, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
    atoms.info.update(frame.info)
    atoms.calc = SinglePointCalculator(atoms, energy=frame.energy, forces=frame.forces)
    return atoms


def write_extxyz(frames, path) -> Path:
    """Write frames to `path` atomically (tmp file + rename), one frame in memory at a time."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        for frame in frames:
            write_xyz(fh, [frame_to_atoms(frame)])
    os.replace(tmp, path)
    return path


def generate_tip3p(out_dir, n_molecules: int = 64, n_frames: int = 100, seed: int = 0, temperature: float = 300.0,
                   timestep_fs: float = 0.5, steps_between_frames: int = 100, equilibration_steps: int = 2000,
                   density_g_cm3: float = 1.0, friction_per_ps: float = 1.0, progress: bool = True,
                   **options) -> Path:
    """Simulate and write `out_dir/tip3p_{n_molecules}w_seed{seed}.extxyz`; returns its path.

    `options`: further TIP3PConfig fields (cutoff_angstrom, platform).
    """
    cfg = TIP3PConfig(n_molecules=n_molecules, n_frames=n_frames, seed=seed, temperature=temperature,
                      timestep_fs=timestep_fs, steps_between_frames=steps_between_frames,
                      equilibration_steps=equilibration_steps, density_g_cm3=density_g_cm3,
                      friction_per_ps=friction_per_ps, **options)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_extxyz(iter_tip3p_frames(cfg, progress=progress), out_dir / cfg.file_name)
