"""ASE calculator over a maskpot model: energy, forces and per-atom energies of one structure.

`MaskpotCalculator(EXPORT_DIR)` (or a model object) builds the radius graph with the same code as the
training loader (`data_shards.graph.sample_to_data` + `collate`), so the calculator sees exactly what the
model saw in training. Non-periodic Atoms get a zero cell. With `skin > 0` the neighbour list is built with
cutoff + skin and reused while no atom has moved more than skin/2 since the build (cell, pbc and species
unchanged); every call keeps only the pairs whose current distance is below the cutoff, so results equal
a fresh build. Stress (eV/Å³, ASE sign and Voigt order) comes from the strain derivative of the energy
(`pretrain.models.strain`) for energy-centric models in a 3D-periodic cell; force-centric models have none.
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
from ase.stress import full_3x3_to_voigt_6_stress
from torch_geometric.data import Data

from data_shards import keys as K
from data_shards.graph import collate, sample_to_data
from pretrain.models.strain import energy_forces_stress

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class CalculatorConfig:
    dtype: str = "float64"      # model and positions precision; float64 for energy-conserving MD
    skin: float = 0.0           # Å; 0 rebuilds the neighbour list at every call
    device: str = "cpu"         # cpu | cuda | cuda:N | auto (cuda when available)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"calculator dtype {self.dtype!r} is not valid; valid: {sorted(DTYPES)}")
        if not self.skin >= 0:
            raise ValueError(f"calculator skin must be >= 0 Å, got {self.skin!r}")
        resolve_device(self.device)


def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' → a torch device; ValueError (one line) for CUDA without CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device {name!r} is not valid; valid: 'auto', 'cpu', 'cuda', 'cuda:N'")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but torch sees no CUDA device; use 'cpu' or 'auto'")
    return torch.device(name)


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
            model.get_submodule("energy_head").register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.head_output = output.detach()

    def energies(self, species: torch.Tensor) -> np.ndarray:
        assert self.head_output is not None, "per-atom energies read before a forward pass"
        atom = self.head_output.squeeze(-1).double() * self.model.get_buffer("energy_scale").double()
        return (atom + self.model.get_buffer("e0").index_select(0, species)).cpu().numpy()


class MaskpotCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces", "energies", "stress"]

    def __init__(self, model: str | Path | torch.nn.Module, dtype: str = "float64", skin: float = 0.0,
                 device: str = "cpu", cutoff: float | None = None, **kwargs):
        """`model`: an export folder (`pretrain.export`) or a model; a model object is copied, not changed.

        `cutoff` (Å) is needed for a model object without `config.cutoff`; an export's cutoff always wins.
        """
        super().__init__(**kwargs)
        self.config = CalculatorConfig(dtype, float(skin), device)
        self.meta: dict | None   # an export's meta.json; None for a model object
        if isinstance(model, (str, Path)):
            from pretrain.export import export_cutoff, load_export  # startup: safetensors+torch

            model, meta = load_export(model)
            self.meta, self.cutoff = meta, export_cutoff(meta)
        else:
            model = copy.deepcopy(model)
            self.meta = None
            self.cutoff = float(cutoff if cutoff is not None else getattr(getattr(model, "config", None),
                                                                             "cutoff", 0.0))
            if not self.cutoff > 0:
                raise ValueError("a model object without config.cutoff needs cutoff=… (Å)")
        self.dtype = DTYPES[self.config.dtype]
        self.device = resolve_device(self.config.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.probe = PerAtomEnergyProbe(self.model)
        self.implemented_properties = [p for p in self.implemented_properties
                                       if (p != "energies" or self.probe.available)
                                       and (p != "stress" or not getattr(self.model, "force_centric", False))]
        self.neighbour_builds = 0           # how often the list was (re)built; for tests and logs
        self._graph: Data | None = None     # Data with the cutoff + skin list, and what it was built for
        self._built_for: tuple | None = None

    def _needs_rebuild(self, positions: np.ndarray, numbers: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> bool:
        if self._graph is None or self.config.skin == 0:
            return True
        assert self._built_for is not None  # set together with self._graph
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
        assert self._graph is not None  # _needs_rebuild is True until a graph is built
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

    def _no_stress(self) -> str:
        return (f"stress needs an energy-centric model (forces = −∂E/∂r, e.g. egnn, mace); "
                f"{type(self.model).__name__} is force-centric: its forces do not derive from its energy")

    def get_property(self, name, atoms=None, allow_calculation=True):
        if name == "stress" and getattr(self.model, "force_centric", False):
            raise PropertyNotImplementedError(self._no_stress())  # ASE's own message names no reason
        return super().get_property(name, atoms, allow_calculation)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        want_stress = "stress" in properties
        if want_stress and getattr(self.model, "force_centric", False):
            raise PropertyNotImplementedError(self._no_stress())
        if "energies" in properties and not self.probe.available:
            raise PropertyNotImplementedError(f"{type(self.model).__name__} exposes no per-atom energies "
                                              f"(needs energy_head, energy_scale and e0)")
        atoms = self.atoms
        pbc = np.asarray(atoms.pbc, dtype=bool)
        cell = np.asarray(atoms.cell.array, dtype=np.float64) if pbc.any() else np.zeros((3, 3))
        numbers = np.asarray(atoms.numbers, dtype=np.int64)
        if want_stress and not pbc.all():
            raise PropertyNotImplementedError(f"stress needs a cell periodic in 3D; these Atoms have "
                                              f"pbc={pbc.tolist()}")
        batch = self.graph(np.asarray(atoms.positions, dtype=np.float64), numbers, cell, pbc)
        if want_stress:
            out = energy_forces_stress(self.model, batch)
        else:
            with torch.no_grad():
                out = self.model(batch, compute_forces=True)
        energy = float(out[K.PRED_ENERGY].sum())
        forces = out[K.PRED_FORCES].double().cpu().numpy()
        if not (np.isfinite(energy) and np.isfinite(forces).all()):
            raise FloatingPointError(f"the model gave a non-finite energy or forces for {atoms.get_chemical_formula()}"
                                     f" (energy {energy})")
        self.results = {"energy": energy, "free_energy": energy, "forces": forces}
        if want_stress:
            stress = out[K.PRED_STRESS][0].detach().double().cpu().numpy()
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)
        if self.probe.available:
            self.results["energies"] = self.probe.energies(batch[K.SPECIES])
