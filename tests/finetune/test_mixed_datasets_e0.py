"""Finetuning on ethanol + 3BPA built into one shard set (issue 15 item 3): each sample's energy is moved from
its data set's E0 to the model's table. An untrained model (E ≈ the E0 table) is then off by about the
atomization energy for both molecules alike (≈ 4.7 and 4.9 eV/atom); without re-referencing, 3BPA's labels
sit a further Σ n_Z (E0_ethanol − E0_3BPA)[Z] / n ≈ 2.6 eV/atom away."""
from __future__ import annotations

import pytest
import torch

from data_shards.build import build_shards
from finetune.forcefield import metrics as M
from finetune.loop import make_stream
from pretrain.export import normalisation_from_stats
from pretrain.models import build_model
from tests.helpers.finetuning import cfg_with


@pytest.mark.needs_shared_data
def test_mixed_data_sets_are_put_on_one_energy_zero(shared_data, tmp_path, one_torch_thread):
    eth, bpa = shared_data / "ethanol_rmd17", shared_data / "3bpa"
    manifest = build_shards([f"train={eth / 'test_MD.xyz'}", f"val={bpa / 'train_mixedT.xyz'}"], tmp_path / "s",
                            use_ray=False, progress=False, shard_size=500,
                            e0s=(f"ethanol_rmd17={eth / 'isolated_atoms.xyz'}", f"3bpa={bpa / 'iso_atoms.xyz'}"))
    cfg = cfg_with({"data": {"manifest_dir": str(tmp_path / "s"), "batch_size": 50}, "train": {"val_batches": 4},
                    "tracking": {"enabled": False}})
    torch.manual_seed(0)
    model = build_model("egnn", {"hidden": 8, "layers": 1, "cutoff": 3.0})
    norm = normalisation_from_stats(manifest)
    model.set_normalisation(norm["energy_scale"], {int(z): v for z, v in norm["e0"].items()})

    def mean_error(split: str, rereference: bool) -> float:    # eV/atom, prediction − label
        stream = make_stream(cfg, split, 3.0, training=False)
        assert stream.transform is not None
        if not rereference:
            stream.transform = None                              # the labels as stored
        arrays = M.evaluate(model, stream, max_batches=2)[M.ARRAYS]
        return float((arrays["energy_per_atom_pred"] - arrays["energy_per_atom_ref"]).mean())

    ethanol, bpa = mean_error("train", True), mean_error("val", True)
    assert 4.0 < ethanol < 5.5 and abs(bpa - ethanol) < 0.5, (ethanol, bpa)
    assert mean_error("val", False) - ethanol > 2.0
