"""`maskpot preflight` / `python -m pretrain.preflight`: rendezvous, all-reduce, forward/backward per rank."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.preflight import format_table
from tests.helpers.net import free_port
from tests.helpers.paths import PRETRAIN_TINY as TINY
from tests.helpers.paths import REPO
from tests.helpers.shards import write_water_frames


@pytest.fixture(scope="module")
def two_rank_shards(tmp_path_factory) -> Path:
    """8 train frames of 8 waters in 2 shards (one per rank)."""
    from data_shards.build import build_shards

    root = tmp_path_factory.mktemp("preflight_shards")
    write_water_frames(root / "train.xyz", 8, seed=3)
    build_shards([f"train={root / 'train.xyz'}"], str(root / "shards"), shard_size=4, use_ray=False, progress=False)
    return root / "shards"


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TQDM_DISABLE="1")


def test_table_names_the_slowest_rank():
    rows = [{"rank": 0, "host": "a", "atoms": 100, "seconds": 1.0, "loss": 0.5, "ok": True},
            {"rank": 1, "host": "b", "atoms": 100, "seconds": 4.0, "loss": 0.5, "ok": True}]
    assert "slowest rank: 1 (25.0 atoms/s, 4.00x slower than the fastest)" in format_table(rows)


def test_missing_manifest_fails_clearly_before_any_rendezvous(tmp_path):
    missing = tmp_path / "no_shards"
    one_rank = subprocess.run([sys.executable, "-m", "pretrain.preflight", "--config", str(TINY), "--timeout", "5",
                               "--override", f"data.manifest_dir={missing}"],
                              capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert one_rank.returncode != 0
    assert "preflight FAILED" in one_rank.stderr and f"manifest not found: {missing}" in one_rank.stderr
    cli = subprocess.run([sys.executable, "-m", "maskpot.cli", "preflight", "--config", str(TINY),
                          "--override", f"data.manifest_dir={missing}"],
                         capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert cli.returncode == 2 and "manifest not found" in cli.stderr


@pytest.mark.slow
def test_two_rank_torchrun_preflight_passes(two_rank_shards):
    out = subprocess.run([sys.executable, "-m", "maskpot.cli", "preflight", "--config", str(TINY), "--nproc", "2",
                          "--override", f"data.manifest_dir={two_rank_shards}"],
                         capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "preflight ok: 2 rank(s)" in out.stdout
    table = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert [row[0] for row in table] == ["0", "1"] and all(row[-1] == "ok" for row in table)
    print(out.stdout)
    # 2 batches of 2 structures per rank; masking deletes one H of half the 8 waters: 20 atoms each
    assert all(float(row[2]) == 2 * 2 * 20 for row in table)
    assert "slowest rank:" in out.stdout


def test_rendezvous_timeout_names_master_addr_and_port(two_rank_shards):
    port = free_port()  # nobody listens there: rank 0 never comes
    env = dict(_env(), RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = subprocess.run([sys.executable, "-m", "pretrain.preflight", "--config", str(TINY), "--timeout", "3",
                          "--override", f"data.manifest_dir={two_rank_shards}"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
    assert f"no rendezvous within 3 s at MASTER_ADDR=127.0.0.1 MASTER_PORT={port}" in out.stderr
