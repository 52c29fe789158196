"""Setups that cannot work on this machine fail with one line naming the setting and value, exit 2, before
any work starts: CUDA asked for without CUDA, nccl without CUDA, a MASTER_ADDR that does not resolve.
(More ranks than GPUs needs a GPU machine to reach; `check_launch` is unit-tested for it.)"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.paths import FINETUNE_TINY, REPO
from tests.helpers.paths import PRETRAIN_TINY as TINY
from tests.helpers.paths import TINY_EXPORT as EXPORT

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a CPU-only machine")


def maskpot(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO,
                          env=full_env, timeout=300, check=False)


def one_line(out: subprocess.CompletedProcess, *expected: str) -> None:
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert out.returncode == 2 and len(lines) == 1, (out.returncode, out.stderr[-2000:])
    assert all(e in lines[0] for e in expected), lines[0]


@pytest.mark.parametrize("override, env, expected", [
    ("train.device=cuda", {}, ["device 'cuda' was asked for but torch sees no CUDA device"]),
    ("train.device=auto", {"MASKPOT_DIST_BACKEND": "nccl"}, ["backend 'nccl' needs CUDA", "MASKPOT_DIST_BACKEND"]),
])
def test_pretrain_and_preflight_refuse_before_launching(tiny_shards, tmp_path, override, env, expected):
    out_dir = tmp_path / "run"
    common = ["--config", str(TINY), "--nproc", "2", "--override", f"data.manifest_dir={tiny_shards}",
              f"train.out_dir={out_dir}", override]
    one_line(maskpot("maskpot.cli", "pretrain", *common, env=env), "maskpot pretrain: error:", *expected)
    one_line(maskpot("maskpot.cli", "preflight", *common, env=env), *expected)
    assert not out_dir.exists()


def test_a_rank_with_an_unresolvable_master_addr_stops_before_any_work(tiny_shards, tmp_path):
    out_dir = tmp_path / "run"
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "no-such-node.invalid",
           "MASTER_PORT": "29411", "DS_ACCELERATOR": "cpu"}
    args = ["--config", str(TINY), "--override", f"data.manifest_dir={tiny_shards}", f"train.out_dir={out_dir}"]
    one_line(maskpot("pretrain", *args, env=env), "MASTER_ADDR='no-such-node.invalid' does not resolve")
    assert not out_dir.exists()
    one_line(maskpot("pretrain.preflight", *args, "--timeout", "20", env=env),
             "preflight FAILED", "MASTER_ADDR='no-such-node.invalid' does not resolve")


def test_finetune_evaluate_md_and_calculator_refuse_cuda(tmp_path):
    from finetune.forcefield.calculator import MaskpotCalculator

    out_dir = tmp_path / "ft"
    one_line(maskpot("maskpot.cli", "finetune", "--config", str(FINETUNE_TINY), "--override",
                     f"data.manifest_dir={tmp_path}", f"train.out_dir={out_dir}", "train.device=cuda"),
             "train.device is 'cuda' but torch sees no CUDA device")
    assert not out_dir.exists()
    one_line(maskpot("maskpot.cli", "evaluate", str(EXPORT), str(tmp_path / "absent.xyz"), "--device", "cuda",
                     "--out", str(tmp_path / "ev")),
             "device 'cuda' was asked for but torch sees no CUDA device")
    one_line(maskpot("maskpot.cli", "md", str(EXPORT), str(tmp_path / "absent.xyz"), "--steps", "2",
                     "--temperature", "300", "--device", "cuda:1"),
             "device 'cuda:1' was asked for but torch sees no CUDA device")
    with pytest.raises(ValueError, match="device 'cuda' was asked for"):
        MaskpotCalculator(EXPORT, device="cuda")
    assert MaskpotCalculator(EXPORT, device="auto").device == torch.device("cpu")
