"""What every potential shares: the per-element reference energies E0, the energy scale, the readout.

E = energy_scale · Σ_i e_i + Σ_i E0[Z_i]. Both buffers stay float64 whatever dtype the module is cast
to: absolute DFT energies (~ -3e4 eV) do not survive float32, let alone bf16.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from data_shards import keys as K

DOUBLE_BUFFERS = ("energy_scale", "e0")


class ReferenceEnergyModel(nn.Module):
    force_centric = False  # True: forces are a decoder output, not −∂E/∂x
    # parameter-name prefixes of the energy/force output heads (the rest is the backbone); finetuning
    # freezes, re-initialises or gives another learning rate to either part
    head_parameter_prefixes: tuple[str, ...] = ()

    def is_head_parameter(self, name: str) -> bool:
        return name.startswith(self.head_parameter_prefixes) if self.head_parameter_prefixes else False

    def __init__(self):
        super().__init__()
        self.register_buffer("energy_scale", torch.ones((), dtype=torch.float64))
        self.register_buffer("e0", torch.zeros(K.MAX_Z + 1, dtype=torch.float64))

    @property
    def species(self) -> list[int]:
        """Elements with a reference energy set by `set_normalisation` (empty before)."""
        return [int(z) for z in torch.nonzero(self.e0).flatten()]

    def set_normalisation(self, energy_scale: float, e0: dict[int, float]) -> None:
        """E = energy_scale · Σ_i e_i + Σ_i E0[Z_i]; elements missing from `e0` get E0 = 0."""
        if not (math.isfinite(energy_scale) and energy_scale > 0):
            raise ValueError(f"energy_scale must be a positive finite number (eV), got {energy_scale}")
        table = torch.zeros_like(self.e0)
        for z, value in e0.items():
            if not 1 <= int(z) <= K.MAX_Z:
                raise ValueError(f"e0 has element Z={z}; valid atomic numbers are 1..{K.MAX_Z}")
            table[int(z)] = float(value)
        self.energy_scale.fill_(float(energy_scale))
        self.e0.copy_(table)

    def _apply(self, fn, recurse=True):
        # .float()/.bfloat16() must not round the reference energies of the E0 table
        kept = {name: getattr(self, name) for name in DOUBLE_BUFFERS}
        super()._apply(fn, recurse)
        for name, value in kept.items():
            moved = getattr(self, name)
            self._buffers[name] = value.to(device=moved.device, dtype=torch.float64)
        return self

    def total_energy(self, atom_energy: torch.Tensor, species: torch.Tensor, graph_index: torch.Tensor,
                     num_graphs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(network part in the weights' dtype, total energy in float64), both (B,), eV."""
        network = torch.zeros(num_graphs, dtype=atom_energy.dtype, device=atom_energy.device).index_add_(
            0, graph_index, atom_energy * self.energy_scale.to(atom_energy.dtype))
        reference = torch.zeros(num_graphs, dtype=torch.float64, device=atom_energy.device).index_add_(
            0, graph_index, self.e0.index_select(0, species))
        return network, network.double() + reference


class EnergyCentricModel(ReferenceEnergyModel):
    """A model whose forces are −∂E/∂r (EGNN, the paper's EGNN, MACE). `_forward(batch, compute_forces,
    create_graph)` computes energy (and forces by autograd); `forward` enables the gradient the forces need
    even under `torch.no_grad()` (evaluation, MD) and keeps the graph for a force loss only while training."""

    def forward(self, batch, compute_forces: bool = True) -> dict[str, torch.Tensor]:
        grad_enabled = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad_enabled or compute_forces):
            out = self._forward(batch, compute_forces, create_graph=grad_enabled and self.training)
        if not grad_enabled:
            out = {name: value.detach() for name, value in out.items()}
        return out

    def _forward(self, batch, compute_forces: bool, create_graph: bool) -> dict[str, torch.Tensor]:
        raise NotImplementedError
