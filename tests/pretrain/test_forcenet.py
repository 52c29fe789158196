"""ForceNet-style model (force-centric): physics checks of the mixin in force-centric mode, config validation,
the edge basis, the blocks written plainly, and a short real finetune that lowers the force error."""
import math

import numpy as np
import pytest
import torch

from data_shards import keys as K
from data_shards.config_io import ConfigError
from finetune.forcefield import metrics as M
from pretrain.models import MODELS, build_model
from pretrain.models.egnn import cosine_envelope
from pretrain.models.forcenet import ForceNet, ForceNetConfig, spherical_harmonics
from tests.helpers.model_mixin import ROTATION_FORCE_BOUND, ModelTestMixin, build_water_shards, quick_finetune
from tests.helpers.water_systems import to_batch, water_box, water_dimer

SMALL = {"hidden": 16, "blocks": 3, "decoder_hidden": 16, "num_radial": 8}


class TestForceNet(ModelTestMixin):
    rotation_bounds = {"energy": 0.004, "force": ROTATION_FORCE_BOUND}   # measured 0.0019 and 2.34

    def build(self):
        return build_model("forcenet", SMALL)


class TestForceNetDistanceOnlyBasis(ModelTestMixin):
    # degree-0 edge basis: the energy sees distances only and is invariant to round-off (measured 2e-15)
    rotation_bounds = {"energy": 1e-12, "force": ROTATION_FORCE_BOUND}   # force measured 2.07

    def build(self):
        return build_model("forcenet", {**SMALL, "max_degree": 0, "activation": "relu"})


def test_registry_and_config_validation():
    assert MODELS["forcenet"] == (ForceNetConfig, ForceNet)
    assert build_model("forcenet").config == ForceNetConfig(hidden=128, blocks=5, cutoff=3.4)
    with pytest.raises(ConfigError, match=r"max_degree must be one of \[0, 1, 2\]"):
        build_model("forcenet", {"max_degree": 3})
    with pytest.raises(ConfigError, match=r"activation 'gelu' is not one of \['relu', 'silu'\]"):
        build_model("forcenet", {"activation": "gelu"})
    for key in ("hidden", "blocks", "num_radial", "decoder_hidden"):
        with pytest.raises(ConfigError, match=f"{key} must be >= 1"):
            build_model("forcenet", {key: 0})
    with pytest.raises(ConfigError, match="cutoff must be > 0"):
        build_model("forcenet", {"cutoff": -1.0})
    assert build_model("forcenet").force_centric


def test_paper_size_parameter_count():
    n = sum(p.numel() for p in build_model("forcenet").parameters())
    print(f"ForceNet paper size: {n} parameters")
    assert 0.6e6 < n < 0.9e6


def test_spherical_harmonics_are_orthogonal_on_the_sphere():
    """Racah-normalised real harmonics: ⟨Y_a Y_b⟩ over the sphere = δ_ab / (2l + 1)."""
    unit = torch.nn.functional.normalize(torch.randn(400_000, 3, generator=torch.Generator().manual_seed(0),
                                                     dtype=torch.float64), dim=-1)
    y = spherical_harmonics(unit, 2)
    gram = y.T @ y / len(unit)
    degree = torch.tensor([0, 1, 1, 1, 2, 2, 2, 2, 2], dtype=torch.float64)
    torch.testing.assert_close(gram, torch.diag(1.0 / (2 * degree + 1)), rtol=0, atol=5e-3)
    assert spherical_harmonics(unit[:3], 1).shape == (3, 4) and spherical_harmonics(unit[:3], 0).shape == (3, 1)


def test_normalisation_scales_energy_and_forces_and_keeps_e0_in_float64():
    torch.manual_seed(0)
    model = build_model("forcenet", SMALL)
    batch = to_batch([water_dimer(), water_box(8)], model.config.cutoff, dtype=torch.float32)
    base = {k: v.detach() for k, v in model(batch).items()}
    e0 = {8: -14990.123456, 1: -13.987654}
    model.set_normalisation(0.4, e0)
    model.float()
    assert model.e0.dtype == torch.float64 and model.energy_scale.dtype == torch.float64
    out = model(batch)
    reference = torch.tensor([2 * e0[8] + 4 * e0[1], 8 * e0[8] + 16 * e0[1]], dtype=torch.float64)
    torch.testing.assert_close(out[K.PRED_ENERGY] - reference, 0.4 * base[K.PRED_ENERGY], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[K.PRED_FORCES], 0.4 * base[K.PRED_FORCES])
    assert model.species == [1, 8]
    restored = build_model("forcenet", SMALL)
    restored.load_state_dict(model.state_dict())
    torch.testing.assert_close(restored(batch)[K.PRED_FORCES], out[K.PRED_FORCES], rtol=0, atol=0)


def reference_forward(model: ForceNet, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks written plainly: one Linear on the concatenated filter input, explicit basis outer product."""
    c = model.config
    src, dst = batch[K.EDGE_INDEX]
    r = batch[K.POSITIONS][dst] - batch[K.POSITIONS][src] + batch[K.SHIFT_VECTORS]
    d = r.norm(dim=-1, keepdim=True)
    u = r / d
    centers = torch.linspace(0.0, c.cutoff, c.num_radial, dtype=r.dtype)
    radial = torch.exp(-((c.num_radial / c.cutoff) ** 2) * (d - centers) ** 2)
    x, y, z = u.T
    s3 = math.sqrt(3)
    angular = torch.stack([torch.ones_like(x), x, y, z, s3 * x * y, s3 * y * z, 1.5 * z * z - 0.5, s3 * x * z,
                           s3 / 2 * (x * x - y * y)], -1)
    basis = model.edge_basis(torch.einsum("ek,ea->eka", radial, angular).reshape(len(r), -1))
    h = model.species_embedding(batch[K.SPECIES]) + model.flag_embedding.weight[0]
    for block in model.blocks:
        weight = torch.cat([block.filter_basis.weight, block.filter_src.weight, block.filter_dst.weight], 1)
        first = torch.nn.functional.linear(torch.cat([basis, h[src], h[dst]], -1), weight, block.filter_basis.bias)
        messages = block.filter_out(first) * block.value(h)[dst] * cosine_envelope(d, c.cutoff)
        h = h + block.update(torch.zeros_like(h).index_add(0, src, messages))
    energy = torch.zeros(batch.num_graphs, dtype=h.dtype).index_add(0, batch[K.BATCH],
                                                                     model.energy_head(h).squeeze(-1))
    return energy, model.force_head(h)


def test_matches_plain_equations_with_periodic_images():
    torch.manual_seed(0)
    model = build_model("forcenet", SMALL).double()
    batch = to_batch([water_dimer(), water_box(8)], model.config.cutoff)
    energy, forces = reference_forward(model, batch)
    out = model(batch)
    torch.testing.assert_close(out[K.PRED_ENERGY], energy, rtol=0, atol=1e-10)
    torch.testing.assert_close(out[K.PRED_FORCES], forces, rtol=0, atol=1e-10)


def test_species_reach_the_output():
    """The reference code maps every water atom to oxygen; swapping O and H labels must change the output."""
    model = build_model("forcenet", SMALL).double().eval()
    box = water_box(8)
    swapped = dict(box)
    swapped[K.SPECIES] = np.where(box[K.SPECIES] == 8, 1, 8)
    a, b = (model(to_batch([s], model.config.cutoff))[K.PRED_FORCES] for s in (box, swapped))
    assert (a - b).abs().max() > 1e-6


def test_quick_finetune_lowers_validation_force_error(tmp_path):
    shards = build_water_shards(tmp_path)
    params = {"hidden": 32, "blocks": 2, "decoder_hidden": 32}
    results = quick_finetune(shards, tmp_path / "run", "forcenet", params, steps=120, lr=1e-2)
    forces = [h[M.FORCE_RMSE] for h in results["history"]]
    assert all(np.isfinite(forces)) and np.isfinite(results["final_train_loss"])
    assert min(forces[1:]) < 0.9 * forces[0], f"validation force RMSE did not decrease: {forces}"
