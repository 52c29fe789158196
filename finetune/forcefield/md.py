"""`maskpot md MODEL STRUCTURE`: molecular dynamics with an exported model (ASE Langevin, NVE Verlet, or
NPT with the isotropic Martyna–Tobias–Klein barostat and Nosé–Hoover chains).

Writes the trajectory (extxyz, energies and forces per frame), a log next to it (`<out>.log`: step, time,
potential / kinetic / total energy, temperature, volume, density) and, with `--rdf`, the O–O radial
distribution function of the trajectory (`<out>_rdf_oo.png` + `.csv`). Units: fs, K, eV, Å, bar, g/cm³.
Safety checks (runaway temperature, overlapping atoms, NVE energy drift) warn, then stop the run:
finetune.forcefield.md_guards.

NPT: ASE 3.29's `IsotropicMTKNPT`, not `NPTBerendsen` or `NPT`. Berendsen's weak coupling relaxes the
volume but does not sample the isothermal–isobaric ensemble (volume fluctuations are wrong, so is any
compressibility read from them); ase.md.npt.NPT (Melchionna) is documented as unstable for small cells and
needs an upper-triangular cell. MTK generates the NPT ensemble with a time-reversible integrator; isotropic
cell fluctuations suit a liquid. The barostat reads the stress, which the calculator takes from the
strain derivative of the energy (energy-centric models only).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data_shards.progress import progress
from finetune.forcefield import md_guards
from finetune.forcefield.md_guards import MDGuards, MDUnstable

if TYPE_CHECKING:
    from ase import Atoms

    from finetune.forcefield.calculator import MaskpotCalculator

# ase, matplotlib and the calculator (torch) are imported where used: `maskpot --help` stays fast

ENSEMBLES = ("langevin", "nve", "npt")
OXYGEN = 8
EXIT_UNSTABLE = 3   # a safety check stopped the run (user errors exit 2)
LOG_COLUMNS = ("step", "time_fs", "epot_eV", "ekin_eV", "etot_eV", "temperature_K", "volume_A3", "density_g_cm3")
GRAMS_PER_AMU_CM3_PER_A3 = 1.66053906660  # 1 amu/Å³ = 1.6605 g/cm³


@dataclass
class MDConfig:
    steps: int
    temperature: float = 300.0      # K, initial velocities and Langevin bath
    timestep: float = 0.5           # fs
    ensemble: str = "langevin"
    friction: float = 1.0           # 1/ps, Langevin only
    every: int = 10                 # write a frame (and a log line) every N steps
    seed: int = 0
    skin: float = 0.5               # Å, neighbour-list skin of the calculator
    dtype: str = "float64"
    pressure: float = 1.01325       # bar, NPT only
    tdamp: float = 100.0            # fs, NPT thermostat time scale (ASE suggests ~100 time steps)
    pdamp: float = 1000.0           # fs, NPT barostat time scale (ASE suggests ~1000 time steps)

    def __post_init__(self):
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"--ensemble {self.ensemble!r} is not valid; valid: {list(ENSEMBLES)}")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"--steps must be a positive integer, got {self.steps!r}")
        if not (isinstance(self.every, int) and self.every >= 1):
            raise ValueError(f"--every must be a positive integer, got {self.every!r}")
        for name in ("timestep", "friction", "tdamp", "pdamp"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)!r}")
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0 K, got {self.temperature!r}")


def load_structure(path, fmt: str | None = None, index: int = 0) -> Atoms:
    """Frame `index` of anything the readers understand (extxyz, DeePMD, …) as ASE Atoms."""
    from ase import Atoms  # startup: ase

    from data_shards.readers import count_frames, iter_frames  # startup: ase

    total = count_frames(path, fmt)
    if not 0 <= index < total:
        raise ValueError(f"{path}: frame {index} requested, it has {total} frames")
    (item,) = list(iter_frames(path, fmt, start=index, stop=index + 1))
    if isinstance(item, Exception):
        raise item
    frame = item.validate(require_labels=False)
    return Atoms(numbers=frame.species, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)


def density_g_cm3(atoms: Atoms) -> float:
    """Mass density of a periodic box in g/cm³ (NaN without a cell volume)."""
    volume = abs(float(np.linalg.det(atoms.cell.array)))
    return float(atoms.get_masses().sum()) * GRAMS_PER_AMU_CM3_PER_A3 / volume if volume > 0 else float("nan")


def make_dynamics(atoms: Atoms, calc: MaskpotCalculator, cfg: MDConfig, rng: np.random.Generator):
    """The ASE integrator of `cfg.ensemble`; NPT is refused for force-centric models and non-3D-periodic cells."""
    from ase import units  # startup: ase
    from ase.md.langevin import Langevin  # startup: ase
    from ase.md.nose_hoover_chain import IsotropicMTKNPT  # startup: ase
    from ase.md.verlet import VelocityVerlet  # startup: ase

    dt = cfg.timestep * units.fs
    if cfg.ensemble == "langevin":
        return Langevin(atoms, dt, temperature_K=cfg.temperature, friction=cfg.friction / (1000 * units.fs),
                        fixcm=False, rng=rng)
    if cfg.ensemble == "nve":
        return VelocityVerlet(atoms, dt)
    if "stress" not in calc.implemented_properties:
        raise ValueError(f"--ensemble npt needs the stress, which {type(calc.model).__name__} (force-centric) "
                         f"does not have; use an energy-centric model (egnn, mace) or --ensemble langevin")
    if not atoms.pbc.all():
        raise ValueError(f"--ensemble npt needs a structure periodic in 3D, got pbc={atoms.pbc.tolist()}")
    return IsotropicMTKNPT(atoms, dt, temperature_K=cfg.temperature, pressure_au=cfg.pressure * units.bar,
                           tdamp=cfg.tdamp * units.fs, pdamp=cfg.pdamp * units.fs)


def run_md(atoms: Atoms, calc: MaskpotCalculator, cfg: MDConfig, out: str | Path,
           guards: MDGuards | None = None) -> dict:
    """Integrate `cfg.steps` steps from `atoms` (changed in place); returns timings and energy figures.
    `guards` (default: MDGuards() with its default limits) raise MDUnstable when the run goes wrong."""
    guards = MDGuards() if guards is None else guards
    from ase.io import write  # startup: ase
    from ase.md.velocitydistribution import Stationary, thermalize_momenta  # startup: ase


    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log")
    atoms.calc = calc
    rng = np.random.default_rng(cfg.seed)
    thermalize_momenta(atoms, temperature_K=cfg.temperature, rng=rng)
    Stationary(atoms)
    dyn = make_dynamics(atoms, calc, cfg, rng)
    rows: list[tuple] = []

    def record() -> None:
        epot, ekin = atoms.get_potential_energy(), atoms.get_kinetic_energy()
        if not np.isfinite(epot):
            raise FloatingPointError(f"non-finite potential energy at step {dyn.nsteps}")
        step = dyn.nsteps
        rows.append((step, step * cfg.timestep, epot, ekin, epot + ekin, atoms.get_temperature(),
                     abs(float(np.linalg.det(atoms.cell.array))), density_g_cm3(atoms)))
        write(out, atoms, format="extxyz", append=step > 0)
        log.write(" ".join(f"{v:.8g}" if isinstance(v, float) else str(v) for v in rows[-1]) + "\n")
        log.flush()
        guards.check(atoms, step, cfg.temperature, rows[-1][4], rows[0][4], nve=cfg.ensemble == "nve")

    with open(log_path, "w") as log:
        log.write("# " + " ".join(LOG_COLUMNS) + "\n")
        record()
        bar = progress(total=cfg.steps, desc=f"md {cfg.ensemble}", unit="step")
        started = time.perf_counter()
        try:
            for done in range(0, cfg.steps, cfg.every):
                chunk = min(cfg.every, cfg.steps - done)
                dyn.run(chunk)
                record()
                bar.update(chunk)
                bar.set_postfix(T=f"{rows[-1][5]:.0f} K", Etot=f"{rows[-1][4]:.3f} eV")
        finally:
            bar.close()
        seconds = time.perf_counter() - started
    etot = np.array([r[4] for r in rows])
    density = np.array([r[7] for r in rows])
    return {"initial_density_g_cm3": float(density[0]), "final_density_g_cm3": float(density[-1]),
            "mean_density_second_half_g_cm3": float(density[len(density) // 2:].mean()),
            "steps": cfg.steps, "seconds": seconds, "steps_per_second": cfg.steps / seconds,
            "atoms": len(atoms), "trajectory": str(out), "log": str(log_path),
            "max_abs_etot_change_eV": float(np.abs(etot - etot[0]).max()),
            "final_temperature_K": rows[-1][5], "neighbour_builds": calc.neighbour_builds,
            "frames_written": len(rows)}


def read_log(path) -> np.ndarray:
    """The md log as a structured array with LOG_COLUMNS fields."""
    return np.genfromtxt(path, names=list(LOG_COLUMNS), comments="#")


def rdf_oo(trajectory, r_max: float, bins: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """O–O g(r) averaged over the frames of a periodic trajectory (list of Atoms or an extxyz path).

    Returns (bin centres in Å, g). r_max must not exceed half the smallest perpendicular box width.
    """
    from ase.geometry import get_distances  # startup: ase
    from ase.io import read  # startup: ase

    frames = read(trajectory, index=":") if isinstance(trajectory, (str, Path)) else list(trajectory)
    if not frames:
        raise ValueError("rdf_oo: the trajectory has no frames")
    if bins < 1 or not r_max > 0:
        raise ValueError(f"rdf_oo: need bins >= 1 and r_max > 0, got bins={bins}, r_max={r_max}")
    edges = np.linspace(0.0, r_max, bins + 1)
    counts = np.zeros(bins)
    density_sum = 0.0
    for index, atoms in enumerate(frames):
        if not atoms.pbc.all():
            raise ValueError(f"rdf_oo: frame {index} is not periodic in 3D (pbc={atoms.pbc.tolist()}); "
                             f"g(r) needs a box volume")
        volume = atoms.get_volume()
        widths = volume / np.linalg.norm(np.cross(atoms.cell[[1, 2, 0]], atoms.cell[[2, 0, 1]]), axis=1)
        if r_max > 0.5 * widths.min() + 1e-9:
            raise ValueError(f"rdf_oo: r_max {r_max} Å exceeds half the box width ({0.5 * widths.min():.3f} Å)")
        oxygen = atoms.positions[atoms.numbers == OXYGEN]
        n = len(oxygen)
        if n < 2:
            raise ValueError(f"rdf_oo: frame {index} has {n} oxygen atoms; need at least 2")
        _, dist = get_distances(oxygen, cell=atoms.cell, pbc=atoms.pbc)
        pairs = dist[np.triu_indices(n, k=1)]
        counts += 2 * np.histogram(pairs, bins=edges)[0]     # each pair counted for both oxygens
        density_sum += n * (n - 1) / volume                   # N · ρ with ρ = (N − 1)/V
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    return 0.5 * (edges[1:] + edges[:-1]), counts / (shell * density_sum)


def plot_rdf(r: np.ndarray, g: np.ndarray, path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # startup: matplotlib
    from matplotlib.figure import Figure  # startup: matplotlib

    path = Path(path)
    fig = Figure(figsize=(5, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(r, g, lw=1.2)
    ax.axhline(1.0, color="grey", lw=0.6, ls=":")
    ax.set(xlabel="r (Å)", ylabel="g_OO(r)", title="O–O radial distribution function")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "md", help="molecular dynamics with an exported model (ASE Langevin, NVE or MTK NPT), trajectory + log + RDF",
        description="Run MD from frame --frame of STRUCTURE (extxyz, DeePMD, …) with an export folder. Writes "
                    "--out (extxyz), <out>.log and with --rdf <out>_rdf_oo.png/.csv.")
    p.add_argument("model", metavar="MODEL", help="export folder (model.json + model.safetensors)")
    p.add_argument("structure", metavar="STRUCTURE", help="starting structure: a file/folder a reader understands")
    p.add_argument("--format", default=None, help="reader name (default: detected)")
    p.add_argument("--frame", type=int, default=0, help="frame of STRUCTURE to start from (default 0)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--temperature", type=float, required=True, help="K")
    p.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
    p.add_argument("--ensemble", default="langevin", help=f"one of {list(ENSEMBLES)} (default langevin)")
    p.add_argument("--friction", type=float, default=1.0, help="Langevin friction, 1/ps (default 1)")
    p.add_argument("--pressure", type=float, default=1.01325, help="NPT pressure, bar (default 1 atm)")
    p.add_argument("--tdamp", type=float, default=100.0, help="NPT thermostat time scale, fs (default 100)")
    p.add_argument("--pdamp", type=float, default=1000.0, help="NPT barostat time scale, fs (default 1000)")
    p.add_argument("--out", default="md.extxyz", help="trajectory file (default md.extxyz)")
    p.add_argument("--every", type=int, default=10, help="write a frame every N steps (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skin", type=float, default=0.5, help="neighbour-list skin, Å (default 0.5)")
    p.add_argument("--dtype", default="float64", help="float64 (default) or float32")
    p.add_argument("--device", default="auto", help="auto (cuda when available; default) | cpu | cuda | cuda:N")
    p.add_argument("--rdf", action="store_true", help="also compute and plot the O–O g(r) of the trajectory")
    p.add_argument("--rdf-rmax", type=float, default=None, help="Å (default: 6 Å or half the box)")
    md_guards.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from finetune.forcefield.calculator import MaskpotCalculator, resolve_device  # startup: ase+torch+vesin

    resolve_device(args.device)  # CUDA asked for without CUDA: one line, before any work
    cfg = MDConfig(args.steps, args.temperature, args.timestep, args.ensemble, args.friction, args.every,
                   args.seed, args.skin, args.dtype, args.pressure, args.tdamp, args.pdamp)
    atoms = load_structure(args.structure, args.format, args.frame)
    if args.rdf and not atoms.pbc.all():
        raise ValueError(f"--rdf needs a structure periodic in 3D; {args.structure} has pbc={atoms.pbc.tolist()}")
    guards = md_guards.from_args(args)
    calc = MaskpotCalculator(args.model, dtype=cfg.dtype, skin=cfg.skin, device=args.device)
    try:
        result = run_md(atoms, calc, cfg, args.out, guards)
    except MDUnstable as e:
        print(f"maskpot md: {e} (trajectory so far: {args.out})", file=sys.stderr)
        return EXIT_UNSTABLE
    print(f"{result['steps']} steps of {result['atoms']} atoms in {result['seconds']:.1f} s "
          f"({result['steps_per_second']:.1f} steps/s); final T {result['final_temperature_K']:.0f} K; "
          f"trajectory {result['trajectory']}, log {result['log']}")
    if atoms.pbc.all():
        print(f"density {result['initial_density_g_cm3']:.4f} → {result['final_density_g_cm3']:.4f} g/cm³ "
              f"(mean over the second half {result['mean_density_second_half_g_cm3']:.4f} g/cm³)")
    if args.rdf:
        widths = atoms.get_volume() / np.linalg.norm(np.cross(atoms.cell[[1, 2, 0]], atoms.cell[[2, 0, 1]]), axis=1)
        r_max = args.rdf_rmax or min(6.0, 0.5 * float(widths.min()))
        r, g = rdf_oo(args.out, r_max)
        stem = Path(args.out).with_suffix("")
        np.savetxt(f"{stem}_rdf_oo.csv", np.column_stack([r, g]), delimiter=",", header="r_A,g_OO", comments="")
        print(f"O–O g(r): {plot_rdf(r, g, f'{stem}_rdf_oo.png')} (first peak at {r[np.argmax(g)]:.2f} Å)")
    return 0
