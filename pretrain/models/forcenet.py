"""ForceNet-style model (Hu et al. 2021, OCP), force-centric: direct force decoder, no −∂E/∂x.

Edge basis of r_ij = x_j - x_i + shift (d = |r_ij|, u = r_ij / d):
    b_ij = g(d) ⊗ Y(u)            g: `num_radial` Gaussians on [0, cutoff]; Y: real spherical harmonics of
                                  degree ≤ `max_degree` of the unit vector (1, 4 or 9 functions)
    b_ij ← act(W_b b_ij)          one learned projection shared by all blocks
Interaction block (× `blocks`, unshared):
    W_ij = MLP([b_ij, h_i, h_j])                   filter from geometry and both atoms
    h_i ← h_i + MLP(Σ_j c(d) · W_ij ⊙ (V h)_j)      c: EGNN's cosine envelope (continuity at the cutoff)
Decoders on h_i: F_i = s · MLP_F(h_i), E = s · Σ_i MLP_E(h_i) + Σ_i E0[Z_i] (s = energy_scale).
Nodes start from the true species (+ the mask-flag embedding). Y(u) uses Cartesian components, so the model
is not rotation equivariant (as ForceNet, which relies on rotation augmentation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from data_shards import keys as K
from pretrain.models.egnn import cosine_envelope
from pretrain.models.gns import ACTIVATIONS, ForceCentricModel, check_activation, mlp

SQRT3 = math.sqrt(3.0)


@dataclass
class ForceNetConfig:
    hidden: int = 128          # width of node features and edge filters
    blocks: int = 5            # interaction blocks
    cutoff: float = 3.4        # Å, radius of the graph the loader builds
    num_radial: int = 16       # Gaussian distance functions
    max_degree: int = 2        # spherical harmonics of the edge direction up to this degree (0, 1 or 2)
    decoder_hidden: int = 512  # width of the force and energy decoders (OCP ForceNet default)
    activation: str = "silu"   # silu (ForceNet's swish) | relu

    def __post_init__(self):
        for name in ("hidden", "blocks", "num_radial", "decoder_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"forcenet {name} must be >= 1, got {getattr(self, name)}")
        if self.max_degree not in (0, 1, 2):
            raise ValueError(f"forcenet max_degree must be one of [0, 1, 2], got {self.max_degree}")
        if not self.cutoff > 0:
            raise ValueError(f"forcenet cutoff must be > 0 Å, got {self.cutoff}")
        check_activation("forcenet", self.activation)


def spherical_harmonics(unit: torch.Tensor, max_degree: int) -> torch.Tensor:
    """Real spherical harmonics (Racah-normalised, Y_00 = 1) of unit vectors (E, 3) → (E, (max_degree+1)²)."""
    x, y, z = unit.unbind(-1)
    parts = [torch.ones_like(x)]
    if max_degree >= 1:
        parts += [x, y, z]
    if max_degree >= 2:
        parts += [SQRT3 * x * y, SQRT3 * y * z, 0.5 * (3.0 * z * z - 1.0), SQRT3 * x * z,
                  0.5 * SQRT3 * (x * x - y * y)]
    return torch.stack(parts, dim=-1)


class InteractionBlock(nn.Module):
    def __init__(self, hidden: int, activation: str):
        super().__init__()
        # first layer of the filter MLP on [b_ij, h_i, h_j], split so the node matmuls run per node
        self.filter_basis = nn.Linear(hidden, hidden)
        self.filter_src = nn.Linear(hidden, hidden, bias=False)
        self.filter_dst = nn.Linear(hidden, hidden, bias=False)
        self.filter_out = nn.Sequential(ACTIVATIONS[activation](), nn.Linear(hidden, hidden))
        self.value = nn.Linear(hidden, hidden, bias=False)
        self.update = mlp(hidden, hidden, hidden, 1, activation, layer_norm=False)

    def forward(self, h, basis, src, dst, envelope):
        first = self.filter_basis(basis) + self.filter_src(h).index_select(0, src) \
            + self.filter_dst(h).index_select(0, dst)
        messages = self.filter_out(first) * self.value(h).index_select(0, dst) * envelope
        aggregated = torch.zeros_like(h).index_add_(0, src, messages)
        return h + self.update(aggregated)


class ForceNet(ForceCentricModel):
    def __init__(self, config: ForceNetConfig):
        super().__init__()
        self.config = config
        c = config
        self.species_embedding = nn.Embedding(K.MAX_Z + 1, c.hidden)
        self.flag_embedding = nn.Embedding(2, c.hidden)
        self.rbf_gamma = (c.num_radial / c.cutoff) ** 2  # 1 / width², width = the centres' spacing
        self.edge_basis = nn.Sequential(nn.Linear(c.num_radial * (c.max_degree + 1) ** 2, c.hidden),
                                        ACTIVATIONS[c.activation]())
        self.blocks = nn.ModuleList(InteractionBlock(c.hidden, c.activation) for _ in range(c.blocks))
        self.force_head = mlp(c.hidden, c.decoder_hidden, 3, 1, c.activation, layer_norm=False)
        self.energy_head = mlp(c.hidden, c.decoder_hidden, 1, 1, c.activation, layer_norm=False)

    def edge_features(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected basis b_ij (E, hidden), envelope (E, 1))."""
        distance = vectors.norm(dim=-1, keepdim=True)
        centers = torch.linspace(0.0, self.config.cutoff, self.config.num_radial, dtype=vectors.dtype,
                                 device=vectors.device)
        radial = torch.exp(-self.rbf_gamma * (distance - centers) ** 2)
        angular = spherical_harmonics(vectors / distance, self.config.max_degree)
        basis = (radial[:, :, None] * angular[:, None, :]).flatten(1)
        return self.edge_basis(basis), cosine_envelope(distance, self.config.cutoff)

    def node_features(self, batch, vectors, dtype):
        species = batch[K.SPECIES]
        src, dst = batch[K.EDGE_INDEX]
        flag = batch[K.MASK_FLAG] if K.MASK_FLAG in batch else torch.zeros_like(species)
        h = self.species_embedding(species) + self.flag_embedding(flag)
        basis, envelope = self.edge_features(vectors)
        for block in self.blocks:
            h = block(h, basis, src, dst, envelope)
        return h
