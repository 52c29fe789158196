"""Issue 12.8: a running single-node `maskpot pretrain` listens on loopback only (torchrun --standalone hosted
its rendezvous store on every interface); multi-node rank 0 binds the MASTER_ADDR it is given."""
from __future__ import annotations

import ipaddress
import os

import psutil
import pytest

from tests.helpers.net import free_port
from tests.helpers.pretrain_processes import build_tiny_shards, start_pretrain, wait_for


def listening(pid: int) -> list[tuple[int, str, int]]:
    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    found = []
    for proc in procs:
        try:
            found += [(proc.pid, c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.slow
def test_running_pretraining_listens_on_loopback_only(tmp_path):
    shards = build_tiny_shards(tmp_path)
    out = tmp_path / "run"
    proc = start_pretrain(shards, out, "train.max_steps=6", step_sleep=1.0)
    try:
        wait_for(out / "metrics.jsonl", proc)
        sockets = listening(proc.pid)
    finally:
        proc.terminate()
        proc.communicate(timeout=120)
    assert sockets, "no listening socket found: the check would prove nothing"
    exposed = [s for s in sockets if not ipaddress.ip_address(s[1]).is_loopback]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_rank0_store_binds_the_named_master_addr_only(monkeypatch):
    """What a multi-node rank 0 does (cluster.launch sets MASTER_ADDR to the first node): bind that address."""
    from pretrain.distributed import HOSTED_STORE_ENV, bind_store

    port = free_port()
    for k, v in {"RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.delenv(HOSTED_STORE_ENV, raising=False)
    bind_store()
    mine = [c for c in psutil.Process(os.getpid()).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert [c.laddr.ip for c in mine] == ["127.0.0.1"]
    assert os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "True"  # rank 0 then joins as a client
