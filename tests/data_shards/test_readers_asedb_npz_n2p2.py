"""ASE database, npz and n2p2 readers: round trips with unit conversion, counting, slicing, detection,
bad input named by file/frame/field, and a shard build over one input of each format."""
from __future__ import annotations

import json
from pathlib import Path

import ase.db
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from data_shards import keys as K
from data_shards import readers
from data_shards.build import build_shards
from data_shards.frame import Frame, FrameError

BOHR = 0.529177210903       # Å, CODATA 2018
HARTREE = 27.211386245988   # eV, CODATA 2018


def expect_frame_error(path: Path, frame: int, field_name: str, **options) -> FrameError:
    with pytest.raises(FrameError) as info:
        readers.read_frames(path, **options)
    err = info.value
    assert (err.frame, err.field) == (frame, field_name), str(err)
    assert Path(err.source).name in str(err) and f"frame {frame}" in str(err) and f"'{field_name}'" in str(err)
    return err


def water_arrays(rng: np.random.Generator, nframes: int, nmol: int = 2) -> dict:
    n = 3 * nmol
    return {"species": np.tile([8, 1, 1], nmol).astype(np.int64),
            "pos": rng.uniform(0.5, 5.5, size=(nframes, n, 3)),
            "cell": np.stack([np.diag(rng.uniform(6, 8, size=3)) for _ in range(nframes)]),
            "energy": rng.normal(-30, 1, size=nframes),
            "forces": rng.normal(size=(nframes, n, 3))}


# ------------------------------------------------------------------------------------------ ASE db


def write_db(path: Path, arrays: dict, labels: str = "calculator") -> Path:
    with ase.db.connect(str(path)) as db:
        for i in range(len(arrays["pos"])):
            atoms = Atoms(numbers=arrays["species"], positions=arrays["pos"][i], cell=arrays["cell"][i], pbc=True)
            if labels == "calculator":
                atoms.calc = SinglePointCalculator(atoms, energy=arrays["energy"][i], forces=arrays["forces"][i])
                db.write(atoms, tag=f"t{i}")
            else:  # labels under custom names: energy as a key-value pair, forces in data
                db.write(atoms, ref_e=float(arrays["energy"][i]), data={"ref_f": arrays["forces"][i]})
    return path


def test_asedb_round_trip_count_slicing_and_custom_keys(tmp_path):
    arrays = water_arrays(np.random.default_rng(0), 7)
    path = write_db(tmp_path / "set.db", arrays)
    assert readers.detect_format(path) == "asedb"
    assert readers.count_frames(path) == 7
    frames = readers.read_frames(path)
    assert [f.index for f in frames] == list(range(7)) and [f.info["id"] for f in frames] == list(range(1, 8))
    for i, f in enumerate(frames):
        assert f.source == str(path) and f.info["tag"] == f"t{i}"
        np.testing.assert_array_equal(f.species, arrays["species"])
        np.testing.assert_allclose(f.positions, arrays["pos"][i], rtol=0, atol=1e-12)
        np.testing.assert_allclose(f.cell, arrays["cell"][i], rtol=0, atol=1e-12)
        np.testing.assert_allclose(f.forces, arrays["forces"][i], rtol=0, atol=1e-12)
        assert f.energy == pytest.approx(arrays["energy"][i], abs=1e-12) and f.pbc.all()
    part = list(readers.iter_frames(path, start=2, stop=5))
    assert [(f.index, f.info["id"]) for f in part] == [(2, 3), (3, 4), (4, 5)]
    assert [f.index for f in readers.iter_frames(path, start=5)] == [5, 6]
    assert list(readers.iter_frames(path, start=7)) == []

    custom = write_db(tmp_path / "custom.db", arrays, labels="custom")
    unlabelled = readers.read_frames(custom, require_labels=False)
    assert all(f.energy is None and f.forces is None for f in unlabelled)
    labelled = readers.read_frames(custom, energy_key="ref_e", forces_key="ref_f")
    np.testing.assert_allclose([f.energy for f in labelled], arrays["energy"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(labelled[6].forces, arrays["forces"][6], rtol=0, atol=1e-12)


def test_asedb_pages_follow_ids_with_gaps(tmp_path, monkeypatch):
    from data_shards.readers import asedb
    monkeypatch.setattr(asedb, "PAGE_ROWS", 3)  # several pages over a 10-row database
    arrays = water_arrays(np.random.default_rng(1), 12)
    path = write_db(tmp_path / "gaps.db", arrays)
    with ase.db.connect(str(path)) as db:
        db.delete([2, 9])
    assert readers.count_frames(path) == 10
    kept = [i for i in range(12) if i + 1 not in (2, 9)]
    frames = readers.read_frames(path)
    assert [f.info["id"] - 1 for f in frames] == kept and [f.index for f in frames] == list(range(10))
    for f, original in zip(frames, kept):
        np.testing.assert_allclose(f.positions, arrays["pos"][original], rtol=0, atol=1e-12)
    assert [f.info["id"] for f in readers.iter_frames(path, start=4, stop=9)] == [6, 7, 8, 10, 11]


@pytest.mark.parametrize("case, field_name", [("missing energy", K.ENERGY), ("NaN force", K.FORCES),
                                               ("wrong-shape forces", K.FORCES), ("unknown element", K.SPECIES),
                                               ("text energy", K.ENERGY)])
def test_asedb_bad_rows_name_file_frame_field(tmp_path, case, field_name):
    arrays = water_arrays(np.random.default_rng(2), 3)
    path = tmp_path / "bad.db"
    with ase.db.connect(str(path)) as db:
        for i in range(3):
            numbers = arrays["species"].copy()
            forces = arrays["forces"][i]
            if i == 1 and case == "unknown element":
                numbers[0] = 0
            if i == 1 and case == "NaN force":
                forces = forces.copy()
                forces[2, 1] = np.nan
            atoms = Atoms(numbers=numbers, positions=arrays["pos"][i], cell=arrays["cell"][i], pbc=True)
            if i == 1 and case == "wrong-shape forces":
                db.write(atoms, e=1.0, data={"f": forces[:, :2]})
            elif i == 1 and case == "text energy":
                db.write(atoms, e="high", data={"f": forces})
            elif i == 1 and case == "missing energy":
                db.write(atoms, data={"f": forces})
            else:
                db.write(atoms, e=float(arrays["energy"][i]), data={"f": forces})
    items = list(readers.iter_frames(path, energy_key="e", forces_key="f"))
    assert len(items) == 3 and isinstance(items[0], Frame) and isinstance(items[2], Frame)
    expect_frame_error(path, 1, field_name, energy_key="e", forces_key="f")


# ------------------------------------------------------------------------------------------ npz


def test_npz_gamd_layout_converts_units_with_type_map(tmp_path):
    rng = np.random.default_rng(3)
    a = water_arrays(rng, 5)
    pos_bohr, force_ha_bohr, energy_ha = a["pos"] / BOHR, a["forces"] / HARTREE * BOHR, a["energy"] / HARTREE
    box_bohr = np.array([13.0, 14.0, 15.0])  # one shared (3,) box
    path = tmp_path / "water.npz"
    np.savez(path, pos=pos_bohr, force=force_ha_bohr.reshape(5, -1), energy=energy_ha[:, None], box=box_bohr,
             atom_type=np.tile([0, 1, 1], 2))
    assert readers.detect_format(path) == "npz" and readers.count_frames(path) == 5
    frames = readers.read_frames(path, layout="gamd", type_map=["O", "H"])
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f.species, a["species"])
        np.testing.assert_allclose(f.positions, pos_bohr[i] * 0.529177210903, rtol=1e-15)
        np.testing.assert_allclose(f.forces, force_ha_bohr[i] * (27.211386245988 / 0.529177210903), rtol=1e-15)
        assert f.energy == pytest.approx(energy_ha[i] * 27.211386245988, rel=1e-15)
        np.testing.assert_allclose(f.cell, np.diag(box_bohr * BOHR), rtol=1e-15)
        np.testing.assert_allclose(f.positions, a["pos"][i], rtol=1e-12)  # back to where we started
    assert [f.index for f in readers.iter_frames(path, start=1, stop=3, layout="gamd", type_map=["O", "H"])] == [1, 2]

    # the same numbers under explicit keys, declared already in Å/eV, species as Z, full per-frame cells
    plain = tmp_path / "plain.npz"
    np.savez_compressed(plain, R=a["pos"].reshape(5, -1), F=a["forces"], E=a["energy"], Z=a["species"],
                        L=a["cell"].reshape(5, 9))
    keys = {"positions": "R", K.FORCES: "F", K.ENERGY: "E", K.SPECIES: "Z", K.CELL: "L"}
    frames = readers.read_frames(plain, keys=keys, units="angstrom_ev")
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f.positions, a["pos"][i])
        np.testing.assert_array_equal(f.forces, a["forces"][i])
        np.testing.assert_array_equal(f.cell, a["cell"][i])
        assert f.energy == a["energy"][i]
    back = list(readers.iter_frames(plain, start=3, keys=keys))  # compressed member, sliced from the middle
    np.testing.assert_array_equal(back[0].positions, a["pos"][3])
    assert [f.index for f in back] == [3, 4]


@pytest.mark.parametrize("box", [np.array(7.5), np.eye(3) * 7.5, np.full((4, 3), 7.5),
                                 np.tile(np.eye(3).ravel() * 7.5, (4, 1))])
def test_npz_cell_shapes_shared_or_per_frame(tmp_path, box):
    a = water_arrays(np.random.default_rng(4), 4)
    path = tmp_path / "cells.npz"
    np.savez(path, species=a["species"], pos=a["pos"], energy=a["energy"], forces=a["forces"], cell=box)
    for f in readers.read_frames(path):
        np.testing.assert_array_equal(f.cell, np.eye(3) * 7.5)
        assert f.pbc.all()


def test_npz_single_frame_file_and_no_cell(tmp_path):
    a = water_arrays(np.random.default_rng(5), 1)
    path = tmp_path / "one.npz"
    np.savez(path, species=a["species"], pos=a["pos"][0], energy=np.float64(a["energy"][0]), forces=a["forces"][0])
    assert readers.count_frames(path) == 1
    (f,) = readers.read_frames(path)
    np.testing.assert_array_equal(f.positions, a["pos"][0])
    assert not f.pbc.any() and not f.cell.any() and f.energy == a["energy"][0]


@pytest.mark.parametrize("case, field_name", [("missing energy", K.ENERGY), ("NaN force", K.FORCES),
                                               ("wrong-shape forces", K.FORCES), ("unknown element", K.SPECIES),
                                               ("type outside map", K.SPECIES), ("pickled energy", K.ENERGY)])
def test_npz_bad_input_names_file_frame_field(tmp_path, case, field_name):
    a = water_arrays(np.random.default_rng(6), 3)
    arrays = {"species": a["species"], "pos": a["pos"], "energy": a["energy"], "forces": a["forces"],
              "cell": a["cell"]}
    options, bad_frame = {}, 0
    if case == "missing energy":
        del arrays["energy"]
    elif case == "NaN force":
        arrays["forces"][2, 4, 0], bad_frame = np.nan, 2
    elif case == "wrong-shape forces":
        arrays["forces"] = arrays["forces"][:, :5]
    elif case == "unknown element":
        arrays["species"] = np.array([8, 1, 1, 8, 1, 0])
    elif case == "type outside map":
        arrays["species"], options = np.array([0, 1, 1, 0, 1, 2]), {"type_map": ["O", "H"]}
    else:
        arrays["energy"] = np.array([{"e": 1.0}] * 3, dtype=object)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays, allow_pickle=True) if case == "pickled energy" else np.savez(path, **arrays)
    items = list(readers.iter_frames(path, **options))
    assert len(items) == readers.count_frames(path) == 3
    err = expect_frame_error(path, bad_frame, field_name, **options)
    if case in ("type outside map", "pickled energy"):
        assert all(isinstance(x, FrameError) for x in items) and "member" in str(err)


def test_npz_options_are_validated():
    with pytest.raises(ValueError, match="default.*gamd"):
        readers.npz.NpzOptions(layout="mace")
    with pytest.raises(ValueError, match="angstrom_ev.*bohr_hartree"):
        readers.npz.NpzOptions(units="nm_kj")
    with pytest.raises(ValueError, match="valid fields"):
        readers.npz.NpzOptions(keys={"velocity": "v"})
    with pytest.raises(ValueError, match="Qq"):
        readers.npz.NpzOptions(type_map=["O", "Qq"])


# ------------------------------------------------------------------------------------------ n2p2


def n2p2_block(rng: np.random.Generator, periodic: bool = True, natoms_lines: list[str] | None = None,
               energy: str | None = "-17.25", end: bool = True) -> tuple[str, dict]:
    species = ["O", "H", "H"]
    pos, forces, cell = rng.uniform(0, 10, size=(3, 3)), rng.normal(size=(3, 3)) * 0.05, np.diag([20.0, 21.0, 22.0])
    lines = ["begin", "comment water monomer  from RuNNer"]
    if periodic:
        lines += ["lattice " + " ".join(map(repr, r.tolist())) for r in cell]  # repr: exact round trip
    atom_lines = natoms_lines or [
        f"atom {' '.join(map(repr, p.tolist()))} {s} 0.0 0.0 {' '.join(map(repr, f.tolist()))}"
        for s, p, f in zip(species, pos, forces)]
    lines += atom_lines
    if energy is not None:
        lines.append(f"energy {energy}")
    lines.append("charge 0.0")
    if end:
        lines.append("end")
    return "\n".join(lines) + "\n", {"pos": pos, "forces": forces, "cell": cell, "energy": -17.25}


def test_n2p2_round_trip_units_count_and_slicing(tmp_path):
    rng = np.random.default_rng(7)
    blocks = [n2p2_block(rng, periodic=i != 2) for i in range(6)]
    path = tmp_path / "input.data"
    path.write_text("".join(text for text, _ in blocks))
    assert readers.detect_format(path) == "n2p2" and readers.count_frames(path) == 6
    frames = readers.read_frames(path)
    for i, (f, (_, ref)) in enumerate(zip(frames, blocks)):
        assert f.index == i and f.source == str(path) and f.info["comment"] == "water monomer  from RuNNer"
        np.testing.assert_array_equal(f.species, [8, 1, 1])
        np.testing.assert_allclose(f.positions, ref["pos"] * 0.529177210903, rtol=1e-15)
        np.testing.assert_allclose(f.forces, ref["forces"] * 27.211386245988 / 0.529177210903, rtol=1e-15)
        assert f.energy == pytest.approx(-17.25 * 27.211386245988, rel=1e-15)
        if i == 2:
            assert not f.pbc.any() and not f.cell.any()
        else:
            np.testing.assert_allclose(f.cell, ref["cell"] * BOHR, rtol=1e-15)
    assert [f.index for f in readers.iter_frames(path, start=3, stop=5)] == [3, 4]
    (same,) = readers.iter_frames(path, start=4, stop=5, units="angstrom_ev")
    np.testing.assert_array_equal(same.positions, blocks[4][1]["pos"])
    assert same.energy == -17.25

    other = tmp_path / "train.data"
    other.write_text("\n" + blocks[0][0])
    assert readers.detect_format(other) == "n2p2"
    not_n2p2 = tmp_path / "table.data"
    not_n2p2.write_text("x y z\n1 2 3\n")
    with pytest.raises(ValueError, match="n2p2"):
        readers.detect_format(not_n2p2)


@pytest.mark.parametrize("case, field_name", [("missing energy", K.ENERGY), ("NaN force", K.FORCES),
                                               ("wrong-shape forces", K.FORCES), ("unknown element", K.SPECIES),
                                               ("no end", "end")])
def test_n2p2_bad_block_names_file_frame_field(tmp_path, case, field_name):
    rng = np.random.default_rng(8)
    atoms = ["atom 0 0 0 O 0 0 0.1 0.2 0.3", "atom 1.8 0 0 H 0 0 0 0 0", "atom 0 1.8 0 H 0 0 0 0 0"]
    kwargs = {}
    if case == "missing energy":
        kwargs["energy"] = None
    elif case == "NaN force":
        atoms[1] = "atom 1.8 0 0 H 0 0 0 nan 0"
    elif case == "wrong-shape forces":
        atoms[2] = "atom 0 1.8 0 H 0 0 0 0"
    elif case == "unknown element":
        atoms[0] = "atom 0 0 0 Ow 0 0 0.1 0.2 0.3"
    else:
        kwargs["end"] = False
    path = tmp_path / "input.data"
    bad, _ = n2p2_block(rng, natoms_lines=atoms, **kwargs)
    path.write_text(n2p2_block(rng)[0] + bad + n2p2_block(rng)[0])
    items = list(readers.iter_frames(path))
    assert len(items) == readers.count_frames(path) == 3
    assert isinstance(items[0], Frame) and isinstance(items[2], Frame)
    expect_frame_error(path, 1, field_name)

    if case == "no end":  # a block cut off by the end of the file
        path.write_text(n2p2_block(rng)[0] + bad)
        assert len(list(readers.iter_frames(path))) == readers.count_frames(path) == 2
        expect_frame_error(path, 1, "end")


# ------------------------------------------------------------------------------------------ detection + shards


def test_detect_format_lists_every_format(tmp_path):
    odd = tmp_path / "frames.csv"
    odd.write_text("1,2,3\n")
    with pytest.raises(ValueError) as info:
        readers.detect_format(odd)
    for name in ("extxyz", "deepmd", "asedb", "npz", "n2p2"):
        assert name in str(info.value)
    fake_db = tmp_path / "notes.db"
    fake_db.write_text("not sqlite")
    with pytest.raises(ValueError, match="cannot tell"):
        readers.detect_format(fake_db)


def test_build_shards_from_db_npz_and_n2p2(tmp_path):
    rng = np.random.default_rng(9)
    a = water_arrays(rng, 4)
    db_path = write_db(tmp_path / "a.db", a)
    npz_path = tmp_path / "b.npz"
    # shifted: the db's own structures would be left out of the build as duplicates
    np.savez(npz_path, species=a["species"], pos=a["pos"] + 0.25, energy=a["energy"], forces=a["forces"],
             cell=a["cell"])
    n2p2_path = tmp_path / "input.data"
    n2p2_path.write_text("".join(n2p2_block(rng)[0] for _ in range(3)))
    out = tmp_path / "shards"
    manifest = build_shards([str(db_path), str(npz_path), f"test={n2p2_path}"], str(out), shard_size=4,
                            use_ray=False, progress=False)
    formats = {Path(i["path"]).name: (i["format"], i["frames"]) for i in manifest["inputs"]}
    assert formats == {"a.db": ("asedb", 4), "b.npz": ("npz", 4), "input.data": ("n2p2", 3)}
    assert manifest["totals"]["samples_written"] == 11 and manifest["totals"]["quarantined"] == 0
    assert manifest["totals"]["duplicates"] == 0
    assert manifest["splits"]["test"]["samples"] == 3
    n_oxygen = 2 * 4 * 2 + 3 * 1  # two 4-frame files of 2 waters, three n2p2 monomers
    assert json.loads((out / "manifest.json").read_text())["elements"] == {"1": 2 * n_oxygen, "8": n_oxygen}
