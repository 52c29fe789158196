"""MACE-style data: label keys (--energy-key/--forces-key/--stress-key), isolated-atom and file E0s,
per-data-set E0s when several data sets are built into one shard set (issue 15 item 3)."""
import json
import subprocess
import sys
import tarfile

import ase.io
import numpy as np
import pytest

from data_shards import keys as K
from data_shards.build import build_shards
from data_shards.e0 import E0Error, read_e0_file
from data_shards.manifest import (
    dataset_entries,
    load_manifest,
    parse_manifest,
    rereference_transform,
)
from data_shards.sample import decode_sample
from data_shards.stream import ShardStream

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _mace_file(path, shared_data, n=40, stress=False):
    """ethanol frames relabelled as MACE writes them (REF_energy, REF_forces, optional REF_stress) plus the
    isolated atoms as config_type=IsolatedAtom frames at the start."""
    out = []
    for a in ase.io.read(shared_data / "ethanol_rmd17" / "isolated_atoms.xyz", ":"):
        e = a.get_potential_energy()
        a.calc = None
        a.info.update(REF_energy=e, config_type="IsolatedAtom")
        out.append(a)
    for i, a in enumerate(ase.io.read(shared_data / "ethanol_rmd17" / "train.xyz", f":{n}")):
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = None
        a.info["REF_energy"] = e
        a.arrays["REF_forces"] = f
        if stress:
            a.info["REF_stress"] = np.array([0.01 * i, 0.02, 0.03, 0.0, 0.0, 0.001])  # Voigt, eV/Å³
        out.append(a)
    ase.io.write(path, out, format="extxyz")
    return path


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "maskpot.cli", *map(str, args)], capture_output=True, text=True,
                          check=False, cwd=REPO_ROOT, timeout=300)


@pytest.mark.needs_shared_data
def test_default_keys_on_a_mace_file_exit_2_naming_option_value_and_fields(tmp_path, shared_data):
    src = _mace_file(tmp_path / "mace.xyz", shared_data, n=10)
    r = _cli("shards", "build", src, "--out", tmp_path / "s", "--serial")
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "--energy-key energy" in line and "REF_energy" in line and "REF_forces" in line, line
    r = _cli("shards", "build", src, "--out", tmp_path / "s", "--serial", "--energy-key", "REF_energy",
             "--forces-key", "REF_forces", "--stress-key", "virial")
    assert r.returncode == 2 and "--stress-key virial" in r.stderr and "REF_stress" not in r.stderr, r.stderr


@pytest.mark.needs_shared_data
def test_mace_keys_isolated_atoms_and_stress(tmp_path, shared_data):
    src = _mace_file(tmp_path / "mace.xyz", shared_data, stress=True)
    m = build_shards([str(src)], tmp_path / "s", use_ray=False, progress=False, energy_key="REF_energy",
                     forces_key="REF_forces", stress_key="REF_stress")
    assert m["schema_version"] == 2
    assert m["totals"]["isolated_atoms"] == 4 and m["totals"]["samples_written"] == 40  # E0 frames are no samples
    (entry,) = dataset_entries(m).values()
    assert entry["e0_source"] == "isolated_atoms"
    iso = {int(a.numbers[0]): a.get_potential_energy()
           for a in ase.io.read(shared_data / "ethanol_rmd17" / "isolated_atoms.xyz", ":")}
    assert entry["e0"] == pytest.approx(iso)
    assert {int(z): v for z, v in m["stats"]["e0"].items()} == pytest.approx(iso)
    with tarfile.open(tmp_path / "s" / m["shards"][0]["name"]) as tar:
        members = {n.name.rsplit(".", 1)[1]: tar.extractfile(n).read() for n in tar.getmembers()[:2]}
        key = tar.getmembers()[0].name.rsplit(".", 1)[0]
    sample = decode_sample({"__key__": key, **members})
    assert sample[K.STRESS].shape == (3, 3) and sample[K.STRESS][0, 1] == pytest.approx(0.001)
    assert sample[K.DATASET] == tmp_path.name


@pytest.mark.needs_shared_data
def test_e0_files_yaml_json_extxyz_and_missing_element(tmp_path, shared_data):
    (tmp_path / "e0.yaml").write_text("H: -13.5\n6: -1025.0\nO: -2035.5\n")
    (tmp_path / "e0.json").write_text(json.dumps({"H": -13.5}))
    assert read_e0_file(tmp_path / "e0.yaml") == {1: -13.5, 6: -1025.0, 8: -2035.5}
    assert read_e0_file(shared_data / "3bpa" / "iso_atoms.xyz")[8] == pytest.approx(-2041.9816003861047)
    (tmp_path / "bad.yaml").write_text("Xx: 1.0\n")
    with pytest.raises(E0Error, match="'Xx' is neither an element"):
        read_e0_file(tmp_path / "bad.yaml")
    r = _cli("shards", "build", shared_data / "ethanol_rmd17" / "train.xyz", "--out", tmp_path / "s", "--serial",
             "--e0s", tmp_path / "e0.json")
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "e0.json" in line and "no E0 for C, O" in line and "ethanol_rmd17" in line, line


@pytest.mark.needs_shared_data
def test_ethanol_plus_3bpa_per_dataset_e0_not_pooled(tmp_path, shared_data):
    """Pooling both sets into one least-squares fit gave E0(O) = +62.9 eV; each data set now has its own E0
    (isolated atoms here), the model table is the first set's, and re-referenced energies agree."""
    eth, bpa = shared_data / "ethanol_rmd17", shared_data / "3bpa"
    m = build_shards([str(eth / "train.xyz"), str(bpa / "train_300K.xyz")], tmp_path / "s", use_ray=False,
                     progress=False, shard_size=500,
                     e0s=(f"ethanol_rmd17={eth / 'isolated_atoms.xyz'}", f"3bpa={bpa / 'iso_atoms.xyz'}"))
    ds = dataset_entries(load_manifest(tmp_path / "s"))
    assert list(ds) == ["ethanol_rmd17", "3bpa"]                      # input order survives the sorted json
    assert ds["3bpa"]["e0"][8] == pytest.approx(-2041.9816003861047)
    assert ds["ethanol_rmd17"]["e0"][8] == pytest.approx(-2035.5709809589698)
    table = {int(z): v for z, v in m["stats"]["e0"].items()}
    assert table[8] < -2000 and table[7] == pytest.approx(-1479.0665594928669)   # N from the ethanol file
    assert m["stats"]["e0_source"] == "per-dataset"
    # after re-referencing, both sets' per-atom interaction energies lie close together
    transform = rereference_transform(m)
    per_atom = {"ethanol_rmd17": [], "3bpa": []}
    stream = ShardStream(tmp_path / "s", "train", 64, 3.0, transform=transform)
    for batch in stream:
        e0 = np.array([table[int(z)] for z in batch[K.SPECIES]])
        ref = np.bincount(batch.batch.numpy(), weights=e0)
        for k in range(batch.num_graphs):
            name = "3bpa" if int((batch.batch == k).sum()) == 27 else "ethanol_rmd17"
            per_atom[name].append((float(batch[K.ENERGY][k]) - ref[k]) / int((batch.batch == k).sum()))
    means = {k: float(np.mean(v)) for k, v in per_atom.items()}
    assert all(-6.0 < v < -4.0 for v in means.values()), means
    assert abs(means["ethanol_rmd17"] - means["3bpa"]) < 0.5, means
    assert m["stats"]["energy_per_atom_std"] < 0.2


def test_old_manifest_version_1_still_reads():
    m = parse_manifest(json.dumps({"schema_version": 1, "shards": [], "splits": {}, "totals": {},
                                   "stats": {"e0": {"1": -13.0, "8": -2000.0}}}), "old.json")
    ds = dataset_entries(m)
    assert ds == {"": {"e0": {1: -13.0, 8: -2000.0}, "e0_source": "fit"}}
    assert not rereference_transform(m).active
