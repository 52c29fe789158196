"""benchmarks/gpu_check.py: refuses cleanly without CUDA; its pretraining (checkpoint + exact resume from a
cut-back copy) and finetune checks run here on the CPU (gloo) so the script is known to work before a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("script", ["gpu_check.py", "gpu_check.sh"])
def test_without_cuda_it_exits_2_with_one_line(script):
    path = REPO / "benchmarks" / script
    cmd = [sys.executable, str(path)] if script.endswith(".py") else ["bash", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                         env=dict(os.environ, PYTHON=sys.executable, MASKPOT_SKIP_INSTALL="1"))
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "gpu_check: no CUDA device visible to torch" in lines[0], out


@pytest.mark.slow
def test_the_pretrain_resume_and_finetune_checks_work_on_cpu(tmp_path):
    shards = gpu_check.build_shards(tmp_path / "data")
    result = gpu_check.pretrain_check(shards, tmp_path, "fp32", 1, nproc=2, device="cpu")
    assert result["ok"] and result["exact_resume"], result
    assert result["resumed_losses"] == {s: result["losses"][s] for s in (4, 5, 6)}
    finetune = gpu_check.finetune_check(shards, tmp_path, Path(result["export"]), device="cpu")
    assert finetune["ok"] and finetune["device"] == "cpu", finetune
