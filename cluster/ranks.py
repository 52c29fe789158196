"""Map a scheduler's environment onto torch.distributed's: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT.

One function serves `srun` (SLURM_* variables), torchrun and the deepspeed launcher (which already set
the torch variables: those win). Imports nothing from the other maskpot packages.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

PORT_BASE, PORT_SPAN = 20000, 20000  # MASTER_PORT = PORT_BASE + job_id mod PORT_SPAN


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # "torch" (torchrun/deepspeed), "slurm", or "single"

    def as_environ(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size), "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: 'gpu[003-005,009],cpu1' → 'gpu003'; 'n1,n2' → 'n1'."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM nodelist")
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    assert m is not None
    prefix, bracket = m.group(1), m.group(3)
    if bracket is None:
        return prefix
    first = bracket.split(",")[0].split("-")[0]
    return prefix + first


def resolve(environ: dict[str, str] | None = None) -> DistEnv:
    """Rank layout from the environment: torch variables if set, else SLURM's, else one process."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)), source="torch",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        port = int(env.get("MASTER_PORT", PORT_BASE + job_id % PORT_SPAN))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_NTASKS"]), master_addr=addr, master_port=port, source="slurm",
        )
    return DistEnv(0, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT", 29500)), source="single")
