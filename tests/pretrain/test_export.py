"""Model exports: save → load gives the same model; the format is checked strictly and stays readable.

The committed export under tests/assets/egnn_tiny_export/ guards format stability: if a change makes it
unreadable, that change breaks every export users already hold. It is a format-1 export (a top-level
"cutoff" besides params): the compatibility case of format 2, so do not regenerate it for a new format;
`.venv/bin/python tests/pretrain/test_export.py --regenerate` writes the current format (bump
FORMAT_VERSION when the layout changes).
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from data_shards import keys as K
from data_shards.graph import collate, sample_to_data
from pretrain.export import FORMAT_VERSION, META_FILE, WEIGHTS_FILE, export_cutoff, load_export, read_meta, save_export
from pretrain.models import build_model
from tests.helpers.paths import TINY_EXPORT

ASSET = TINY_EXPORT
REFERENCE = ASSET / "reference_output.json"
PARAMS = {"hidden": 8, "layers": 2, "cutoff": 3.5}


def water_batch():
    """Three rigid-ish waters in a 6 Å periodic box, fixed geometry."""
    oxygens = np.array([[1.0, 1.0, 1.0], [3.5, 1.2, 2.8], [1.8, 4.0, 4.5]])
    pos, species = [], []
    for o in oxygens:
        pos += [o, o + [0.96, 0.0, 0.0], o + [-0.24, 0.93, 0.0]]
        species += [8, 1, 1]
    sample = {K.SPECIES: np.array(species), K.POSITIONS: np.array(pos, dtype=np.float32),
              K.CELL: np.eye(3) * 6.0, K.PBC: np.ones(3, dtype=bool)}
    return collate([sample_to_data(sample, PARAMS["cutoff"])])


def tiny_meta() -> dict:
    return {"model": "egnn", "params": asdict(build_model("egnn", PARAMS).config),
            "species": [1, 8], "normalisation": {"energy_scale": 0.8, "e0": {"1": -13.6, "8": -432.1}},
            "lineage": {"config_sha256": "0" * 64, "manifest_sha256": "1" * 64, "maskpot_version": "0.1.0",
                        "pretrain_objective": "mask", "steps": 3}}


def tiny_model():
    torch.manual_seed(7)
    model = build_model("egnn", PARAMS)
    model.set_normalisation(0.8, {1: -13.6, 8: -432.1})
    return model.eval()


def outputs(model):
    out = model(water_batch(), compute_forces=True)
    return out[K.PRED_ENERGY].detach(), out[K.PRED_FORCES].detach()


def test_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_model()
    save_export(model, tmp_path / "export", tiny_meta())
    loaded, meta = load_export(tmp_path / "export")
    assert meta["format_version"] == FORMAT_VERSION and meta["lineage"]["steps"] == 3
    assert meta["normalisation"]["e0"] == {"1": -13.6, "8": -432.1}
    for a, b in zip(outputs(model), outputs(loaded.eval())):
        assert torch.equal(a, b)
    assert loaded.e0.dtype == torch.float64 and float(loaded.e0[8]) == -432.1


def test_newer_format_version_is_refused(tmp_path):
    save_export(tiny_model(), tmp_path, tiny_meta())
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"format_version {FORMAT_VERSION + 1} is newer.*upgrade"):
        load_export(tmp_path)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    save_export(tiny_model(), tmp_path, tiny_meta())
    weights = load_file(str(tmp_path / WEIGHTS_FILE))
    gone = "energy_head.0.weight"
    weights.pop(gone)
    weights["stray.bias"] = torch.zeros(2)
    save_file(weights, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ValueError,
                       match=r"missing keys \['energy_head\.0\.weight'\].*unexpected keys \['stray\.bias'\]"):
        load_export(tmp_path)


def test_architecture_that_disagrees_with_the_weights_is_named(tmp_path):
    save_export(tiny_model(), tmp_path, tiny_meta())
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["params"]["hidden"] *= 2
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"disagrees with the architecture in .*model\.json .*tensor\(s\) of "
                                         r"another shape, e\.g\. .*\(model\.json builds"):
        load_export(tmp_path)


def test_meta_must_be_complete(tmp_path):
    meta = tiny_meta()
    del meta["lineage"]
    with pytest.raises(ValueError, match="lineage"):
        save_export(tiny_model(), tmp_path, meta)
    with pytest.raises(FileNotFoundError, match=META_FILE):
        load_export(tmp_path / "empty")


def test_committed_export_still_loads_and_predicts_the_same():
    stored = json.loads((ASSET / META_FILE).read_text())
    assert stored["format_version"] == 1 and stored["cutoff"] == 3.5, "the asset is the format-1 case: keep it"
    model, meta = load_export(ASSET)
    assert meta["model"] == "egnn" and export_cutoff(meta) == 3.5 and meta["species"] == [1, 8]
    assert "cutoff" not in meta   # checked against params, then dropped: one cutoff for every reader
    reference = json.loads(REFERENCE.read_text())
    energy, forces = outputs(model.eval())
    assert energy.tolist() == pytest.approx(reference["energy"], rel=1e-5)
    np.testing.assert_allclose(forces.numpy(), np.array(reference["forces"]), rtol=1e-4, atol=1e-6)
    assert forces.abs().sum() > 0


def test_new_export_is_format_2_with_the_cutoff_only_in_params(tmp_path):
    save_export(tiny_model(), tmp_path, tiny_meta())
    stored = json.loads((tmp_path / META_FILE).read_text())
    assert stored["format_version"] == FORMAT_VERSION == 2 and "cutoff" not in stored
    assert stored["params"]["cutoff"] == 3.5 and export_cutoff(read_meta(tmp_path)) == 3.5
    with pytest.raises(ValueError, match=r"top-level 'cutoff' \(3\.5\).*drop the key"):
        save_export(tiny_model(), tmp_path / "twice", {**tiny_meta(), "cutoff": 3.5})


def as_format_1(directory, cutoff) -> None:
    meta = json.loads((directory / META_FILE).read_text())
    (directory / META_FILE).write_text(json.dumps({**meta, "format_version": 1, "cutoff": cutoff}))


def test_format_1_export_loads_with_the_same_cutoff_and_outputs(tmp_path):
    model = tiny_model()
    save_export(model, tmp_path, tiny_meta())
    as_format_1(tmp_path, 3.5)
    loaded, meta = load_export(tmp_path)
    assert meta["format_version"] == 1 and export_cutoff(meta) == 3.5 and "cutoff" not in meta
    for a, b in zip(outputs(model), outputs(loaded.eval())):
        assert torch.equal(a, b)


def test_format_1_cutoff_that_disagrees_with_params_is_refused_naming_the_file(tmp_path):
    save_export(tiny_model(), tmp_path, tiny_meta())
    as_format_1(tmp_path, 4.0)
    for read in (read_meta, load_export):
        with pytest.raises(ValueError) as e:
            read(tmp_path)
        assert str(tmp_path / META_FILE) in str(e.value) and "\n" not in str(e.value)
        assert "top-level cutoff 4.0 disagrees" in str(e.value) and "3.5 Å" in str(e.value)


def test_params_that_build_no_model_are_named_with_the_file(tmp_path):
    save_export(tiny_model(), tmp_path, tiny_meta())
    meta = json.loads((tmp_path / META_FILE).read_text())
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "params": {**meta["params"], "hiden": 8}}))
    with pytest.raises(ValueError, match=rf"{tmp_path / META_FILE}: model 'egnn' .*not a valid architecture.*hiden"):
        read_meta(tmp_path)


def test_two_stage_init_accepts_a_format_1_export_of_the_same_architecture(tmp_path):
    from types import SimpleNamespace

    from pretrain.config import ModelConfig
    from pretrain.stages import check_init

    save_export(tiny_model(), tmp_path, tiny_meta())
    as_format_1(tmp_path, 3.5)
    same = SimpleNamespace(train=SimpleNamespace(init=str(tmp_path)), model=ModelConfig("egnn", PARAMS))
    assert check_init(same)["lineage"]["steps"] == 3
    other = SimpleNamespace(train=same.train, model=ModelConfig("egnn", {**PARAMS, "cutoff": 4.0}))
    with pytest.raises(ValueError, match=r"parameters \['cutoff'\] \[3\.5\] \(this config: \[4\.0\]\)"):
        check_init(other)


@pytest.mark.parametrize("name,params,cutoff", [
    ("egnn", {}, 3.5), ("egnn_paper", {"cutoff": 4.0}, 4.0), ("gns", {}, 3.4), ("forcenet", {"cutoff": 3.0}, 3.0),
    ("mace", {"r_max": 4.2}, 4.2)])
def test_export_cutoff_is_what_the_architecture_builds(name, params, cutoff):
    assert export_cutoff({"model": name, "params": params}) == cutoff


def regenerate_asset() -> None:
    shutil.rmtree(ASSET, ignore_errors=True)
    model = tiny_model()
    save_export(model, ASSET, tiny_meta())
    energy, forces = outputs(model)
    REFERENCE.write_text(json.dumps({"energy": energy.tolist(), "forces": forces.tolist()}) + "\n")


if __name__ == "__main__" and "--regenerate" in sys.argv:
    regenerate_asset()
