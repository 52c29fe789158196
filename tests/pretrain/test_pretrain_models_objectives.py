"""GNS and ForceNet under every pretraining objective, each a real 2-rank DeepSpeed run (torchrun) of two
optimizer steps on the tiny shard set: finite losses, a validation record and an export that loads.

One launch per (model, objective), about 10-20 s each on 2 CPU cores; tiny widths keep it short."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from pretrain.config import OBJECTIVES
from tests.helpers.paths import PRETRAIN_TINY
from tests.helpers.pretraining import pretrain_cli

TINY_MODELS = {
    "gns": {"latent": 16, "steps": 2, "mlp_layers": 1, "cutoff": 3.4},
    "forcenet": {"hidden": 16, "blocks": 2, "decoder_hidden": 16, "num_radial": 4, "cutoff": 3.4},
}
# the engine varies along the matrix so that every model also meets ZeRO-2 + bf16 + accumulation
ENGINE = {"mask+denoise": ("deepspeed.zero_stage=2", "deepspeed.precision=bf16",
                           "deepspeed.gradient_accumulation_steps=2"),
          "supervised": ("deepspeed.zero_stage=1",)}


def model_config(tmp_path: Path, name: str) -> Path:
    """The tiny config with its model section replaced (overrides merge into model.params, never drop keys)."""
    cfg = yaml.safe_load(PRETRAIN_TINY.read_text())
    cfg["model"] = {"name": name, "params": TINY_MODELS[name]}
    path = tmp_path / f"pretrain_{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path, shards: Path, out_dir: Path, *overrides: str) -> int:
    return pretrain_cli(config, shards, out_dir, "train.max_steps=2", "train.val_every=2", "train.log_every=1",
                        *overrides, resume="never")


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("model", sorted(TINY_MODELS))
def test_two_ranks_pretrain_every_model_under_every_objective(model, objective, tiny_shards, tmp_path):
    from pretrain.export import load_export

    out = tmp_path / "run"
    engine = ENGINE.get(objective, ())
    assert launch(model_config(tmp_path, model), tiny_shards, out, f"objective.kind={objective}", *engine) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) and v > 0 for v in losses.values())
    (val,) = [r for r in records if "val_loss" in r]
    assert math.isfinite(val["val_loss"])
    assert math.isfinite(val["probe_energy_rmse_mev_per_atom"])  # the tiny shards carry (made-up) labels
    exported, meta = load_export(out / "export")
    assert meta["model"] == model and meta["lineage"]["pretrain_objective"] == objective
    assert all(torch.isfinite(p).all() for p in exported.parameters())
    ds = json.loads((out / "deepspeed_config.json").read_text())
    assert ds["bf16"]["enabled"] == ("deepspeed.precision=bf16" in engine)


def test_every_objective_kind_is_one_registry_entry():
    """config validation, the transform, the losses and the data checks all read pretrain/pretext.py."""
    from pretrain.config import OBJECTIVES, ObjectiveConfig
    from pretrain.loop import objective_transform
    from pretrain.pretext import PRETEXT_TASKS

    assert OBJECTIVES == tuple(PRETEXT_TASKS)
    for kind, task in PRETEXT_TASKS.items():
        o = ObjectiveConfig(kind=kind)
        assert (o.uses_mask, o.uses_denoise) == (task.mask, task.denoise)
        assert (objective_transform(o, 0) is None) == (task.transform is None)
    assert [k for k, t in PRETEXT_TASKS.items() if t.water_only] == ["mask", "mask+denoise"]
