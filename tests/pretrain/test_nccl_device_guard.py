"""The GPU path's collectives, checked on CPU: real 2-rank DeepSpeed runs under an NCCL stand-in.

On a GPU node the process group is NCCL, and NCCL fails any collective given a CPU tensor with
`RuntimeError: No backend type associated with device type cpu`. On this CPU machine the group is gloo,
which accepts CPU tensors, so a plain run cannot show that failure. `comm_guard/sitecustomize.py` (loaded
by every process of the run through PYTHONPATH) makes gloo behave like NCCL for the project's own calls:
a tensor counts as "on the GPU" only if it came out of `pretrain.distributed.to_comm` (the one function
that moves tensors onto `comm_device()`, i.e. `cuda:LOCAL_RANK` under NCCL); every other tensor given to a
collective by project code is one that would still sit on the CPU on a GPU node, and is rejected with
NCCL's error. DeepSpeed's own collectives (its tensors live on the engine's device) are not touched.

The runs cover every collective the project issues: the preflight (all-reduce, all-gather, barrier),
pretraining steps (lockstep batch agreement, loss/non-finite agreement, preemption-signal agreement each
step), validation sums and the linear probe, checkpoint save (barriers) and the resume's agreement on a
loadable tag. On main before `pretrain/distributed.py` (collectives on CPU tensors in loop.py,
preflight.py, probe.py, checkpoint.py) the preflight fails on its all-reduce and the pretraining at its
first lockstep agreement.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import PRETRAIN_TINY as TINY
from tests.helpers.pretraining import run_pretrain, train_losses

REPO = Path(__file__).resolve().parents[2]
GUARD = Path(__file__).resolve().parent / "comm_guard"
NCCL_ERROR = "No backend type associated with device type cpu"


def guard_env(root: Path = REPO) -> dict[str, str]:
    path = os.pathsep.join([str(GUARD), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path, "MASKPOT_COMM_GUARD": "1", "MASKPOT_COMM_GUARD_ROOT": str(root),
            "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TQDM_DISABLE": "1"}


BARE_COLLECTIVE = """
import os, torch, torch.distributed as dist
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"); init = "file://{store}"   # no port to race for
dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
from pretrain import distributed as D
assert D.all_reduce_scalar(2.0) == 2.0 and D.agree(True)   # through the communication module: fine
dist.all_reduce(torch.ones(1))                                # a CPU tensor straight to the collective
"""


def test_the_guard_fails_a_bare_collective_like_nccl(tmp_path):
    """The guard is live: project code handing a CPU tensor to a collective gets NCCL's error."""
    script = tmp_path / "old_style.py"
    script.write_text(BARE_COLLECTIVE.format(store=tmp_path / "store"))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, **guard_env(root=tmp_path)))
    assert out.returncode != 0 and NCCL_ERROR in out.stderr, out.stderr[-2000:]
    assert "old_style.py:7" in out.stderr  # names the offending call


@pytest.mark.slow
def test_preflight_and_two_rank_pretraining_pass_under_the_nccl_guard(tiny_shards, tmp_path, monkeypatch):
    for key, value in guard_env().items():
        monkeypatch.setenv(key, value)
    preflight = subprocess.run([sys.executable, "-m", "maskpot.cli", "preflight", "--config", str(TINY),
                                "--nproc", "2", "--override", f"data.manifest_dir={tiny_shards}"],
                               capture_output=True, text=True, cwd=REPO, timeout=300)
    assert preflight.returncode == 0 and "preflight ok: 2 rank(s)" in preflight.stdout, \
        (preflight.stdout + preflight.stderr)[-3000:]

    out = tmp_path / "guarded"
    # validation with the linear probe (tiny_shards are labelled), checkpoints every 2 steps
    assert run_pretrain(tiny_shards, out, "train.max_steps=4", "train.val_every=2", "train.checkpoint_every=2",
                        "train.linear_probe=true", resume="never") == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert all("probe_energy_rmse_mev_per_atom" in r for r in records if "val_loss" in r)
    # the resume agrees across ranks on a loadable tag, then trains on
    assert run_pretrain(tiny_shards, out, "train.max_steps=6") == 0
    assert sorted(train_losses(out)) == [1, 2, 3, 4, 5, 6]
