"""The deepspeed launcher on CPU: `DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module pretrain ...` starts two
ranks (with and without --local_rank passed to the script) and pretrains. `--include localhost:0,1` needs
LOCAL_SIZE=2: DeepSpeed's CPU accelerator counts one device per NUMA node otherwise."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.net import free_port
from tests.helpers.paths import PRETRAIN_TINY, REPO

# the launcher installed beside this interpreter (CI runs .venv/bin/pytest without activating the venv)
DEEPSPEED = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
pytestmark = pytest.mark.skipif(DEEPSPEED is None, reason="no deepspeed launcher beside python or on PATH")


def deepspeed_pretrain(shards: Path, out_dir: Path, launcher_args: list[str], env_extra: dict | None = None):
    cmd = [DEEPSPEED, *launcher_args, "--master_port", str(free_port()), "--module", "pretrain",
           "--config", str(PRETRAIN_TINY), "--resume", "never", "--override", f"data.manifest_dir={shards}",
           f"train.out_dir={out_dir}", "train.max_steps=2", "train.val_every=2", "train.log_every=1"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key, value in (env_extra or {}).items():  # None: unset
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)


def check_two_rank_run(proc, out_dir: Path) -> None:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)
    # structures per step = batch_size 2 × world size 2: both ranks joined one process group
    assert all(r["structures_per_s"] == pytest.approx(4 * r["steps_per_s"]) for r in train)
    assert sorted(p.name for p in out_dir.glob("rank*.pid")) == ["rank0.pid", "rank1.pid"]
    assert (out_dir / "export" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("launcher_args, env_extra", [
    (["--num_gpus", "2", "--no_local_rank"], None),
    (["--num_gpus", "2"], None),                            # the script receives --local_rank=N
    (["--include", "localhost:0,1", "--no_local_rank"], {"LOCAL_SIZE": "2"}),
], ids=["num_gpus", "num_gpus-local_rank-arg", "include-LOCAL_SIZE"])
def test_deepspeed_launcher_pretrains_two_steps_on_cpu(tiny_shards, tmp_path, launcher_args, env_extra):
    out = tmp_path / "run"
    check_two_rank_run(deepspeed_pretrain(tiny_shards, out, launcher_args, env_extra), out)


@pytest.mark.slow
def test_include_without_local_size_is_refused_by_the_launcher(tiny_shards, tmp_path, monkeypatch):
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    if CPU_Accelerator().device_count() >= 2:
        pytest.skip("this machine has >= 2 NUMA nodes: the CPU accelerator counts 2 devices without LOCAL_SIZE")
    proc = deepspeed_pretrain(tiny_shards, tmp_path / "run", ["--include", "localhost:0,1"], {"LOCAL_SIZE": None})
    assert proc.returncode != 0
    assert "No slot '1' specified on host 'localhost'" in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()
