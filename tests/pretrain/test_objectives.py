import math

import pytest
import torch

from pretrain.objectives import cosine_mask_loss, denoise_loss, energy_force_loss


def unit(v):
    return v / v.norm(dim=-1, keepdim=True)


def test_cosine_loss_zero_for_perfect_and_two_for_opposite_predictions():
    torch.manual_seed(0)
    target = unit(torch.randn(10, 3))
    flag = torch.tensor([1, 0] * 5)
    noise = torch.randn(10, 3) * 100 * (1 - flag[:, None])  # unflagged atoms must not matter
    # per atom any positive magnitudes are perfect; pooled, only a common magnitude is
    for pooled, scale in ((False, torch.rand(10, 1) * 5 + 0.1), (True, 2.5)):
        perfect = cosine_mask_loss(target * scale + noise, target, flag, pooled=pooled)
        opposite = cosine_mask_loss(-target * scale + noise, target, flag, pooled=pooled)
        assert abs(float(perfect)) < 1e-6 and abs(float(opposite) - 2.0) < 1e-6


def test_pooled_weights_atoms_by_prediction_size_per_atom_does_not():
    target = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    pred = torch.tensor([[3.0, 0, 0], [0, -1.0, 0]])   # big and right, small and wrong
    flag = torch.tensor([1, 1])
    per_atom = cosine_mask_loss(pred, target, flag)
    pooled = cosine_mask_loss(pred, target, flag, pooled=True)
    assert abs(float(per_atom) - 1.0) < 1e-6                         # 1 - (1 + -1)/2
    expected = 1 - (3 - 1) / (math.sqrt(10) * math.sqrt(2))
    assert abs(float(pooled) - expected) < 1e-6 and float(pooled) < float(per_atom)


def test_cosine_loss_without_flagged_atoms_is_zero_and_differentiable():
    pred = torch.randn(4, 3, requires_grad=True)
    loss = cosine_mask_loss(pred, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert float(loss) == 0.0 and torch.equal(pred.grad, torch.zeros(4, 3))


def test_cosine_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        cosine_mask_loss(torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4))


def test_denoise_loss_is_mse():
    pred, noise = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    assert float(denoise_loss(noise.clone(), noise)) == 0.0
    assert abs(float(denoise_loss(pred, noise)) - 13.0 / 3) < 1e-6


def test_energy_force_loss_per_atom_normalised_kinds():
    energy = torch.tensor([-29944.125, -14972.5], dtype=torch.float64)
    natoms = torch.tensor([192, 96])
    pred_energy = energy + torch.tensor([1.92, -0.96], dtype=torch.float64)   # +0.01, -0.01 eV/atom
    forces = torch.randn(288, 3)
    pred_forces = forces + 0.1
    kwargs = dict(natoms=natoms, energy_scale=0.5)
    zero = energy_force_loss(energy, energy, forces, forces, **kwargs)
    assert float(zero) == 0.0 and zero.dim() == 0 and zero.dtype == torch.float32
    only_e = energy_force_loss(pred_energy, energy, forces, forces, force_weight=0.0, **kwargs)
    assert abs(float(only_e) - 0.01 / 0.5) < 1e-6
    only_f = energy_force_loss(energy, energy, pred_forces, forces, energy_weight=0.0, force_weight=500.0, **kwargs)
    assert abs(float(only_f) - 500 * 0.1 / 0.5) < 1e-3
    l2 = energy_force_loss(pred_energy, energy, pred_forces, forces, kind="l2", energy_weight=2.0, **kwargs)
    assert abs(float(l2) - (2 * 0.02**2 + 0.2**2)) < 1e-6
    huber = energy_force_loss(pred_energy, energy, pred_forces, forces, kind="huber", huber_delta=0.1, **kwargs)
    assert abs(float(huber) - (0.5 * 0.02**2 + 0.1 * (0.2 - 0.05))) < 1e-6
    with pytest.raises(ValueError, match=r"'l3' is not one of \['l1', 'l2', 'huber'\]"):
        energy_force_loss(energy, energy, forces, forces, kind="l3", **kwargs)


def test_energy_force_loss_backpropagates_to_predictions():
    pred_energy = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    pred_forces = torch.zeros(3, 3, requires_grad=True)
    loss = energy_force_loss(pred_energy, torch.tensor([0.0], dtype=torch.float64), pred_forces,
                             torch.ones(3, 3), torch.tensor([3]))
    loss.backward()
    assert float(pred_energy.grad) > 0 and (pred_forces.grad < 0).all()
