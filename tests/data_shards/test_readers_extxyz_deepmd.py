"""Readers: extxyz and DeePMD round trips, counting, slicing, the real water set, and every bad-input case."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from data_shards import keys as K
from data_shards import readers
from data_shards.frame import Frame, FrameError
from tests.helpers.shards import write_deepmd_system

# ------------------------------------------------------------------------------------------ helpers


def random_atoms(rng: np.random.Generator, n_molecules: int, periodic: bool = True) -> Atoms:
    species = np.tile([8, 1, 1], n_molecules)
    side = 3.1 * n_molecules ** (1 / 3)
    atoms = Atoms(numbers=species, positions=rng.uniform(0, side, size=(len(species), 3)),
                  cell=np.diag([side, side * 1.1, side * 0.9]) if periodic else None, pbc=periodic)
    return atoms


def labelled(atoms: Atoms, rng: np.random.Generator) -> Atoms:
    atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal(-100, 5)),
                                       forces=rng.normal(size=(len(atoms), 3)))
    return atoms


def write_extxyz_text(path: Path, frames_text: list[str]) -> Path:
    path.write_text("".join(frames_text))
    return path


GOOD_FRAME = ('3\nLattice="5 0 0 0 5 0 0 0 5" Properties=species:S:1:pos:R:3:forces:R:3 energy=-1.5 pbc="T T T"\n'
              "O 0.0 0.0 0.0 0.1 0.2 0.3\nH 0.96 0.0 0.0 -0.1 0.0 0.0\nH -0.24 0.93 0.0 0.0 -0.2 -0.3\n")


def frame_text(atom_lines: list[str], header: str = "Properties=species:S:1:pos:R:3:forces:R:3 energy=-1.5") -> str:
    return f"{len(atom_lines)}\n{header}\n" + "".join(line + "\n" for line in atom_lines)


def expect_frame_error(path: Path, frame: int, field_name: str, **options) -> FrameError:
    with pytest.raises(FrameError) as info:
        readers.read_frames(path, **options)
    err = info.value
    assert (err.frame, err.field) == (frame, field_name), str(err)
    message = str(err)
    assert Path(err.source).name in message and f"frame {frame}" in message and field_name in message
    return err


# ------------------------------------------------------------------------------------------ extxyz


def test_extxyz_round_trip_count_and_slicing(tmp_path):
    rng = np.random.default_rng(1)
    originals = [labelled(random_atoms(rng, m, periodic=m % 2 == 0), rng) for m in (2, 3, 4, 5, 6, 7)]
    path = tmp_path / "set.extxyz"
    write(path, originals, format="extxyz")

    assert readers.detect_format(path) == "extxyz"
    assert readers.count_frames(path) == len(originals)
    frames = readers.read_frames(path)
    assert len(frames) == len(originals)
    for i, (frame, atoms) in enumerate(zip(frames, originals)):
        assert isinstance(frame, Frame) and frame.index == i and frame.source == str(path)
        np.testing.assert_array_equal(frame.species, atoms.numbers)
        assert frame.species.dtype == np.int64
        np.testing.assert_allclose(frame.positions, atoms.positions, atol=1e-7)
        np.testing.assert_allclose(frame.cell, atoms.cell.array, atol=1e-12)
        np.testing.assert_array_equal(frame.pbc, atoms.pbc)
        assert frame.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(frame.forces, atoms.get_forces(), atol=1e-7)

    part = list(readers.iter_frames(path, start=2, stop=5))
    assert [f.index for f in part] == [2, 3, 4]
    for f in part:
        np.testing.assert_array_equal(f.positions, frames[f.index].positions)
    assert [f.index for f in readers.iter_frames(path, start=4)] == [4, 5]
    assert list(readers.iter_frames(path, start=6)) == []
    assert [f.index for f in readers.iter_frames(path, stop=1)] == [0]


def test_extxyz_custom_label_keys_and_unlabelled(tmp_path):
    rng = np.random.default_rng(2)
    atoms = random_atoms(rng, 2)
    atoms.info["REF_energy"] = -7.25
    atoms.arrays["REF_forces"] = rng.normal(size=(6, 3))
    atoms.info["config_type"] = "bulk"
    path = tmp_path / "ref.xyz"
    write(path, [atoms], format="extxyz")

    (frame,) = readers.read_frames(path, energy_key="REF_energy", forces_key="REF_forces")
    assert frame.energy == -7.25
    np.testing.assert_allclose(frame.forces, atoms.arrays["REF_forces"], atol=1e-7)
    assert frame.info["config_type"] == "bulk" and "REF_energy" not in frame.info

    (plain,) = readers.read_frames(path, require_labels=False)  # default keys find nothing
    assert plain.energy is None and plain.forces is None


def test_extxyz_count_matches_many_frames_with_blank_lines(tmp_path):
    path = write_extxyz_text(tmp_path / "many.extxyz", [GOOD_FRAME, "\n"] * 50)
    assert readers.count_frames(path) == 50 == len(readers.read_frames(path))


@pytest.mark.parametrize("case, atom_lines, header, field_name", [
    ("missing energy", ["O 0 0 0 0 0 0", "H 1 0 0 0 0 0"], "Properties=species:S:1:pos:R:3:forces:R:3",
     K.ENERGY),
    ("NaN force", ["O 0 0 0 0 nan 0", "H 1 0 0 0 0 0"], None, K.FORCES),
    ("wrong-shape forces", ["O 0 0 0 0 0", "H 1 0 0 0 0"], "Properties=species:S:1:pos:R:3:forces:R:2 energy=1",
     K.FORCES),
    ("unknown element", ["Xx 0 0 0 0 0 0", "H 1 0 0 0 0 0"], None, K.SPECIES),
    ("Z zero", ["0 0 0 0 0 0 0", "1 1 0 0 0 0 0"], "Properties=Z:I:1:pos:R:3:forces:R:3 energy=1", K.SPECIES),
    ("Z negative", ["8 0 0 0 0 0 0", "-1 1 0 0 0 0 0"], "Properties=Z:I:1:pos:R:3:forces:R:3 energy=1", K.SPECIES),
    ("empty frame", [], None, K.SPECIES),
    ("malformed atom line", ["O 0 0 0 0 0 0", "H 1 0"], None, "header/atom lines"),
])
def test_extxyz_bad_frame_names_file_frame_field(tmp_path, case, atom_lines, header, field_name):
    bad = frame_text(atom_lines, header) if header else frame_text(atom_lines)
    path = write_extxyz_text(tmp_path / "bad.extxyz", [GOOD_FRAME, bad, GOOD_FRAME])
    assert readers.count_frames(path) == 3
    items = list(readers.iter_frames(path))  # streaming never raises: the builder quarantines and goes on
    assert len(items) == 3 and isinstance(items[0], Frame) and isinstance(items[2], Frame)
    expect_frame_error(path, 1, field_name)


def test_extxyz_broken_layout_costs_its_frame_only(tmp_path):
    truncated = write_extxyz_text(tmp_path / "cut.extxyz", [GOOD_FRAME, GOOD_FRAME[:-40]])
    assert readers.count_frames(truncated) == 2
    items = list(readers.iter_frames(truncated))
    assert isinstance(items[0], Frame) and isinstance(items[1], FrameError) and len(items) == 2
    expect_frame_error(truncated, 1, K.NATOMS)

    garbage = write_extxyz_text(tmp_path / "garbage.extxyz", [GOOD_FRAME, "three\n", GOOD_FRAME])
    assert readers.count_frames(garbage) == 3  # issue 12.5: the good frame after a broken count line is kept
    assert "three" in str(expect_frame_error(garbage, 1, K.NATOMS))
    assert isinstance(list(readers.iter_frames(garbage))[2], Frame)


# ------------------------------------------------------------------------------------------ deepmd


def test_deepmd_system_round_trip(tmp_path):
    system = tmp_path / "sys"
    written = write_deepmd_system(system, [0, 1, 1, 0, 1, 1], ["O", "H"], sets=[3, 2])
    assert readers.detect_format(system) == "deepmd"
    assert readers.count_frames(system) == 5
    frames = readers.read_frames(system)
    assert [f.index for f in frames] == list(range(5))
    assert [f.info["set"] for f in frames] == ["set.000"] * 3 + ["set.001"] * 2
    for i, f in enumerate(frames):
        assert f.source == str(system)
        np.testing.assert_array_equal(f.species, [8, 1, 1, 8, 1, 1])
        np.testing.assert_array_equal(f.positions, written["coord"][i].reshape(6, 3).astype(np.float64))
        np.testing.assert_array_equal(f.forces, written["force"][i].reshape(6, 3).astype(np.float64))
        assert f.energy == float(written["energy"][i])
        np.testing.assert_array_equal(f.cell, np.diag([8.0, 9.0, 10.0]))
        assert f.pbc.all() and f.positions.dtype == np.float64


def test_deepmd_root_of_systems_slicing_and_nopbc(tmp_path):
    a = write_deepmd_system(tmp_path / "root" / "b_second", [1, 0, 1], ["H", "O"], sets=[2, 2], seed=1)
    b = write_deepmd_system(tmp_path / "root" / "a_first" / "deeper", [0, 0], ["C"], sets=[3], seed=2,
                            periodic=False)
    root = tmp_path / "root"
    assert readers.detect_format(root) == "deepmd"
    assert readers.count_frames(root) == 7
    frames = readers.read_frames(root)
    assert [(Path(f.source).name, f.index) for f in frames] == (
        [("deeper", i) for i in range(3)] + [("b_second", i) for i in range(4)])
    np.testing.assert_array_equal(frames[0].species, [6, 6])
    assert not frames[0].pbc.any() and not frames[0].cell.any()
    np.testing.assert_array_equal(frames[3].species, [8, 1, 8])  # types 1,0,1 with map H,O
    np.testing.assert_array_equal(frames[5].positions, a["coord"][2].reshape(3, 3))
    np.testing.assert_array_equal(frames[1].forces, b["force"][1].reshape(2, 3))

    middle = list(readers.iter_frames(root, start=2, stop=5))
    assert [(Path(f.source).name, f.index) for f in middle] == [("deeper", 2), ("b_second", 0), ("b_second", 1)]


def test_real_water_deepmd(shared_data):
    root = shared_data / "water_deepmd"
    assert readers.detect_format(root) == "deepmd"
    systems = sorted(p for p in (root / "data").iterdir() if (p / "type.raw").is_file())
    per_system = {p.name: readers.count_frames(p) for p in systems}
    assert per_system == {"data_0": 80, "data_1": 160, "data_2": 80, "data_3": 80}
    assert readers.count_frames(root) == 400

    frames = readers.read_frames(root)
    assert len(frames) == 400
    assert [Path(f.source).name for f in frames] == sum(([name] * n for name, n in per_system.items()), [])
    # the files list the 64 O first, then the 128 H (not O,H,H per molecule)
    expected_species = np.array([8] * 64 + [1] * 128)
    energies = np.array([f.energy for f in frames])
    for f in frames:
        assert f.natoms == 192
        np.testing.assert_array_equal(f.species, expected_species)
        np.testing.assert_allclose(f.cell, np.eye(3) * 12.4447, atol=1e-3)
    assert np.all((energies > -29950) & (energies < -29938)) and energies.std() > 0.05
    force_rms = np.sqrt(np.mean(np.concatenate([f.forces for f in frames]) ** 2))
    assert 0.5 < force_rms < 1.2  # eV/Å; DFT liquid water
    # O-H bonds: each H has an O within 1.2 Å (minimum image, cubic box)
    f = frames[0]
    d = f.positions[64:, None, :] - f.positions[None, :64, :]
    d -= np.round(d / 12.4447) * 12.4447
    assert np.linalg.norm(d, axis=-1).min(axis=1).max() < 1.2


@pytest.mark.parametrize("case", ["type.raw length", "unknown type_map symbol", "energy frames", "type out of range"])
def test_deepmd_system_problems_name_file_frame_field(tmp_path, case):
    system = tmp_path / "sys"
    write_deepmd_system(system, [0, 1, 1], ["O", "H"], sets=[2, 3])
    field_name, named_file = K.SPECIES, "type.raw"
    if case == "type.raw length":
        (system / "type.raw").write_text("0\n1\n")
    elif case == "unknown type_map symbol":
        (system / "type_map.raw").write_text("O\nQq\n")
        named_file = "type_map.raw"
    elif case == "energy frames":
        np.save(system / "set.001" / "energy.npy", np.zeros(2, dtype=np.float32))
        field_name, named_file = K.ENERGY, "energy.npy"
    else:
        (system / "type.raw").write_text("0\n1\n2\n")
    items = list(readers.iter_frames(system))
    assert len(items) == readers.count_frames(system) == 5  # one item per counted frame, errors included
    first_bad = 2 if case == "energy frames" else 0
    assert all(isinstance(x, FrameError) for x in items[first_bad:])
    err = expect_frame_error(system, first_bad, field_name)
    assert named_file in str(err) and err.source == str(system)


def test_deepmd_bad_values_reach_validate(tmp_path):
    system = tmp_path / "sys"
    write_deepmd_system(system, [0, 1, 1], ["O", "H"], sets=[2])
    force = np.load(system / "set.000" / "force.npy")
    force[1, 4] = np.nan
    np.save(system / "set.000" / "force.npy", force)
    expect_frame_error(system, 1, K.FORCES)

    np.save(system / "set.000" / "force.npy", np.zeros((2, 8), dtype=np.float32))  # 8 values for 3 atoms
    expect_frame_error(system, 0, K.FORCES)


def test_deepmd_refuses_pickled_arrays(tmp_path):
    system = tmp_path / "sys"
    write_deepmd_system(system, [0, 1, 1], ["O", "H"], sets=[2])
    np.save(system / "set.000" / "energy.npy", np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    err = expect_frame_error(system, 0, K.ENERGY)
    assert "energy.npy" in str(err)


def test_detect_format_errors(tmp_path):
    odd = tmp_path / "frames.csv"
    odd.write_text("1,2,3\n")
    with pytest.raises(ValueError, match="extxyz.*deepmd"):
        readers.detect_format(odd)
    with pytest.raises(ValueError, match="extxyz.*deepmd"):
        readers.detect_format(tmp_path)  # a folder with no type.raw anywhere
    with pytest.raises(FileNotFoundError):
        readers.count_frames(tmp_path / "absent.extxyz")
    with pytest.raises(ValueError, match="valid formats"):
        readers.count_frames(odd, fmt="lammps")
    assert set(readers.READERS) == {"extxyz", "deepmd", "asedb", "npz", "n2p2"}


def test_overlapping_atoms_are_rejected_naming_the_pair(tmp_path):
    from data_shards.frame import Frame, FrameError

    positions = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [5.0, 5.0, 5.0], [5.05, 5.0, 5.0]])
    frame = Frame(species=np.array([8, 1, 8, 1]), positions=positions, cell=np.eye(3) * 10.0,
                  pbc=np.array([True] * 3), energy=-1.0, forces=np.zeros((4, 3)), source="x.extxyz", index=7)
    with pytest.raises(FrameError, match=r"x\.extxyz, frame 7, field 'positions': atoms 2 and 3 are 0\.05 Å"):
        frame.validate()
    # across the periodic boundary too
    frame.positions = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [9.98, 0.0, 0.0], [5.0, 5.0, 5.0]])
    with pytest.raises(FrameError, match="atoms 0 and 2 are 0.02 Å"):
        frame.validate()
    frame.positions[2] = [5.0, 0.0, 0.0]
    frame.validate()  # well separated: accepted
