import numpy as np
import pytest

from data_shards import keys as K
from data_shards.frame import FrameError
from pretrain.transforms import Compose, Denoising, HydrogenMasking, MaskDenoise, WaterMasking, minimum_image
from tests.helpers.water_systems import make_sample, water_box, water_dimer


def deleted_positions(original: dict, masked: dict) -> np.ndarray:
    """Rows of the original positions missing from the masked sample."""
    kept = {tuple(np.round(p, 12)) for p in masked[K.POSITIONS]}
    return np.array([p for p in original[K.POSITIONS] if tuple(np.round(p, 12)) not in kept])


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_masking_deletes_one_h_in_floor_ratio_molecules(ratio):
    box = water_box(32, seed=1, labelled=True)
    out = WaterMasking(ratio=ratio, seed=0)(box, epoch=0)
    n_sel = int(np.floor(32 * ratio))
    assert len(out[K.SPECIES]) == 96 - n_sel
    assert (box[K.SPECIES] == 1).sum() - (out[K.SPECIES] == 1).sum() == n_sel
    assert K.ENERGY not in out and K.FORCES not in out
    assert out[K.POSITIONS].shape == (96 - n_sel, 3) and out[K.MASK_TARGET].shape == (96 - n_sel, 3)
    assert out[K.MASK_FLAG].sum() == 2 * n_sel


def test_flags_are_exactly_the_survivors_of_picked_molecules_and_targets_point_at_deleted_h():
    box = water_box(32, seed=2)
    out = WaterMasking(ratio=0.5, seed=3)(box, epoch=1)
    removed = deleted_positions(box, out)
    pos, flag, target = out[K.POSITIONS], out[K.MASK_FLAG], out[K.MASK_TARGET]
    molecule_of = {tuple(np.round(p, 12)): i // 3 for i, p in enumerate(box[K.POSITIONS])}
    picked = {molecule_of[tuple(np.round(p, 12))] for p in removed}
    for atom, p in enumerate(pos):
        in_picked = molecule_of[tuple(np.round(p, 12))] in picked
        assert flag[atom] == int(in_picked)
        if not in_picked:
            assert np.all(target[atom] == 0)
            continue
        gone = [r for r in removed if molecule_of[tuple(np.round(r, 12))] == molecule_of[tuple(np.round(p, 12))]]
        assert len(gone) == 1
        expected = minimum_image((gone[0] - p)[None], box[K.CELL], box[K.PBC])[0]
        np.testing.assert_allclose(target[atom], expected / np.linalg.norm(expected), atol=1e-12)
        assert np.linalg.norm(expected) < 1.6  # a bonded partner, not a far image
    np.testing.assert_allclose(np.linalg.norm(target[flag == 1], axis=1), 1.0, atol=1e-12)


def test_target_uses_minimum_image_across_the_periodic_boundary():
    length = 10.0
    cell = np.array([[length, 0, 0], [2.0, length, 0], [0.5, 1.0, length]])  # triclinic
    # O near the x=0 face, H's across the boundary (wrapped to the far side of the cell)
    oxygen = np.array([0.1, 5.0, 5.0])
    h1 = oxygen + np.array([-0.6, 0.7, 0.2])
    h2 = oxygen + np.array([-0.7, -0.6, 0.1])
    raw = np.stack([oxygen, h1, h2])
    frac = raw @ np.linalg.inv(cell)
    wrapped = (frac % 1.0) @ cell
    assert wrapped[1, 0] > 5 and wrapped[2, 0] > 5  # the H's really sit on the other side
    sample = make_sample([8, 1, 1], wrapped, cell, (True, True, True))
    out = WaterMasking(ratio=1.0, seed=0)(sample, epoch=0)
    deleted = 1 if np.allclose(out[K.POSITIONS][1], wrapped[2]) else 2
    survivor = 3 - deleted
    bond = raw[deleted] - raw[[0, survivor]]
    expected = bond / np.linalg.norm(bond, axis=1, keepdims=True)
    np.testing.assert_allclose(out[K.MASK_TARGET], expected, atol=1e-12)
    np.testing.assert_array_equal(out[K.MASK_FLAG], [1, 1])


def test_same_seed_epoch_key_repeat_and_epoch_changes_mask():
    box = water_box(32, seed=4)
    masking = WaterMasking(0.5, seed=7)
    first, again = masking(box, 3), WaterMasking(0.5, seed=7)(dict(box), 3)
    np.testing.assert_array_equal(first[K.POSITIONS], again[K.POSITIONS])
    np.testing.assert_array_equal(first[K.MASK_FLAG], again[K.MASK_FLAG])
    other_epoch = masking(box, 4)
    other_seed = WaterMasking(0.5, seed=8)(box, 3)
    for other in (other_epoch, other_seed):
        assert not np.array_equal(first[K.POSITIONS], other[K.POSITIONS])


def test_masking_refuses_bad_order_non_water_and_bad_ratio():
    box = water_box(4, seed=0)
    scrambled = dict(box, **{K.SPECIES: box[K.SPECIES][::-1].copy(), K.POSITIONS: box[K.POSITIONS][::-1].copy()})
    with pytest.raises(FrameError, match=r"water_box_4_seed0, frame 0, field 'species'.*O,H,H"):
        WaterMasking()(scrambled, 0)
    no_h = make_sample([8, 8, 6], np.eye(3) * 2.0, source="co2.xyz", frame_index=5)
    with pytest.raises(FrameError, match=r"co2.xyz, frame 5.*no H atoms"):
        WaterMasking()(no_h, 0)
    for ratio in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            WaterMasking(ratio=ratio)
    with pytest.raises(ValueError, match="nearest_oxygen"):
        WaterMasking(grouping="bonds")


def test_nearest_oxygen_grouping_handles_all_oxygens_first():
    box = water_box(16, seed=5)
    order = np.concatenate([np.arange(0, 48, 3), np.arange(1, 48, 3), np.arange(2, 48, 3)])
    sorted_sample = dict(box, **{K.SPECIES: box[K.SPECIES][order], K.POSITIONS: box[K.POSITIONS][order]})
    molecules = WaterMasking(grouping="nearest_oxygen").molecules(sorted_sample)
    regrouped = np.sort(order[molecules], axis=1)  # back to indices of the O,H,H layout
    np.testing.assert_array_equal(regrouped, np.arange(48).reshape(-1, 3))
    out = WaterMasking(0.5, grouping="nearest_oxygen")(sorted_sample, 0)
    assert out[K.MASK_FLAG].sum() == 16 and len(out[K.SPECIES]) == 40


def test_denoising_adds_reproducible_noise_and_wraps():
    box = water_box(8, seed=6, labelled=True)
    out = Denoising(sigma=0.2, seed=1)(box, epoch=2)
    noise = out[K.NOISE_TARGET]
    assert noise.shape == box[K.POSITIONS].shape and 0.15 < noise.std() < 0.25
    frac = out[K.POSITIONS] @ np.linalg.inv(box[K.CELL])
    assert (frac >= 0).all() and (frac < 1).all()
    moved = minimum_image(out[K.POSITIONS] - box[K.POSITIONS], box[K.CELL], box[K.PBC])
    np.testing.assert_allclose(moved, noise, atol=1e-10)
    assert K.ENERGY not in out and K.FORCES not in out
    np.testing.assert_array_equal(Denoising(0.2, seed=1)(box, 2)[K.NOISE_TARGET], noise)
    assert not np.array_equal(Denoising(0.2, seed=1)(box, 3)[K.NOISE_TARGET], noise)
    dimer = water_dimer()
    out = Denoising(0.5, seed=0)(dimer, 0)  # no cell: no wrapping
    np.testing.assert_allclose(out[K.POSITIONS] - dimer[K.POSITIONS], out[K.NOISE_TARGET])
    with pytest.raises(ValueError, match="sigma"):
        Denoising(sigma=0.0)


def test_mask_denoise_composes_both():
    box = water_box(8, seed=7)
    out = MaskDenoise(ratio=0.5, sigma=0.1, seed=2)(box, 0)
    masked = WaterMasking(0.5, seed=2)(box, 0)
    np.testing.assert_array_equal(out[K.MASK_FLAG], masked[K.MASK_FLAG])
    np.testing.assert_array_equal(out[K.MASK_TARGET], masked[K.MASK_TARGET])
    assert out[K.NOISE_TARGET].shape == (len(masked[K.SPECIES]), 3)
    same = Compose([WaterMasking(0.5, seed=2), Denoising(0.1, seed=2)])(box, 0)
    np.testing.assert_array_equal(same[K.POSITIONS], out[K.POSITIONS])


def test_hydrogen_masking_targets_nearest_deleted_h():
    positions = np.array([[0.0, 0, 0], [1.5, 0, 0], [-0.5, 0.9, 0], [-0.5, -0.9, 0], [2.0, 0.9, 0.0],
                          [2.0, -0.9, 0.0], [1.8, 0, 1.0], [0.0, 0.0, 1.1], [-0.4, 0.0, -1.0]])
    ethanol_like = make_sample([6, 6, 1, 1, 1, 1, 1, 1, 8], positions, source="ethanol.xyz")
    out = HydrogenMasking(p=0.5, seed=0)(ethanol_like, 0)
    removed = deleted_positions(ethanol_like, out)
    assert len(removed) >= 1 and (out[K.SPECIES] == 1).sum() == 6 - len(removed)
    for atom in np.flatnonzero(out[K.MASK_FLAG]):
        d = removed - out[K.POSITIONS][atom]
        nearest = d[np.argmin(np.linalg.norm(d, axis=1))]
        np.testing.assert_allclose(out[K.MASK_TARGET][atom], nearest / np.linalg.norm(nearest), atol=1e-12)
    assert out[K.MASK_FLAG].sum() == len(out[K.SPECIES])  # every atom within 5 Å of a deleted H
    with pytest.raises(FrameError, match="no H atoms"):
        HydrogenMasking()(make_sample([8, 8], np.eye(2, 3)), 0)


@pytest.mark.needs_shared_data
def test_dft_water_listing_all_oxygens_first_is_refused_by_ohh_and_grouped_by_nearest_oxygen(shared_data):
    from data_shards.readers import iter_frames

    frame = next(iter(iter_frames(shared_data / "water_deepmd" / "data" / "data_0", stop=1)))
    sample = make_sample(frame.species, frame.positions, frame.cell, frame.pbc, source=frame.source,
                         frame_index=frame.index)
    with pytest.raises(FrameError, match="O,H,H"):
        WaterMasking()(sample, 0)
    out = WaterMasking(0.5, grouping="nearest_oxygen")(sample, 0)
    assert out[K.MASK_FLAG].sum() == 64 and len(out[K.SPECIES]) == 192 - 32
    bonded = []
    for atom in np.flatnonzero(out[K.MASK_FLAG]):  # every target points at an H of the same molecule
        d = minimum_image(frame.positions - out[K.POSITIONS][atom], frame.cell, frame.pbc)
        cosines = d @ out[K.MASK_TARGET][atom] / np.linalg.norm(d, axis=1).clip(1e-9)
        bonded.append(np.linalg.norm(d[np.argmax(cosines)]) < 2.0 and cosines.max() > 1 - 1e-6)
    assert all(bonded)
