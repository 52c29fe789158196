import pytest
import torch

from data_shards import keys as K
from data_shards.config_io import ConfigError
from pretrain.models import MODELS, build_model
from pretrain.models.egnn import EGNN, EGNNConfig, cosine_envelope, silu
from tests.helpers.model_mixin import ModelTestMixin
from tests.helpers.water_systems import to_batch, water_box, water_dimer

SMALL = {"hidden": 16, "layers": 3, "coord_init_gain": 1.0}  # large coordinate updates: exercise them


class TestEGNN(ModelTestMixin):
    def build(self):
        return build_model("egnn", SMALL)


class TestEGNNWithoutCoordinateUpdates(ModelTestMixin):
    def build(self):
        return build_model("egnn", {**SMALL, "update_coords": False})


class TestEGNNPaperEdgeInput(ModelTestMixin):
    def build(self):
        return build_model("egnn", {**SMALL, "num_rbf": 0})


def rbf_term(layer, dist2):
    """W_g g(d) with the Gaussian basis written out independently of the layer's code."""
    if layer.edge_rbf is None:
        return 0.0
    n = layer.edge_rbf.in_features
    cutoff = float(layer.rbf_centers[-1])
    centers = torch.linspace(0.0, cutoff, n, dtype=dist2.dtype)
    basis = torch.exp(-((n / cutoff) ** 2) * (dist2.sqrt() - centers) ** 2)
    return basis @ layer.edge_rbf.weight.T


def test_registry_lists_valid_names_and_params():
    assert MODELS["egnn"] == (EGNNConfig, EGNN)
    with pytest.raises(ValueError, match=r"unknown model 'gnss'.*\['egnn', 'egnn_paper', 'forcenet', 'gns', 'mace'\]"):
        build_model("gnss", {})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['hiden'\].*valid keys.*'hidden'"):
        build_model("egnn", {"hiden": 8})
    with pytest.raises(ConfigError, match="layers must be >= 1"):
        build_model("egnn", {"layers": 0})
    model = build_model("egnn", {"hidden": 8, "cutoff": 4.0})
    assert isinstance(model.config, EGNNConfig) and model.config.cutoff == 4.0


def test_paper_size_has_about_0_6_million_parameters():
    n = sum(p.numel() for p in build_model("egnn", {"num_rbf": 0}).parameters())
    assert 0.55e6 < n < 0.65e6


def test_split_first_layer_equals_linear_on_concatenation():
    torch.manual_seed(0)
    layer = build_model("egnn", {"hidden": 8, "layers": 1}).layers[0].double()
    h = torch.randn(5, 8, dtype=torch.float64)
    src, dst = torch.tensor([0, 1, 4, 2]), torch.tensor([3, 0, 1, 2])
    dist2 = torch.rand(4, 1, dtype=torch.float64)
    weight = torch.cat([layer.edge_src.weight, layer.edge_dst.weight, layer.edge_dist[:, None]], dim=1)
    expected = torch.nn.functional.linear(torch.cat([h[src], h[dst], dist2], -1), weight, layer.edge_src.bias)
    assert layer.edge_rbf is not None
    expected = expected + rbf_term(layer, dist2)
    torch.testing.assert_close(layer.edge_input(h, src, dst, dist2), expected)


def test_normalisation_scales_network_and_adds_e0_in_float64():
    torch.manual_seed(0)
    model = build_model("egnn", {"hidden": 8, "layers": 2})  # float32 weights
    batch = to_batch([water_dimer(), water_box(8)], model.config.cutoff, dtype=torch.float32)
    base = model(batch)[K.PRED_ENERGY].detach()
    e0 = {8: -14990.123456, 1: -13.987654}
    model.set_normalisation(2.5, e0)
    model.float()  # casting must keep the reference energies exact
    assert model.e0.dtype == torch.float64 and model.energy_scale.dtype == torch.float64
    out = model(batch)
    assert out[K.PRED_ENERGY].dtype == torch.float64
    reference = torch.tensor([2 * e0[8] + 4 * e0[1], 8 * e0[8] + 16 * e0[1]], dtype=torch.float64)
    torch.testing.assert_close(out[K.PRED_ENERGY] - reference, 2.5 * base, rtol=1e-5, atol=1e-5)
    assert model.species == [1, 8]
    restored = build_model("egnn", {"hidden": 8, "layers": 2})
    restored.load_state_dict(model.state_dict())
    torch.testing.assert_close(restored(batch)[K.PRED_ENERGY], out[K.PRED_ENERGY], rtol=0, atol=1e-9)


def test_normalisation_rejects_bad_values():
    model = build_model("egnn", {"hidden": 8, "layers": 1})
    with pytest.raises(ValueError, match="energy_scale"):
        model.set_normalisation(0.0, {})
    with pytest.raises(ValueError, match="Z=0"):
        model.set_normalisation(1.0, {0: 1.0})


def test_compute_forces_false_gives_energy_only():
    model = build_model("egnn", {"hidden": 8, "layers": 2}).double()
    out = model(to_batch([water_dimer()], model.config.cutoff), compute_forces=False)
    assert set(out) == {K.PRED_ENERGY}


def test_envelope_is_one_at_zero_and_vanishes_with_its_slope_at_cutoff():
    d = torch.tensor([0.0, 3.5 - 1e-6, 3.5, 4.0], dtype=torch.float64, requires_grad=True)
    env = cosine_envelope(d, 3.5)
    (slope,) = torch.autograd.grad(env.sum(), d)
    torch.testing.assert_close(env.detach(), torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert slope.abs().max() < 1e-5


def reference_energy(model: EGNN, batch) -> torch.Tensor:
    """The EGNN equations written plainly: positions updated, edge vectors recomputed from them."""
    silu = torch.nn.functional.silu
    src, dst = batch[K.EDGE_INDEX]
    x, shift = batch[K.POSITIONS], batch[K.SHIFT_VECTORS]
    h = model.species_embedding(batch[K.SPECIES]) + model.flag_embedding(torch.zeros_like(batch[K.SPECIES]))
    envelope = cosine_envelope((x[dst] - x[src] + shift).norm(dim=-1, keepdim=True), model.config.cutoff)
    for layer in model.layers:
        x_i_minus_x_j = x[src] - (x[dst] + shift)
        dist2 = (x_i_minus_x_j**2).sum(-1, keepdim=True)
        weight = torch.cat([layer.edge_src.weight, layer.edge_dst.weight, layer.edge_dist[:, None]], dim=1)
        first = torch.nn.functional.linear(torch.cat([h[src], h[dst], dist2], -1), weight, layer.edge_src.bias)
        first = first + rbf_term(layer, dist2)
        m = silu(layer.edge_out(silu(first)))
        if layer.coord_mlp is not None:
            step = x_i_minus_x_j / (dist2.sqrt() + 1) * layer.coord_mlp(m) * envelope
            x = x + torch.zeros_like(x).index_add(0, src, step)
        aggregated = torch.zeros_like(h).index_add(0, src, m * envelope)
        h = h + layer.node_mlp(torch.cat([h, aggregated], -1))
    atom_energy = model.energy_head(h).squeeze(-1)
    return torch.zeros(batch.num_graphs, dtype=h.dtype).index_add(0, batch[K.BATCH], atom_energy)


def test_matches_plain_egnn_equations_with_periodic_images():
    torch.manual_seed(0)
    model = build_model("egnn", {**SMALL, "layers": 4}).double()
    batch = to_batch([water_dimer(), water_box(8)], model.config.cutoff)
    expected = reference_energy(model, batch)
    assert model.layers[0].coord_mlp is not None and model.layers[-1].coord_mlp is None
    torch.testing.assert_close(model(batch)[K.PRED_ENERGY], expected, rtol=0, atol=1e-10)


def test_fused_silu_matches_torch_to_second_order():
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(silu, (x,))
    ours, = torch.autograd.grad(silu(x).sum(), x, create_graph=True)
    reference, = torch.autograd.grad(torch.nn.functional.silu(x).sum(), x, create_graph=True)
    torch.testing.assert_close(ours, reference)
    second_ours, = torch.autograd.grad((ours**3).sum(), x)
    second_reference, = torch.autograd.grad((reference**3).sum(), x)
    torch.testing.assert_close(second_ours, second_reference)
