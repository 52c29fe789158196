"""MACE (Batatia et al. 2022) from the `mace-torch` package as a maskpot backbone, energy-centric.

The network is `mace.modules.MACE`, built with `mace_run_train`'s hyper-parameter names (num_channels,
max_L, correlation, num_interactions, r_max, num_radial_basis, num_cutoff_basis, max_ell, interaction,
interaction_first, MLP_irreps, radial_MLP, gate, avg_num_neighbors); nothing of MACE is re-implemented.

The mask flag enters as one extra node attribute next to the element one-hot: MACE's `node_attrs` are
[one_hot(Z) | flag] (num_elements + 1 columns). MACE uses node_attrs *linearly* everywhere it reads them
(the node embedding, the element-dependent skip connection of each interaction, the element-dependent
weights of each symmetric contraction), so a flagged atom gets a learned embedding added to its
element's (the paper's learned mask embedding, as EGNN's `flag_embedding`) and learned corrections in
every layer, while an unflagged atom (flag 0) is exactly plain MACE. This needs no change to MACE;
mace-torch's `embedding_specs` joint embedding would only touch the first layer and concatenates through a
SiLU, so flag 0 would not give plain MACE.

Energies: MACE's own E0 table (`atomic_energies`) is zero; E = energy_scale · Σ_i e_i + Σ_i E0[Z_i] comes
from `ReferenceEnergyModel` (float64 E0, exported), i.e. ScaleShiftMACE with the shift per element.
Forces F = −∂E/∂r by autograd here (create_graph when training), exactly as for EGNN.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.serialization import safe_globals

from data_shards import keys as K
from pretrain.models.base import EnergyCentricModel

_WEIGHTS_ONLY_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@functools.cache
def mace_modules():
    """(e3nn.o3, mace.modules) or None when mace-torch is not installed (`pip install maskpot[mace]`).

    Imported on first use, not at module top: importing mace.modules costs 10–20 s here (measured on the
    shared 2-core machine, against 5–8 s for the whole EGNN stack), which every `maskpot` command and every
    other model would otherwise pay.

    e3nn 0.4.4 `torch.load`s its own constants file (which holds `slice` objects) at import, and
    `mace/__init__.py` sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 for the whole process so that this works.
    That variable would make every later `torch.load` without an explicit `weights_only` unpickle
    arbitrary objects (DeepSpeed checkpoints included). Instead: e3nn is imported first with only the
    builtin `slice` allow-listed for weights-only loading, and the variable is restored right after
    mace's import. mace also prints a line about the (CUDA-only) cuequivariance backend: swallowed.
    """
    previous = os.environ.get(_WEIGHTS_ONLY_ENV)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning)
            with safe_globals([slice]):
                from e3nn import o3  # startup: e3nn
            import mace.modules as mace_modules  # startup: ase+e3nn+mace+matplotlib+torch
    except ImportError:
        return None
    finally:
        if previous is None:
            os.environ.pop(_WEIGHTS_ONLY_ENV, None)
        else:
            os.environ[_WEIGHTS_ONLY_ENV] = previous
    return o3, mace_modules


INTERACTIONS = ("RealAgnosticResidualInteractionBlock", "RealAgnosticInteractionBlock",
                "RealAgnosticDensityInteractionBlock", "RealAgnosticDensityResidualInteractionBlock",
                "RealAgnosticResidualNonLinearInteractionBlock")
GATES = ("silu", "tanh", "abs", "None")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class MACEConfig:
    """`mace_run_train` names and defaults, except r_max (5.0 there) which must fit the data."""
    r_max: float = 5.0               # Å, radius of the graph the loader builds
    num_channels: int = 128          # hidden_irreps = num_channels × (0e + 1o + … up to max_L)
    max_L: int = 1
    correlation: int = 3             # body order of the symmetric contraction, per layer
    num_interactions: int = 2
    max_ell: int = 3                 # highest ℓ of the edge spherical harmonics
    num_radial_basis: int = 8        # Bessel functions
    num_cutoff_basis: int = 5        # polynomial cutoff order p
    radial_MLP: list[int] = field(default_factory=lambda: [64, 64, 64])
    MLP_irreps: str = "16x0e"       # hidden irreps of the last (non-linear) readout
    gate: str = "silu"
    interaction: str = "RealAgnosticResidualInteractionBlock"
    interaction_first: str = "RealAgnosticResidualInteractionBlock"
    avg_num_neighbors: float = 40.0  # message normalisation; mace_run_train measures it on the train set
    elements: list[int] = field(default_factory=lambda: [1, 6, 7, 8])  # atomic numbers the one-hot covers

    def __post_init__(self):
        _require(self.r_max > 0, f"mace r_max must be > 0 Å, got {self.r_max}")
        for name in ("num_channels", "correlation", "num_interactions", "num_radial_basis", "num_cutoff_basis"):
            _require(getattr(self, name) >= 1, f"mace {name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_L", "max_ell"):
            _require(getattr(self, name) >= 0, f"mace {name} must be >= 0, got {getattr(self, name)}")
        _require(self.max_L <= self.max_ell, f"mace max_L ({self.max_L}) must be <= max_ell ({self.max_ell})")
        _require(self.avg_num_neighbors > 0, f"mace avg_num_neighbors must be > 0, got {self.avg_num_neighbors}")
        _require(bool(self.radial_MLP) and all(w >= 1 for w in self.radial_MLP),
                 f"mace radial_MLP must be a non-empty list of widths >= 1, got {self.radial_MLP}")
        _require(self.gate in GATES, f"mace gate {self.gate!r} is not one of {list(GATES)}")
        for name in ("interaction", "interaction_first"):
            _require(getattr(self, name) in INTERACTIONS,
                     f"mace {name} {getattr(self, name)!r} is not one of {list(INTERACTIONS)}")
        _require(bool(self.elements) and len(set(self.elements)) == len(self.elements)
                 and all(1 <= z <= K.MAX_Z for z in self.elements),
                 f"mace elements must be distinct atomic numbers 1..{K.MAX_Z}, got {self.elements}")
        _require(mace_modules() is not None,
                 "model.name 'mace' needs the mace-torch package: pip install 'maskpot[mace]'")
        try:
            mace_modules()[0].Irreps(self.MLP_irreps)
        except (ValueError, AssertionError) as err:
            raise ValueError(f"mace MLP_irreps {self.MLP_irreps!r} is not an e3nn irreps string "
                             f"(e.g. '16x0e'): {err}") from None

    @property
    def cutoff(self) -> float:
        """The loader's graph radius (every maskpot model exposes `config.cutoff`)."""
        return float(self.r_max)


class MACE(EnergyCentricModel):
    """maskpot model contract over `mace.modules.MACE` (see the module docstring)."""
    head_parameter_prefixes = ("mace.readouts.",)

    def __init__(self, config: MACEConfig):
        super().__init__()
        o3, modules = mace_modules()
        self.config = config
        c = config
        self.num_elements = len(c.elements)
        index = torch.full((K.MAX_Z + 1,), -1, dtype=torch.long)
        index[torch.tensor(c.elements)] = torch.arange(self.num_elements)
        self.register_buffer("element_index", index, persistent=False)
        with warnings.catch_warnings():  # e3nn scripting its modules: not actionable by a user
            warnings.filterwarnings("ignore", message="The TorchScript type system", category=UserWarning)
            warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning)
            self.mace = self._build(c, o3, modules)

    def _build(self, c: MACEConfig, o3, modules) -> torch.nn.Module:
        hidden = o3.Irreps((c.num_channels * o3.Irreps.spherical_harmonics(c.max_L)).sort().irreps.simplify())
        return modules.MACE(
            r_max=c.r_max, num_bessel=c.num_radial_basis, num_polynomial_cutoff=c.num_cutoff_basis,
            max_ell=c.max_ell, interaction_cls=modules.interaction_classes[c.interaction],
            interaction_cls_first=modules.interaction_classes[c.interaction_first],
            num_interactions=c.num_interactions, num_elements=self.num_elements + 1,  # + the mask flag
            hidden_irreps=hidden, MLP_irreps=o3.Irreps(c.MLP_irreps),
            atomic_energies=np.zeros(self.num_elements + 1), avg_num_neighbors=c.avg_num_neighbors,
            atomic_numbers=list(c.elements) + [0], correlation=c.correlation, gate=modules.gate_dict[c.gate],
            radial_MLP=list(c.radial_MLP),
        )

    def feature_module(self) -> torch.nn.Module:
        """The module whose first input is the per-atom features (the linear probe hooks it)."""
        return self.mace.readouts[-1]

    @property
    def feature_width(self) -> int:
        return self.config.num_channels

    def node_attrs(self, species: torch.Tensor, flag: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[one_hot(Z) | mask flag] (N, num_elements + 1); an element outside `elements` is a ValueError."""
        column = self.element_index.index_select(0, species)
        if bool((column < 0).any()):
            unknown = sorted({int(z) for z in species[column < 0]})
            raise ValueError(f"the data holds elements Z={unknown} that model.params.elements "
                             f"{list(self.config.elements)} does not list; add them to elements")
        attrs = torch.zeros(len(species), self.num_elements + 1, dtype=dtype, device=species.device)
        attrs[torch.arange(len(species), device=species.device), column] = 1.0
        attrs[:, -1] = flag.to(dtype)
        return attrs

    def _forward(self, batch, compute_forces: bool, create_graph: bool) -> dict[str, torch.Tensor]:
        species = batch[K.SPECIES]
        pos = batch[K.POSITIONS]
        graph_index = batch[K.BATCH] if K.BATCH in batch else torch.zeros_like(species)
        num_graphs = int(batch.num_graphs) if K.BATCH in batch else 1
        if not pos.requires_grad:  # MACE calls requires_grad_ on its positions: never on the caller's tensor
            pos = pos.detach().requires_grad_(compute_forces)
        dtype = next(self.parameters()).dtype
        flag = batch[K.MASK_FLAG] if K.MASK_FLAG in batch else torch.zeros_like(species)
        counts = torch.bincount(graph_index, minlength=num_graphs)
        cell = batch[K.CELL] if K.CELL in batch else pos.new_zeros(num_graphs, 3, 3)
        data = {
            "positions": pos.to(dtype), "node_attrs": self.node_attrs(species, flag, dtype),
            "edge_index": batch[K.EDGE_INDEX], "shifts": batch[K.SHIFT_VECTORS].to(dtype),
            "batch": graph_index, "ptr": torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
            "cell": cell.reshape(-1, 3).to(dtype),
        }
        out = self.mace(data, training=create_graph, compute_force=False)
        energy, total = self.total_energy(out["node_energy"], species, graph_index, num_graphs)
        result = {K.PRED_ENERGY: total}
        if compute_forces:
            (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
            result[K.PRED_FORCES] = -grad
        return result
