"""Stress by the strain derivative: against finite differences of the energy under strain, for EGNN and
MACE, in a triclinic cell too; force-centric models and cell-less structures are refused in one line."""
import numpy as np
import pytest
import torch

from data_shards import keys as K
from pretrain.models import build_model
from pretrain.models.mace import mace_modules
from pretrain.models.strain import energy_forces_stress
from tests.helpers.water_systems import to_batch, water_box

EGNN = ("egnn", {"hidden": 16, "layers": 2, "cutoff": 3.5, "coord_init_gain": 1.0})
MACE = ("mace", {"num_channels": 8, "max_L": 1, "correlation": 2, "num_interactions": 2, "max_ell": 2,
                 "r_max": 3.5, "radial_MLP": [16], "MLP_irreps": "8x0e", "avg_num_neighbors": 10.0,
                 "elements": [1, 8]})
needs_mace = pytest.mark.skipif(mace_modules() is None, reason="mace-torch is not installed")
ENERGY_CENTRIC = [EGNN, pytest.param(MACE, marks=needs_mace)]


def model_of(spec):
    torch.manual_seed(0)
    model = build_model(*spec).double().eval()
    model.set_normalisation(0.5, {1: -13.6, 8: -432.0})
    return model


def strained(sample: dict, deform: np.ndarray) -> dict:
    out = dict(sample)
    out[K.POSITIONS] = sample[K.POSITIONS] @ deform
    out[K.CELL] = sample[K.CELL] @ deform
    return out


def numerical_stress(model, sample: dict, cutoff: float, step: float = 1e-5) -> np.ndarray:
    """(1/V) dE/dε_ij by central differences of E under the symmetric strain (e_ij + e_ji)/2."""
    volume = abs(np.linalg.det(sample[K.CELL]))
    stress = np.zeros((3, 3))
    for i in range(3):
        for j in range(i, 3):
            sym = np.zeros((3, 3))
            sym[i, j] += 0.5
            sym[j, i] += 0.5
            energies = [float(model(to_batch([strained(sample, np.eye(3) + s * step * sym)], cutoff),
                                    compute_forces=False)[K.PRED_ENERGY][0]) for s in (1, -1)]
            stress[i, j] = stress[j, i] = (energies[0] - energies[1]) / (2 * step * volume)
    return stress


def triclinic_box() -> dict:
    box = water_box(8, seed=4)
    shear = np.array([[1.0, 0.0, 0.0], [0.12, 1.0, 0.0], [-0.08, 0.1, 1.03]])
    return strained(box, shear)


@pytest.mark.parametrize("spec", ENERGY_CENTRIC)
@pytest.mark.parametrize("system", [lambda: water_box(8, seed=2), triclinic_box])
def test_stress_equals_finite_differences_of_energy_under_strain(spec, system):
    model, sample = model_of(spec), system()
    cutoff = float(model.config.cutoff)
    batch = to_batch([sample], cutoff)
    out = energy_forces_stress(model, batch)
    stress = out[K.PRED_STRESS][0].numpy()
    expected = numerical_stress(model, sample, cutoff)
    assert np.abs(expected).max() > 1e-5, "the energy does not depend on strain: the test is empty"
    np.testing.assert_allclose(stress, expected, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(stress, stress.T, atol=1e-12)
    np.testing.assert_allclose(out[K.PRED_VIRIAL][0].numpy(), -stress * abs(np.linalg.det(sample[K.CELL])),
                               rtol=1e-12)
    # energy and forces are those of the plain forward pass
    plain = model(batch, compute_forces=True)
    torch.testing.assert_close(out[K.PRED_ENERGY], plain[K.PRED_ENERGY], rtol=0, atol=1e-9)
    torch.testing.assert_close(out[K.PRED_FORCES], plain[K.PRED_FORCES], rtol=0, atol=1e-9)


@pytest.mark.parametrize("spec", ENERGY_CENTRIC)
def test_batched_stress_equals_single_structures(spec):
    model = model_of(spec)
    cutoff = float(model.config.cutoff)
    samples = [water_box(8, seed=2), triclinic_box()]
    both = energy_forces_stress(model, to_batch(samples, cutoff))[K.PRED_STRESS]
    singles = torch.cat([energy_forces_stress(model, to_batch([s], cutoff))[K.PRED_STRESS] for s in samples])
    torch.testing.assert_close(both, singles, rtol=0, atol=1e-12)


def test_stress_loss_is_differentiable():
    model = model_of(EGNN).train()
    out = energy_forces_stress(model, to_batch([water_box(8, seed=2)], 3.5), create_graph=True)
    (out[K.PRED_STRESS] ** 2).sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None) > 0


def test_force_centric_model_is_refused_in_one_line():
    model = build_model("gns", {"latent": 8, "mlp_layers": 1, "steps": 1, "cutoff": 3.5}).double()
    with pytest.raises(ValueError, match=r"stress needs an energy-centric model.*GNS is force-centric") as info:
        energy_forces_stress(model, to_batch([water_box(8, seed=2)], 3.5))
    assert "\n" not in str(info.value)


def test_structure_without_cell_is_refused():
    model = model_of(EGNN)
    sample = dict(water_box(8, seed=2))
    sample[K.CELL], sample[K.PBC] = np.zeros((3, 3)), np.zeros(3, dtype=bool)
    with pytest.raises(ValueError, match=r"periodic cell with a volume; structure\(s\) \[0\]"):
        energy_forces_stress(model, to_batch([sample], 3.5))
