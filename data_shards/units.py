"""Input units for `shards build --units`, and a plausibility check that catches frames read in the wrong units.

Every frame is stored in Å / eV / eV/Å. `--units bohr_hartree` converts Bohr / Hartree / Hartree/Bohr inputs
(the npz and n2p2 readers convert themselves; other formats are scaled here). Without `--units` each format
keeps its own default (Å / eV, except n2p2 and the npz "gamd" layout: Bohr / Hartree).

Plausibility after conversion, per frame:
- force RMS over the frame's atoms must be at most MAX_FORCE_RMS eV/Å (forces in kcal/mol/Å are 23× and in
  meV/Å 1000× too large when read as eV/Å);
- |energy| must be at most ENERGY_BOUND_FACTOR × the Thomas-Fermi total energy of the frame's neutral atoms,
  0.7687 Z^(7/3) Hartree each: a bound on the all-electron energy of any element, so total energies in kcal/mol,
  kJ/mol or meV (or eV files read as Hartree) fail it while eV energies of any DFT code pass.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from data_shards.frame import Frame, FrameError

BOHR_TO_ANGSTROM = 0.529177210903
HARTREE_TO_EV = 27.211386245988
UNITS = {"angstrom_ev": (1.0, 1.0), "bohr_hartree": (BOHR_TO_ANGSTROM, HARTREE_TO_EV)}  # (length, energy)
READER_UNITS = {"npz", "n2p2"}                     # formats whose reader takes a `units` option
FORMAT_DEFAULT = {"n2p2": "bohr_hartree"}          # formats not in Å / eV by default
MAX_FORCE_RMS = 100.0                              # eV/Å
THOMAS_FERMI_HARTREE = 0.7687                      # E_TF(Z) = -0.7687 Z^(7/3) Hartree for a neutral atom
ENERGY_BOUND_FACTOR = 1.5


def check_units_name(units: str | None) -> None:
    if units is not None and units not in UNITS:
        raise ValueError(f"unknown units {units!r}; valid units: {sorted(UNITS)}")


def reader_options(fmt: str, units: str | None) -> dict:
    """Keyword options for readers.iter_frames: the units go to readers that convert themselves."""
    return {"units": units} if units is not None and fmt in READER_UNITS else {}


def convert(frame: Frame, fmt: str, units: str | None) -> Frame:
    """Scale a frame of a format whose reader knows no units into Å / eV / eV/Å."""
    if units is None or fmt in READER_UNITS or units == "angstrom_ev":
        return frame
    length, energy = UNITS[units]
    return dataclasses.replace(
        frame, positions=frame.positions * length, cell=frame.cell * length,
        energy=None if frame.energy is None else frame.energy * energy,
        forces=None if frame.forces is None else frame.forces * (energy / length))


def declared_units(fmt: str, units: str | None) -> str:
    """The units a frame was read in: --units, else the format's default (npz: its layout's, shown as such)."""
    if units is not None:
        return units
    return FORMAT_DEFAULT.get(fmt, "the npz layout's default" if fmt == "npz" else "angstrom_ev")


def energy_bound(species: np.ndarray) -> float:
    """eV: ENERGY_BOUND_FACTOR × Σ Thomas-Fermi energies of the neutral atoms."""
    z = np.asarray(species, dtype=np.float64)
    return ENERGY_BOUND_FACTOR * THOMAS_FERMI_HARTREE * HARTREE_TO_EV * float(np.sum(z ** (7.0 / 3.0)))


def _hint(declared: str) -> str:
    other = [u for u in UNITS if u != declared]
    suggestion = f"did you mean --units {other[0]}?" if declared in UNITS else f"pass --units ({sorted(UNITS)})"
    return (f"read as {declared}; {suggestion} Files in kcal/mol, kJ/mol or meV must be converted to eV first "
            f"(valid --units: {sorted(UNITS)})")


def check_plausible(frame: Frame, declared: str) -> Frame:
    """Raise FrameError (source, frame, field) when the converted labels are implausible for Å / eV / eV/Å."""
    if frame.forces is not None:
        rms = float(np.sqrt(np.mean(np.asarray(frame.forces, dtype=np.float64) ** 2)))
        if rms > MAX_FORCE_RMS:
            raise FrameError(frame.source, frame.index, "forces",
                             f"force RMS {rms:.4g} eV/Å over the frame exceeds {MAX_FORCE_RMS:g} eV/Å: wrong units? "
                             + _hint(declared))
    if frame.energy is not None:
        bound = energy_bound(frame.species)
        if abs(frame.energy) > bound:
            raise FrameError(frame.source, frame.index, "energy",
                             f"|energy| {abs(frame.energy):.6g} eV ({frame.energy / frame.natoms:.6g} eV/atom) exceeds "
                             f"{bound:.6g} eV, more than the all-electron energy of these {frame.natoms} atoms: "
                             f"wrong units? " + _hint(declared))
    return frame
