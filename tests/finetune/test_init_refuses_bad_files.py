"""Issue 12.1 (finetune init) and 12.7: `--init` never unpickles and never prints a traceback. A DeepSpeed tag
whose model states are a pickle payload is refused without running it; a truncated or non-safetensors export
is a one-line error in finetune --init and evaluate (exit 2)."""
from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.bad_inputs import REPO, build_water_shards, maskpot, one_line_error

EXPORT = REPO / "tests" / "assets" / "egnn_tiny_export"
FINETUNE_TINY = REPO / "configs" / "finetune" / "tiny.yaml"


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_water_shards(tmp_path_factory.mktemp("ftinit"))


def finetune(shards: Path, out: Path, init: Path):
    return maskpot("finetune", "--config", str(FINETUNE_TINY), "--init", str(init), "--override",
                   f"data.manifest_dir={shards}", f"train.out_dir={out}", "train.max_steps=1", "tracking.enabled=false")


def pickled_tag(tmp_path: Path, marker: Path) -> Path:
    """A tag folder as `maskpot pretrain` writes it, its model states replaced by a payload."""
    tag = tmp_path / "run" / "checkpoints" / "step00000002"
    tag.mkdir(parents=True)
    torch.save({"module": Payload(marker)}, tag / "mp_rank_00_model_states.pt")
    meta = json.loads((EXPORT / "model.json").read_text())
    state = {"config": {"model.name": meta["model"], "model.params": meta["params"], "deepspeed.zero_stage": 0,
                        "deepspeed.precision": "fp32", "objective.kind": "mask"},
             "config_hash": "0" * 64, "manifest_sha256": "1" * 64, "train_state": {"step": 2},
             "files": {"mp_rank_00_model_states.pt": (tag / "mp_rank_00_model_states.pt").stat().st_size}}
    (tag / "state.json").write_text(json.dumps(state))
    return tag


def test_pickled_deepspeed_tag_is_refused_without_running_it(shards, tmp_path):
    marker = tmp_path / "PWNED"
    line = one_line_error(finetune(shards, tmp_path / "ft", pickled_tag(tmp_path, marker)))
    assert "refused to load" in line and "mp_rank_00_model_states.pt" in line
    assert "weights_only=False" not in line  # torch's own message suggests turning the protection off
    assert not marker.exists()


def test_truncated_export_in_finetune_init(shards, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(EXPORT, export)
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = one_line_error(finetune(shards, tmp_path / "ft", export))
    assert "model.safetensors" in line and "not a readable safetensors file" in line


@pytest.mark.parametrize("content", ["pickle", "text"])
def test_non_safetensors_export_in_evaluate(shards, tmp_path, content):
    export = tmp_path / "export"
    shutil.copytree(EXPORT, export)
    if content == "pickle":
        torch.save({"w": torch.ones(2)}, export / "model.safetensors")
    else:
        (export / "model.safetensors").write_text("not weights at all\n")
    line = one_line_error(maskpot("evaluate", str(export), str(shards), "--out", str(tmp_path / "ev")))
    assert "model.safetensors" in line and "not a readable safetensors file" in line
