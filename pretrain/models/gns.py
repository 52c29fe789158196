"""Graph Network-based Simulator (Sanchez-Gonzalez et al. 2020), force-centric encode-process-decode.

    node encoder  h_i  = MLP(embed(Z_i) + embed(flag_i))       (no absolute positions: translation invariant)
    edge encoder  e_ij = MLP([r_ij / R, |r_ij| / R])                   r_ij = x_j - x_i + shift
    processor     e_ij ← e_ij + MLP_e([e_ij, h_i, h_j])
                  h_i  ← h_i + MLP_n([h_i, Σ_j c(|r_ij|) e_ij])        × `steps`, unshared weights
    decoders      F_i = s · MLP_F(h_i),  E = s · Σ_i MLP_E(h_i) + Σ_i E0[Z_i]  (s = energy_scale)
MLPs have `mlp_layers` hidden layers of width `latent`; encoder and processor MLPs end in LayerNorm.
c is the cosine envelope of EGNN: an edge entering the radius graph adds nothing to any node at first, so
energy and forces stay continuous. The edge input uses Cartesian components, so GNS is not rotation
equivariant (the paper relies on data augmentation); forces are a decoder output, not −∂E/∂x.

`ForceCentricModel` holds what GNS and ForceNet share: E0/energy-scale buffers (float64), the readout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from data_shards import keys as K
from pretrain.models.base import ReferenceEnergyModel
from pretrain.models.egnn import cosine_envelope

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}


def mlp(inputs: int, hidden: int, outputs: int, hidden_layers: int, activation: str,
        layer_norm: bool) -> nn.Sequential:
    """`hidden_layers` Linear+activation blocks of width `hidden`, a Linear to `outputs`, optional LayerNorm."""
    widths = [inputs] + [hidden] * hidden_layers
    modules: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        modules += [nn.Linear(a, b), ACTIVATIONS[activation]()]
    modules.append(nn.Linear(widths[-1], outputs))
    if layer_norm:
        modules.append(nn.LayerNorm(outputs))
    return nn.Sequential(*modules)


def check_activation(model: str, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{model} activation {activation!r} is not one of {sorted(ACTIVATIONS)}")


class ForceCentricModel(ReferenceEnergyModel):
    """Base of direct-force models: subclasses implement `node_features(batch, vectors) -> h (N, F)` and
    set `force_head`, `energy_head` (per-atom MLPs on h). Forces need no autograd (no double backward)."""

    force_centric = True
    head_parameter_prefixes = ("energy_head.", "force_head.")
    energy_head: nn.Module  # set by the subclass
    force_head: nn.Module

    def node_features(self, batch, vectors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def parameter_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, batch, compute_forces: bool = True) -> dict[str, torch.Tensor]:
        species = batch[K.SPECIES]
        pos = batch[K.POSITIONS]
        src, dst = batch[K.EDGE_INDEX]
        graph_index = batch[K.BATCH] if K.BATCH in batch else torch.zeros_like(species)
        num_graphs = int(batch.num_graphs) if K.BATCH in batch else 1
        dtype = self.parameter_dtype()
        # edge vectors in the positions' precision, then the weights' (bf16 training keeps float32 positions)
        vectors = pos.index_select(0, dst) - pos.index_select(0, src) + batch[K.SHIFT_VECTORS].to(pos.dtype)
        h = self.node_features(batch, vectors.to(dtype), dtype)

        _, total = self.total_energy(self.energy_head(h).squeeze(-1), species, graph_index, num_graphs)
        out = {K.PRED_ENERGY: total}
        if compute_forces:
            out[K.PRED_FORCES] = self.force_head(h) * self.energy_scale.to(h.dtype)
        return out


@dataclass
class GNSConfig:
    latent: int = 128          # width of node/edge latents and MLP hidden layers
    steps: int = 10            # message-passing steps (unshared weights)
    mlp_layers: int = 2        # hidden layers per MLP
    cutoff: float = 3.4        # Å, radius of the graph the loader builds
    activation: str = "relu"   # relu (paper) | silu
    num_rbf: int = 0           # extra Gaussian distance functions on the edge input; 0 = paper ([r/R, |r|/R])

    def __post_init__(self):
        if self.latent < 1:
            raise ValueError(f"gns latent must be >= 1, got {self.latent}")
        if self.steps < 1:
            raise ValueError(f"gns steps must be >= 1, got {self.steps}")
        if self.mlp_layers < 1:
            raise ValueError(f"gns mlp_layers must be >= 1, got {self.mlp_layers}")
        if not self.cutoff > 0:
            raise ValueError(f"gns cutoff must be > 0 Å, got {self.cutoff}")
        if self.num_rbf < 0:
            raise ValueError(f"gns num_rbf must be >= 0 (0 = paper edge input), got {self.num_rbf}")
        check_activation("gns", self.activation)


class GNSStep(nn.Module):
    def __init__(self, latent: int, mlp_layers: int, activation: str):
        super().__init__()
        self.edge_mlp = mlp(3 * latent, latent, latent, mlp_layers, activation, layer_norm=True)
        self.node_mlp = mlp(2 * latent, latent, latent, mlp_layers, activation, layer_norm=True)

    def edge_update(self, h, e, src, dst):
        """edge_mlp([e_ij, h_i, h_j]) with the first Linear split so its node blocks run per node, not per edge."""
        first = self.edge_mlp[0]
        w_edge, w_src, w_dst = first.weight.split(h.shape[1], dim=1)
        out = F.linear(e, w_edge, first.bias)
        out = out + (h @ w_src.T).index_select(0, src) + (h @ w_dst.T).index_select(0, dst)
        return self.edge_mlp[1:](out)

    def forward(self, h, e, src, dst, envelope):
        e = e + self.edge_update(h, e, src, dst)
        aggregated = torch.zeros_like(h).index_add_(0, src, e * envelope)
        h = h + self.node_mlp(torch.cat([h, aggregated], dim=-1))
        return h, e


class GNS(ForceCentricModel):
    def __init__(self, config: GNSConfig):
        super().__init__()
        self.config = config
        c = config
        self.species_embedding = nn.Embedding(K.MAX_Z + 1, c.latent)
        self.flag_embedding = nn.Embedding(2, c.latent)
        self.node_encoder = mlp(c.latent, c.latent, c.latent, c.mlp_layers, c.activation, layer_norm=True)
        self.rbf_gamma = (c.num_rbf / c.cutoff) ** 2  # 1 / width², width = the centres' spacing
        self.edge_encoder = mlp(4 + c.num_rbf, c.latent, c.latent, c.mlp_layers, c.activation, layer_norm=True)
        self.processor = nn.ModuleList(GNSStep(c.latent, c.mlp_layers, c.activation) for _ in range(c.steps))
        self.force_head = mlp(c.latent, c.latent, 3, c.mlp_layers, c.activation, layer_norm=False)
        self.energy_head = mlp(c.latent, c.latent, 1, c.mlp_layers, c.activation, layer_norm=False)

    def node_features(self, batch, vectors, dtype):
        species = batch[K.SPECIES]
        src, dst = batch[K.EDGE_INDEX]
        flag = batch[K.MASK_FLAG] if K.MASK_FLAG in batch else torch.zeros_like(species)
        h = self.node_encoder(self.species_embedding(species) + self.flag_embedding(flag))
        distance = vectors.norm(dim=-1, keepdim=True)
        envelope = cosine_envelope(distance, self.config.cutoff)
        edge_input = [vectors / self.config.cutoff, distance / self.config.cutoff]
        if self.config.num_rbf:
            centers = torch.linspace(0.0, self.config.cutoff, self.config.num_rbf, dtype=dtype,
                                     device=distance.device)
            edge_input.append(torch.exp(-self.rbf_gamma * (distance - centers) ** 2))
        e = self.edge_encoder(torch.cat(edge_input, dim=-1))
        for step in self.processor:
            h, e = step(h, e, src, dst, envelope)
        return h
