"""The paper's EGNN, as the authors' code computes it (Satorras et al. 2021 `E_GCL`, with the reproduction's
energy readout): the reference function that speed claims are made against.

Per layer, on edges (i, j) of the radius graph built once at the input positions (hard cutoff, no envelope),
with x_i - x_j the current coordinate difference (periodic image included) and d² = |x_i - x_j|²:
    m_ij = SiLU(W₂ SiLU(W₁ [h_i, h_j, d²] + b₁) + b₂)                  edge MLP, no radial basis
    x_i ← x_i + mean_j (x_i - x_j) / (detach(d) + 1e-8) · φ_x(m_ij)    mean over i's edges; φ_x = Lin-SiLU-Lin
    h_i ← h_i + φ_h([h_i, Σ_j m_ij])                                   φ_h = Lin-SiLU-Lin, residual
The last layer has no coordinate update (it would feed nothing). Energy E = energy_scale · Σ_i
MLP(LayerNorm(h_i)) + Σ_i E0[Z_i], MLP 128→128→1; forces F = −∂E/∂x by autograd. Because the normaliser is
detached (as in the authors' code), F is not exactly the derivative of E where coordinates are updated.

Two implementations of the same function, selected by `implementation`:
- "reference": the straightforward per-edge form — the per-edge concatenation [h_i, h_j, d²] through
  nn.Linear(2H+1, H), torch's SiLU, every activation kept by autograd;
- "fast": W₁[h_i, h_j, d²] = (W_a h)_i + (W_b h)_j + w d² (the big matmul per node, not per edge), a fused
  SiLU whose backward stays one kernel under double backward, and (`recompute: true`, training only, where
  forces are differentiated again) recomputation of the edge block in both backward passes
  (`pretrain.models.recompute`), `recompute_chunk` edges at a time, instead of keeping every layer's edge
  activations for the whole step: the node projections, the aggregation and the node update stay in the
  ordinary graph (node-sized, small); only the edge block — gathers, edge MLP, φ_x, scatter — is recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from data_shards import keys as K
from pretrain.models.base import EnergyCentricModel, GraphInputs
from pretrain.models.egnn import SiLU, silu
from pretrain.models.recompute import forces_only, recompute_twice

IMPLEMENTATIONS = ("fast", "reference")
NORM_EPS = 1e-8


@dataclass
class PaperEGNNConfig:
    hidden: int = 128
    layers: int = 5
    cutoff: float = 3.5             # Å, hard: the graph is built once at the input positions
    coord_init_gain: float = 0.001  # xavier gain of φ_x's last layer (the authors' value)
    detach_norm: bool = True        # the authors' detached normaliser; False makes F the exact −∂E/∂x
    implementation: str = "fast"    # "fast" or "reference" (same function, see the module docstring)
    recompute: bool = False         # fast, training: recompute the edge activations (less memory, more CPU)
    recompute_chunk: int = 16384    # recompute: edges per recomputed chunk (peak memory ∝ chunk); 0 = all at once

    def __post_init__(self):
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"egnn_paper implementation must be one of {list(IMPLEMENTATIONS)}, "
                             f"got {self.implementation!r}")
        if self.hidden < 1:
            raise ValueError(f"egnn_paper hidden must be >= 1, got {self.hidden}")
        if self.layers < 1:
            raise ValueError(f"egnn_paper layers must be >= 1, got {self.layers}")
        if self.recompute_chunk < 0:
            raise ValueError(f"egnn_paper recompute_chunk must be >= 0 edges (0 = all at once), "
                             f"got {self.recompute_chunk}")
        if not self.cutoff > 0:
            raise ValueError(f"egnn_paper cutoff must be > 0 Å, got {self.cutoff}")
        if self.coord_init_gain < 0:
            raise ValueError(f"egnn_paper coord_init_gain must be >= 0, got {self.coord_init_gain}")


class PaperEGNNLayer(nn.Module):
    def __init__(self, hidden: int, update_coords: bool, coord_init_gain: float, detach_norm: bool):
        super().__init__()
        self.detach_norm = detach_norm
        self.edge_in = nn.Linear(2 * hidden + 1, hidden)   # W₁ on [h_i, h_j, d²]
        self.edge_out = nn.Linear(hidden, hidden)
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), SiLU(), nn.Linear(hidden, hidden))
        self.coord_mlp = None
        if update_coords:
            last = nn.Linear(hidden, 1, bias=False)
            nn.init.xavier_uniform_(last.weight, gain=coord_init_gain)
            self.coord_mlp = nn.Sequential(nn.Linear(hidden, hidden), SiLU(), last)

    def normaliser(self, dist2: torch.Tensor) -> torch.Tensor:
        dist = dist2.sqrt()
        return (dist.detach() if self.detach_norm else dist) + NORM_EPS

    # --- the straightforward per-edge form ------------------------------------------------------------
    def forward_reference(self, h, vectors, src, dst, inv_degree):
        act = F.silu
        dist2 = (vectors * vectors).sum(-1, keepdim=True)
        m = act(self.edge_out(act(self.edge_in(torch.cat([h[src], h[dst], dist2], dim=-1)))))
        aggregated = torch.zeros_like(h).index_add(0, src, m)
        if self.coord_mlp is not None:
            c = self.coord_mlp[2](act(self.coord_mlp[0](m)))
            trans = -vectors / self.normaliser(dist2) * c                       # (x_i - x_j) · φ_x / norm
            delta = torch.zeros(h.shape[0], 3, dtype=h.dtype).index_add(0, src, trans) * inv_degree
            vectors = vectors + delta[dst] - delta[src]
        h = h + self.node_mlp(torch.cat([h, aggregated], dim=-1))
        return h, vectors

    # --- the fast form --------------------------------------------------------------------------------
    def node_projections(self, h: torch.Tensor) -> torch.Tensor:
        """(N, 2H): [W_a h + b₁, W_b h], the two node halves of W₁[h_i, h_j, d²] (one matmul per node)."""
        hidden = h.shape[1]
        weight, bias = self.edge_in.weight, self.edge_in.bias
        return torch.cat([F.linear(h, weight[:, :hidden], bias), F.linear(h, weight[:, hidden:2 * hidden])], 1)

    def edge_block(self, projections: torch.Tensor, vectors: torch.Tensor, src, dst, num_nodes: int):
        """Σ_j m_ij per node (N, H) and Σ_j (x_i - x_j) φ_x(m_ij) / norm per node (N, 3; zeros when the
        layer does not move coordinates) over the edges given — all of them, or one chunk."""
        hidden = projections.shape[1] // 2
        dist2 = (vectors * vectors).sum(-1, keepdim=True)
        pre = projections[:, :hidden].index_select(0, src)
        pre += projections[:, hidden:].index_select(0, dst)
        pre = pre.addmm_(dist2, self.edge_in.weight[:, 2 * hidden][None])
        m = silu(self.edge_out(silu(pre)))
        aggregated = m.new_zeros(num_nodes, hidden).index_add_(0, src, m)
        if self.coord_mlp is None:
            return aggregated, vectors.new_zeros(num_nodes, 3)
        trans = vectors * (self.coord_mlp(m) / self.normaliser(dist2))
        return aggregated, vectors.new_zeros(num_nodes, 3).index_add_(0, src, trans)

    def forward_fast(self, h, vectors, src, dst, inv_degree, chunk_edges: int = 0):
        """chunk_edges > 0: the edge block is recomputed in both backward passes, `chunk_edges` edges at a
        time (training with recompute); 0: computed once with every activation kept."""
        projections = self.node_projections(h)
        if chunk_edges > 0:
            pieces = [recompute_twice(self.edge_block, projections, vectors[part], src[part], dst[part], h.shape[0])
                      for part in (slice(at, at + chunk_edges) for at in range(0, src.shape[0], chunk_edges))]
            aggregated = torch.stack([a for a, _ in pieces]).sum(0)
            moved = torch.stack([t for _, t in pieces]).sum(0)
        else:
            aggregated, moved = self.edge_block(projections, vectors, src, dst, h.shape[0])
        if self.coord_mlp is not None:
            delta = moved * inv_degree
            vectors = vectors - delta.index_select(0, dst) + delta.index_select(0, src)
        h = h + self.node_mlp(torch.cat([h, aggregated], dim=-1))
        return h, vectors


class PaperEGNN(EnergyCentricModel):
    head_parameter_prefixes = ("energy_norm.", "energy_head.")

    def __init__(self, config: PaperEGNNConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden
        self.species_embedding = nn.Embedding(K.MAX_Z + 1, hidden)
        self.flag_embedding = nn.Embedding(2, hidden)
        self.layers = nn.ModuleList(
            PaperEGNNLayer(hidden, k < config.layers - 1, config.coord_init_gain, config.detach_norm)
            for k in range(config.layers))
        self.energy_norm = nn.LayerNorm(hidden)
        self.energy_head = nn.Sequential(nn.Linear(hidden, hidden), SiLU(), nn.Linear(hidden, 1))

    def _forward(self, batch, compute_forces: bool, create_graph: bool) -> dict[str, torch.Tensor]:
        g = GraphInputs.read(batch, compute_forces)
        src, dst = g.edge_index
        h = self.species_embedding(g.species) + self.flag_embedding(g.flag)
        vectors = g.edge_vectors().to(h.dtype)
        degree = torch.bincount(src, minlength=g.species.shape[0]).clamp_(min=1)
        inv_degree = (1.0 / degree.to(h.dtype))[:, None]      # mean over a node's edges
        fast = self.config.implementation == "fast"
        layer: PaperEGNNLayer
        for layer in self.layers:  # type: ignore[assignment]  # nn.ModuleList yields nn.Module
            if not fast:
                h, vectors = layer.forward_reference(h, vectors, src, dst, inv_degree)
            else:   # training with recompute: edge activations recomputed instead of kept for double backward
                chunk = (self.config.recompute_chunk or src.shape[0]) if self.config.recompute and create_graph else 0
                h, vectors = layer.forward_fast(h, vectors, src, dst, inv_degree, chunk)
        atom_energy = self.energy_head(self.energy_norm(h)).squeeze(-1)
        energy, total = self.total_energy(atom_energy, g.species, g.graph_index, g.num_graphs)
        out = {K.PRED_ENERGY: total}
        if compute_forces:
            with forces_only():   # recompute: the parameter gradients of this pass are not wanted
                (grad,) = torch.autograd.grad(energy.sum(), g.pos, create_graph=create_graph)
            out[K.PRED_FORCES] = -grad
        return out
