"""Local multi-process launcher bound to loopback: `python -m pretrain.launch --nproc N -- -m pretrain ...`.

`torchrun --standalone` (and torchrun's c10d/static rendezvous) hosts its TCP store on every interface
(`::`), whatever endpoint it is given. This launcher starts N ranks of one node itself, with
MASTER_ADDR=127.0.0.1, and rank 0 hosts the store on a socket bound to MASTER_ADDR only
(`pretrain.engine.bind_store`); gloo is pinned to the loopback interface. Multi-node runs (SLURM,
`cluster.launch`) bind the MASTER_ADDR the cluster config names the same way.

Signals TERM, INT, HUP, QUIT and USR1 are forwarded to every rank (USR1: SLURM's before-walltime
signal, on which every rank checkpoints and exits 0). When a rank fails, the others are stopped; the
exit status is the first failing rank's (0 when all succeed).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)
STOP_GRACE_S = 30.0


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def loopback_interface() -> str | None:
    """The loopback interface's name (Linux `lo`), for GLOO_SOCKET_IFNAME; None where it cannot be told."""
    for _, name in socket.if_nameindex():
        flags = Path(f"/sys/class/net/{name}/flags")
        if flags.is_file() and int(flags.read_text(), 16) & 0x8:  # IFF_LOOPBACK
            return name
    return None


def rank_env(rank: int, nproc: int, port: int, base: dict) -> dict:
    env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               GROUP_RANK="0", MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port))
    env.setdefault("OMP_NUM_THREADS", "1")
    for inherited in ("TORCHELASTIC_USE_AGENT_STORE", "MASKPOT_HOSTED_STORE"):
        env.pop(inherited, None)  # rank 0 hosts the store, bound to MASTER_ADDR (pretrain.engine.bind_store)
    lo = loopback_interface()
    if lo and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = lo
    return env


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_ranks(nproc: int, argv: list[str], env: dict | None = None) -> int:
    """Start `python ARGV` as ranks 0..nproc-1 on loopback; forward signals; first failing status or 0."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    port = free_port()
    base = dict(os.environ if env is None else env)
    procs = [subprocess.Popen([sys.executable, *argv], env=rank_env(r, nproc, port, base)) for r in range(nproc)]

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                _stop(procs)
                return failed[0] if failed[0] > 0 else 128 - failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.launch", description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then python's arguments (e.g. -m pretrain ...)")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given after --")
    return run_ranks(args.nproc, command)


if __name__ == "__main__":
    sys.exit(main())
