"""`pretrain/distributed.py` is the only module that talks to torch.distributed, and its launch checks
turn setups that cannot work into one line before any work starts."""
from __future__ import annotations

import ast
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain import distributed as D

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("data_shards", "pretrain", "finetune", "maskpot", "cluster", "benchmarks")
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "barrier", "reduce", "gather", "gather_object", "scatter",
               "scatter_object_list", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
               "send", "recv", "isend", "irecv", "init_process_group", "destroy_process_group", "init_distributed"}
HOME = REPO / "pretrain" / "distributed.py"


def _dist_aliases(tree: ast.AST) -> set[str]:
    """Names bound to torch.distributed / deepspeed.comm / deepspeed in a module."""
    names = {"torch.distributed", "deepspeed.comm", "deepspeed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.asname and a.name in ("torch.distributed", "deepspeed.comm")}
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "deepspeed"):
            names |= {a.asname or a.name for a in node.names if a.name in ("distributed", "comm")}
    return names


def collective_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases, found = _dist_aliases(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch.distributed", "deepspeed.comm"):
            found += [f"{path.relative_to(REPO)}:{node.lineno} from {node.module} import {a.name}"
                      for a in node.names if a.name in COLLECTIVES]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in aliases:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {owner}.{node.func.attr}")
    return found


def test_only_the_communication_module_calls_collectives():
    offenders = [call for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
                 if path != HOME for call in collective_calls(path)]
    assert offenders == [], "collectives outside pretrain/distributed.py:\n" + "\n".join(offenders)
    assert len(collective_calls(HOME)) >= 5  # the scan does see the calls where they belong


def test_the_scan_catches_every_spelling(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nimport torch.distributed as dist\nfrom torch import distributed as tdist\n"
                   "from torch.distributed import all_gather\nimport deepspeed.comm as dscomm\n"
                   "dist.all_reduce(t)\ntorch.distributed.barrier()\ntdist.broadcast(t, 0)\ndscomm.all_reduce(t)\n"
                   "dist.get_rank()\n")
    calls = [c.split(":")[1] for c in collective_calls_in(bad, tmp_path)]
    assert calls == ["4 from torch.distributed import all_gather", "6 dist.all_reduce", "7 torch.distributed.barrier",
                     "8 tdist.broadcast", "9 dscomm.all_reduce"]


def collective_calls_in(path: Path, root: Path) -> list[str]:
    global REPO
    saved, REPO = REPO, root
    try:
        return sorted(collective_calls(path), key=lambda c: int(c.split(":")[1].split()[0]))
    finally:
        REPO = saved


def test_comm_device_follows_the_backend(monkeypatch):
    assert D.comm_device() == torch.device("cpu")  # no group: the CPU
    monkeypatch.setattr(D, "is_ready", lambda: True)
    monkeypatch.setattr(D.dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert D.comm_device() == torch.device("cuda", 3)
    monkeypatch.setattr(D.dist, "get_backend", lambda *a: "gloo")
    assert D.comm_device() == torch.device("cpu")


def test_backend_follows_the_device_and_the_override_is_checked():
    assert D.choose_backend(torch.device("cuda", 0), env={}) == "nccl"
    assert D.choose_backend(torch.device("cpu"), env={}) == "gloo"
    assert D.choose_backend(torch.device("cuda", 0), env={D.BACKEND_ENV: "gloo"}) == "gloo"
    with pytest.raises(D.LaunchError, match="MASKPOT_DIST_BACKEND='mpi' is not one of"):
        D.choose_backend(torch.device("cpu"), env={D.BACKEND_ENV: "mpi"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
def test_cuda_asked_for_without_cuda_is_one_line():
    with pytest.raises(D.LaunchError, match="device 'cuda' was asked for but torch sees no CUDA device") as err:
        D.resolve_device("cuda")
    assert "\n" not in str(err.value)
    assert D.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(D.LaunchError, match="'tpu' is not one of"):
        D.resolve_device("tpu")


def test_launch_checks_name_the_setting_and_value():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    with pytest.raises(D.LaunchError, match="backend 'nccl' needs CUDA but torch sees no GPU"):
        D.check_launch(cpu, "nccl", env={D.BACKEND_ENV: "nccl"}, gpus=0)
    with pytest.raises(D.LaunchError, match=r"4 ranks on this node \(LOCAL_WORLD_SIZE=4\) but 2 visible GPU"):
        D.check_launch(cuda, "nccl", env={"LOCAL_WORLD_SIZE": "4", "CUDA_VISIBLE_DEVICES": "0,1"}, gpus=2)
    D.check_launch(cuda, "nccl", env={"LOCAL_WORLD_SIZE": "2"}, gpus=2)
    with pytest.raises(D.LaunchError, match="MASTER_ADDR='no-such-node.invalid' does not resolve"):
        D.check_launch(cpu, "gloo", env={"MASTER_ADDR": "no-such-node.invalid"}, gpus=0)
    D.check_launch(cpu, "gloo", env={"MASTER_ADDR": "127.0.0.1"}, gpus=0)
    D.check_launch(cpu, "gloo", env={"MASTER_ADDR": socket.gethostname()}, gpus=0)


EXIT_RANK = """
import atexit, sys
from pretrain import distributed as D
atexit.register(lambda: print("finalization ran"))
print("table", end="")                     # stdout is a pipe here: block-buffered, not yet written
sys.stderr.write("warning")
D.exit_rank(3)
print("not reached")
"""


def test_exit_rank_keeps_the_output_and_status_and_skips_finalization():
    out = subprocess.run([sys.executable, "-c", EXIT_RANK], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert (out.returncode, out.stdout, out.stderr) == (3, "table", "warning")
