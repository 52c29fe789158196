"""ASE calculator over a maskpot model: energy, forces and per-atom energies of one structure.

`MaskpotCalculator(EXPORT_DIR)` (or a model object) builds the radius graph with the same code as the
training loader (`data_shards.graph.sample_to_data` + `collate`), so the calculator sees exactly what the
model saw in training. Non-periodic Atoms get a zero cell. With `skin > 0` the neighbour list is built with
cutoff + skin and reused while no atom has moved more than skin/2 since the build (cell, pbc and species
unchanged); every call keeps only the pairs whose current distance is below the cutoff, so results equal
a fresh build. Stress is not implemented.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import (
    Calculator,
    PropertyNotImplementedError,
    all_changes,
)

from data_shards import keys as K
from data_shards.graph import collate, sample_to_data
from pretrain.export import load_export

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class CalculatorConfig:
    dtype: str = "float64"      # model and positions precision; float64 for energy-conserving MD
    skin: float = 0.0           # Å; 0 rebuilds the neighbour list at every call
    device: str = "cpu"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"calculator dtype {self.dtype!r} is not valid; valid: {sorted(DTYPES)}")
        if not self.skin >= 0:
            raise ValueError(f"calculator skin must be >= 0 Å, got {self.skin!r}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"calculator device {self.device!r} is not valid; valid: 'cpu', 'cuda', 'cuda:N'")


class PerAtomEnergyProbe:
    """Per-atom energies e_i = energy_scale · head(h_i) + E0[Z_i] via a forward hook on `model.energy_head`.

    The model contract returns only structure energies; this reads the head's output during the same
    forward pass instead of changing the model. Available when the model has `energy_head`, `energy_scale`
    and `e0` (the EGNN does).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.head_output: torch.Tensor | None = None
        self.available = all(hasattr(model, name) for name in ("energy_head", "energy_scale", "e0"))
        if self.available:
            model.energy_head.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.head_output = output.detach()

    def energies(self, species: torch.Tensor) -> np.ndarray:
        assert self.head_output is not None, "per-atom energies read before a forward pass"
        atom = self.head_output.squeeze(-1).double() * self.model.energy_scale.double()
        return (atom + self.model.e0.index_select(0, species)).cpu().numpy()


class MaskpotCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces", "energies"]

    def __init__(self, model: str | Path | torch.nn.Module, dtype: str = "float64", skin: float = 0.0,
                 device: str = "cpu", cutoff: float | None = None, **kwargs):
        """`model`: an export folder (`pretrain.export`) or a model; a model object is copied, not changed.

        `cutoff` (Å) is needed for a model object without `config.cutoff`; an export's cutoff always wins.
        """
        super().__init__(**kwargs)
        self.config = CalculatorConfig(dtype, float(skin), device)
        if isinstance(model, (str, Path)):
            model, meta = load_export(model)
            self.meta, self.cutoff = meta, float(meta["cutoff"])
        else:
            model = copy.deepcopy(model)
            self.meta = None
            self.cutoff = float(cutoff if cutoff is not None else getattr(getattr(model, "config", None),
                                                                             "cutoff", 0.0))
            if not self.cutoff > 0:
                raise ValueError("a model object without config.cutoff needs cutoff=… (Å)")
        self.dtype = DTYPES[self.config.dtype]
        self.device = torch.device(self.config.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.probe = PerAtomEnergyProbe(self.model)
        if not self.probe.available:
            self.implemented_properties = ["energy", "free_energy", "forces"]
        self.neighbour_builds = 0           # how often the list was (re)built; for tests and logs
        self._graph = None                  # Data with the cutoff + skin list, and what it was built for
        self._built_for: tuple | None = None

    def _needs_rebuild(self, positions: np.ndarray, numbers: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> bool:
        if self._graph is None or self.config.skin == 0:
            return True
        ref_positions, ref_numbers, ref_cell, ref_pbc = self._built_for
        if not (np.array_equal(numbers, ref_numbers) and np.array_equal(cell, ref_cell)
                and np.array_equal(pbc, ref_pbc)):
            return True
        moved = np.sqrt(((positions - ref_positions) ** 2).sum(-1)).max()
        return bool(moved >= 0.5 * self.config.skin)

    def graph(self, positions: np.ndarray, numbers: np.ndarray, cell: np.ndarray, pbc: np.ndarray):
        """Batch of one structure at `positions`, edges exactly those with distance < cutoff."""
        if self._needs_rebuild(positions, numbers, cell, pbc):
            sample = {K.SPECIES: numbers, K.POSITIONS: positions, K.CELL: cell, K.PBC: pbc}
            self._graph = sample_to_data(sample, self.cutoff + self.config.skin, self.dtype)
            self._built_for = (positions.copy(), numbers.copy(), cell.copy(), pbc.copy())
            self.neighbour_builds += 1
        data = self._graph.clone()
        data[K.POSITIONS] = torch.as_tensor(positions, dtype=self.dtype)
        if self.config.skin > 0:
            src, dst = data[K.EDGE_INDEX]
            pos = data[K.POSITIONS]
            length = (pos[dst] - pos[src] + data[K.SHIFT_VECTORS]).norm(dim=-1)
            keep = length < self.cutoff
            data[K.EDGE_INDEX] = data[K.EDGE_INDEX][:, keep]
            data[K.SHIFT_VECTORS] = data[K.SHIFT_VECTORS][keep]
        return collate([data]).to(self.device)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if "stress" in properties:
            raise PropertyNotImplementedError("MaskpotCalculator does not compute stress")
        if "energies" in properties and not self.probe.available:
            raise PropertyNotImplementedError(f"{type(self.model).__name__} exposes no per-atom energies "
                                              f"(needs energy_head, energy_scale and e0)")
        atoms = self.atoms
        pbc = np.asarray(atoms.pbc, dtype=bool)
        cell = np.asarray(atoms.cell.array, dtype=np.float64) if pbc.any() else np.zeros((3, 3))
        numbers = np.asarray(atoms.numbers, dtype=np.int64)
        batch = self.graph(np.asarray(atoms.positions, dtype=np.float64), numbers, cell, pbc)
        with torch.no_grad():
            out = self.model(batch, compute_forces=True)
        energy = float(out[K.PRED_ENERGY].sum())
        forces = out[K.PRED_FORCES].double().cpu().numpy()
        if not (np.isfinite(energy) and np.isfinite(forces).all()):
            raise FloatingPointError(f"the model gave a non-finite energy or forces for {atoms.get_chemical_formula()}"
                                     f" (energy {energy})")
        self.results = {"energy": energy, "free_energy": energy, "forces": forces}
        if self.probe.available:
            self.results["energies"] = self.probe.energies(batch[K.SPECIES])
