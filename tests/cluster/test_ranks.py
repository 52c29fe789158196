import subprocess
import sys

import pytest

from cluster.ranks import PORT_BASE, first_host, resolve


@pytest.mark.parametrize("nodelist,host", [
    ("n1", "n1"), ("n1,n2", "n1"), ("gpu[003-005,009]", "gpu003"),
    ("node[12,14]", "node12"), ("a-b[7-8],c1", "a-b7"),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_slurm_variables_map_to_torch_ranks():
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
           "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[01-02]"}
    d = resolve(env)
    assert (d.rank, d.local_rank, d.world_size, d.master_addr) == (3, 1, 4, "gpu01")
    assert d.master_port == PORT_BASE + 1234 and d.source == "slurm"


def test_torch_variables_win_over_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "555",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}
    d = resolve(env)
    assert (d.rank, d.world_size, d.master_port, d.source) == (1, 2, 555, "torch")


def test_single_process_default():
    assert resolve({}).world_size == 1


def test_launch_exports_and_execs():
    env = {"SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "n[1-2]", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "cluster.launch", "--", sys.executable, "-c",
         "import os; print(os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['MASTER_ADDR'])"],
        env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "2", "n1"]
