"""Issue 12.1: resuming a pretraining unpickles nothing. A pickle payload (a __reduce__ that creates a file)
planted as each file a 2-rank ZeRO-1 resume reads is refused: the file is not created and the run stops
with a one-line error (exit 2)."""
from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.pretrain_processes import build_tiny_shards, maskpot, pretrain_argv


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def plant(tag_dir: Path, name: str, marker: Path) -> None:
    """Replace `name` by a payload and rewrite state.json's recorded sizes, as an attacker could."""
    torch.save({"module": Payload(marker), "optimizer_state_dict": Payload(marker)}, tag_dir / name)
    state = json.loads((tag_dir / "state.json").read_text())
    state["files"][name] = (tag_dir / name).stat().st_size
    (tag_dir / "state.json").write_text(json.dumps(state))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("nopickle")
    shards = build_tiny_shards(root)
    run = root / "run"
    done = maskpot(*pretrain_argv(shards, run, "train.max_steps=2", "train.checkpoint_every=2",
                                  "train.keep_last=1", "deepspeed.zero_stage=1", resume="never"))
    assert done.returncode == 0, done.stderr[-3000:]
    return shards, run


READ_ON_RESUME = ["mp_rank_00_model_states.pt",  # every rank reads it; rank 1 then its own partition
                  "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("name", READ_ON_RESUME)
def test_resume_refuses_a_pickle_payload_in_each_checkpoint_file(trained, tmp_path, name):
    shards, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    tags = sorted((copy / "checkpoints").glob("step*"))
    assert [t.name for t in tags] == ["step00000002"] and (tags[0] / name).is_file()
    marker = tmp_path / "PWNED"
    plant(tags[0], name, marker)
    done = maskpot(*pretrain_argv(shards, copy, "train.max_steps=4", "train.checkpoint_every=2",
                                  "train.keep_last=1", "deepspeed.zero_stage=1"))
    assert not marker.exists(), "the pickle payload ran"
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert errors and all("refused to load" in e or "no loadable checkpoint" in e for e in errors), done.stderr[-3000:]
    assert any(name in line and "refused to load" in line for line in done.stderr.splitlines())
    assert "Traceback" not in done.stderr


def test_safe_load_reads_real_deepspeed_files_and_refuses_payloads(tmp_path):
    """The allow-list suffices for what DeepSpeed writes (ZeRO 0-2, fp32/bf16) and nothing else gets in."""
    from pretrain.checkpoint_engine import UnsafeCheckpoint, safe_load

    marker = tmp_path / "PWNED"
    torch.save({"x": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpoint, match="evil.pt: refused to load"):
        safe_load(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"w": torch.ones(2), "n": 3, "s": "x"}, tmp_path / "ok.pt")
    assert safe_load(tmp_path / "ok.pt")["n"] == 3
