"""The paper's EGNN (`egnn_paper`): the model battery, and both implementations against straight per-edge loops."""
from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from data_shards import keys as K
from pretrain.models import build_model
from pretrain.models.egnn_paper import PaperEGNNConfig
from tests.helpers.model_mixin import ModelTestMixin
from tests.helpers.water_systems import make_sample, to_batch, water_box, water_dimer

SMALL = {"hidden": 16, "layers": 3, "coord_init_gain": 1.0}   # large coordinate updates: exercise them


class PaperBattery(ModelTestMixin):
    params: ClassVar[dict] = {}

    def build(self):
        return build_model("egnn_paper", {**SMALL, "detach_norm": False, **self.params})

    def test_energy_smooth_when_atom_crosses_cutoff(self):
        """The paper's cutoff is hard: the energy jumps where a pair enters the graph (documented, checked)."""
        model = self.model()
        cutoff = self.cutoff(model)
        pair = [make_sample([8, 1], [[0.0, 0.0, 0.0], [0.0, 0.0, d]]) for d in (cutoff - 1e-4, cutoff + 1e-4)]
        inside, outside = (float(self.predict(model, [p])[K.PRED_ENERGY][0]) for p in pair)
        assert abs(inside - outside) > 1e-6


class TestPaperEGNNFast(PaperBattery):
    params: ClassVar[dict] = {"implementation": "fast", "recompute": False}


class TestPaperEGNNFastRecompute(PaperBattery):
    params: ClassVar[dict] = {"implementation": "fast", "recompute": True}


class TestPaperEGNNReference(PaperBattery):
    params: ClassVar[dict] = {"implementation": "reference"}


def loop_energy(model, sample: dict, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's function written independently, one edge at a time (float64, one structure).

    The graph (pairs and periodic shifts) comes from `sample`; `positions` (default: the sample's) enter."""
    batch = to_batch([sample], model.config.cutoff)
    positions = batch[K.POSITIONS] if positions is None else positions
    act = torch.nn.functional.silu
    species, shift = batch[K.SPECIES], batch[K.SHIFT_VECTORS]
    src, dst = batch[K.EDGE_INDEX].tolist()
    n, hidden = len(species), model.config.hidden
    x = [positions[i] for i in range(n)]
    h = [model.species_embedding.weight[int(species[i])] + model.flag_embedding.weight[0] for i in range(n)]
    for layer in model.layers:
        messages, moves, degree = [], [torch.zeros(3, dtype=torch.float64) for _ in range(n)], [0] * n
        for e, (i, j) in enumerate(zip(src, dst)):
            diff = x[i] - (x[j] + shift[e])                    # x_i - x_j (periodic image of j)
            d2 = (diff * diff).sum()
            w = layer.edge_in.weight
            first = w[:, :hidden] @ h[i] + w[:, hidden:2 * hidden] @ h[j] + w[:, 2 * hidden] * d2 + layer.edge_in.bias
            m = act(layer.edge_out(act(first)))
            messages.append(m)
            if layer.coord_mlp is not None:
                scale = layer.coord_mlp(m)[0]
                norm = (d2.sqrt().detach() if layer.detach_norm else d2.sqrt()) + 1e-8
                moves[i] = moves[i] + diff / norm * scale
                degree[i] += 1
        new_h = []
        for i in range(n):
            total = sum((messages[e] for e in range(len(src)) if src[e] == i), torch.zeros(hidden, dtype=torch.float64))
            new_h.append(h[i] + layer.node_mlp(torch.cat([h[i], total])))
        if layer.coord_mlp is not None:
            x = [x[i] + moves[i] / max(degree[i], 1) for i in range(n)]
        h = new_h
    atom = [model.energy_head(model.energy_norm(h[i]))[0] for i in range(n)]
    return sum(atom) * model.energy_scale


def loop_forces(model, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.tensor(sample[K.POSITIONS], dtype=torch.float64, requires_grad=True)
    energy = loop_energy(model, sample, positions)
    (grad,) = torch.autograd.grad(energy, positions)
    return energy.detach(), -grad


@pytest.mark.parametrize("implementation", ["fast", "reference"])
@pytest.mark.parametrize("detach_norm", [True, False])
def test_matches_per_edge_loops_in_float64(implementation, detach_norm):
    torch.manual_seed(0)
    params: ClassVar[dict] = {**SMALL, "implementation": implementation, "detach_norm": detach_norm}
    model = build_model("egnn_paper", params).double().eval()
    for sample in (water_dimer(), water_box(8, seed=2)):
        expected_e, expected_f = loop_forces(model, sample)
        out = model(to_batch([sample], model.config.cutoff), compute_forces=True)
        torch.testing.assert_close(out[K.PRED_ENERGY][0].detach(), expected_e, rtol=0, atol=1e-10)
        torch.testing.assert_close(out[K.PRED_FORCES].detach(), expected_f, rtol=0, atol=1e-10)
        assert expected_f.abs().max() > 1e-3


def test_loop_positions_enter_through_sample():
    """The loop version must see the positions it is given (guards the test helper itself)."""
    torch.manual_seed(0)
    model = build_model("egnn_paper", SMALL).double()
    sample = water_dimer()
    moved = torch.tensor(sample[K.POSITIONS] * 1.01)
    assert abs(float(loop_energy(model, sample) - loop_energy(model, sample, moved))) > 1e-8


def training_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(batch, compute_forces=True)
    loss = (out[K.PRED_ENERGY] ** 2).sum() * 1e-3 + (out[K.PRED_FORCES] ** 2).sum()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fast", [{"recompute": False}, {"recompute": True},
                                  {"recompute": True, "recompute_chunk": 7}])   # 7 edges: many chunks, a ragged last
def test_fast_equals_reference_in_training_including_double_backward(fast):
    """Energy, forces and every parameter gradient of an energy + force loss (double backward) agree."""
    torch.manual_seed(0)
    reference = build_model("egnn_paper", {**SMALL, "implementation": "reference"}).double().train()
    model = build_model("egnn_paper", {**SMALL, "implementation": "fast", **fast}).double().train()
    model.load_state_dict(reference.state_dict())
    batch = to_batch([water_dimer(), water_box(8, seed=2)], model.config.cutoff)
    expected, got = training_grads(reference, batch), training_grads(model, batch)
    assert set(expected) == set(got) and len(got) == len(list(model.parameters()))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-11, msg=name)


def test_detached_normaliser_makes_forces_differ_from_the_exact_gradient():
    """With the authors' detach, F is not −∂E/∂x where coordinates move; without it, it is (battery above)."""
    torch.manual_seed(0)
    model = build_model("egnn_paper", {**SMALL, "detach_norm": True}).double().eval()
    exact = build_model("egnn_paper", {**SMALL, "detach_norm": False}).double().eval()
    exact.load_state_dict(model.state_dict())
    batch = to_batch([water_box(8, seed=2)], model.config.cutoff)
    torch.testing.assert_close(model(batch)[K.PRED_ENERGY], exact(batch)[K.PRED_ENERGY], rtol=0, atol=1e-12)
    assert (model(batch)[K.PRED_FORCES] - exact(batch)[K.PRED_FORCES]).abs().max() > 1e-6


def test_config_rejects_negative_recompute_chunk():
    with pytest.raises(ValueError, match="recompute_chunk must be >= 0 edges"):
        PaperEGNNConfig(recompute=True, recompute_chunk=-1)


def test_config_rejects_unknown_implementation():
    with pytest.raises(ValueError, match=r"implementation must be one of \['fast', 'reference'\]"):
        PaperEGNNConfig(implementation="slow")


def test_paper_size_has_about_0_6_million_parameters():
    n = sum(p.numel() for p in build_model("egnn_paper", {}).parameters())
    assert 0.55e6 < n < 0.70e6, n
