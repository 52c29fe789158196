"""hmask targets (`objective.h_mask_target`): nearest deleted H (atom → H, within the radius) and the
reference's farthest deleted H (H → atom, every remaining atom), checked against vectors worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from data_shards import keys as K
from data_shards.config_io import ConfigError
from pretrain.transforms import HydrogenMasking
from tests.helpers.pretraining import cfg_with
from tests.helpers.water_systems import make_sample

# C at the origin, O on +x, H1 on +y (1 Å from C), H2 on +z (2 Å from C)
SPECIES = [6, 8, 1, 1]
POSITIONS = [[0.0, 0.0, 0.0], [1.4, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]
O_TO_H1 = np.array([-1.4, 1.0, 0.0]) / np.sqrt(1.4**2 + 1.0)     # |O-H1| = 1.720 Å
H2_TO_O = np.array([1.4, 0.0, -2.0]) / np.sqrt(1.4**2 + 4.0)     # |O-H2| = 2.441 Å


def molecule(**kwargs):
    return make_sample(SPECIES, POSITIONS, source="hand.xyz", **kwargs)


def test_nearest_points_each_flagged_atom_at_its_nearest_deleted_h():
    out = HydrogenMasking(p=1.0, seed=0, target="nearest")(molecule(), 0)  # p = 1: both H deleted
    assert out[K.SPECIES].tolist() == [6, 8]
    assert out[K.MASK_FLAG].tolist() == [1, 1]
    np.testing.assert_allclose(out[K.MASK_TARGET][0], [0.0, 1.0, 0.0], atol=1e-12)  # C → H1 (1 Å < 2 Å)
    np.testing.assert_allclose(out[K.MASK_TARGET][1], O_TO_H1, atol=1e-12)          # O → H1 (1.72 < 2.44)


def test_nearest_flags_only_atoms_within_the_radius():
    out = HydrogenMasking(p=1.0, seed=0, radius=1.5, target="nearest")(molecule(), 0)
    assert out[K.MASK_FLAG].tolist() == [1, 0]  # O's nearest deleted H is 1.72 Å away
    np.testing.assert_allclose(out[K.MASK_TARGET][1], [0.0, 0.0, 0.0])


def test_farthest_points_from_the_farthest_deleted_h_to_every_atom():
    out = HydrogenMasking(p=1.0, seed=0, radius=1.5, target="farthest")(molecule(), 0)  # radius unused
    assert out[K.MASK_FLAG].tolist() == [1, 1]
    np.testing.assert_allclose(out[K.MASK_TARGET][0], [0.0, 0.0, -1.0], atol=1e-12)  # H2 → C
    np.testing.assert_allclose(out[K.MASK_TARGET][1], H2_TO_O, atol=1e-12)            # H2 → O


def test_targets_use_the_minimum_image_in_a_periodic_cell():
    # in a 4 Å cubic box H2 at z = 2 is 2 Å from C either way; move it to z = 3.5: its image is 0.5 Å below C
    positions = [[0.0, 0.0, 0.0], [1.4, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.5]]
    sample = make_sample(SPECIES, positions, cell=np.eye(3) * 4.0, pbc=(True, True, True))
    near = HydrogenMasking(p=1.0, seed=0, target="nearest")(sample, 0)
    np.testing.assert_allclose(near[K.MASK_TARGET][0], [0.0, 0.0, -1.0], atol=1e-12)  # C → image of H2
    far = HydrogenMasking(p=1.0, seed=0, target="farthest")(sample, 0)
    np.testing.assert_allclose(far[K.MASK_TARGET][0], [0.0, -1.0, 0.0], atol=1e-12)   # H1 → C (1 Å > 0.5 Å)


def test_one_deleted_h_both_targets_agree_up_to_sign():
    """With a single deleted H, nearest and farthest pick the same H and point in opposite directions."""
    sample = make_sample([6, 1], [[0.0, 0.0, 0.0], [0.0, 0.0, 1.1]])
    near = HydrogenMasking(p=1.0, seed=0, target="nearest")(sample, 0)
    far = HydrogenMasking(p=1.0, seed=0, target="farthest")(sample, 0)
    np.testing.assert_allclose(near[K.MASK_TARGET], [[0.0, 0.0, 1.0]])
    np.testing.assert_allclose(far[K.MASK_TARGET], [[0.0, 0.0, -1.0]])


@pytest.mark.parametrize("target", ["nearest", "farthest"])
def test_seeded_and_deterministic(target):
    # 12 H on a ring around a C: which H are deleted depends on (seed, epoch, sample key) only
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    ring = np.column_stack([np.cos(angles), np.sin(angles), np.zeros(12)]) * 1.1
    sample = make_sample([6] + [1] * 12, np.vstack([[0.0, 0.0, 0.0], ring]))
    a = HydrogenMasking(p=0.5, seed=3, target=target)(sample, 4)
    b = HydrogenMasking(p=0.5, seed=3, target=target)(dict(sample), 4)
    for name in (K.SPECIES, K.POSITIONS, K.MASK_FLAG, K.MASK_TARGET):
        np.testing.assert_array_equal(a[name], b[name])
    other_epochs = [HydrogenMasking(p=0.5, seed=3, target=target)(sample, e)[K.POSITIONS] for e in range(5, 9)]
    assert any(len(o) != len(a[K.POSITIONS]) or not np.array_equal(o, a[K.POSITIONS]) for o in other_epochs)


def test_config_key_is_validated_and_reaches_the_transform():
    from pretrain.config import resume_relevant
    from pretrain.loop import make_transform

    cfg = cfg_with(objective={"kind": "hmask", "h_mask_target": "farthest"})
    assert make_transform(cfg, 0).target == "farthest"
    assert make_transform(cfg_with(objective={"kind": "hmask"}), 0).target == "nearest"
    assert resume_relevant(cfg)["objective.h_mask_target"] == "farthest"
    assert "objective.h_mask_target" not in resume_relevant(cfg_with())  # default: old checkpoints resume
    with pytest.raises(ConfigError, match=r"h_mask_target 'sum'.*'nearest', 'farthest'"):
        cfg_with(objective={"h_mask_target": "sum"})
    with pytest.raises(ValueError, match="farthest"):
        HydrogenMasking(target="middle")
