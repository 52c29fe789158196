"""The one home of torch.distributed in maskpot: process group, backend choice, and every collective.

NCCL only accepts tensors on the rank's CUDA device; gloo only CPU tensors. Callers therefore never hand
tensors to `torch.distributed` themselves: each helper here copies its input onto `comm_device()`
(`cuda:LOCAL_RANK` under NCCL, the CPU under gloo), runs the collective and returns CPU tensors or plain
Python values. `tests/pretrain/test_distributed_tree.py` fails if any other module calls a collective,
and `tests/pretrain/test_nccl_device_guard.py` runs the real 2-rank pretraining under a guard that rejects
a collective on a tensor that did not pass through `to_comm` (what NCCL does to a CPU tensor).

Launch checks (`check_launch`) turn a setup that cannot work into one `LaunchError` line naming the
setting and its value, before any rank starts work: `cuda` without CUDA, `nccl` without CUDA, more local
ranks than visible GPUs, a MASTER_ADDR that does not resolve.
"""
from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from pretrain.launch import free_port

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("gloo", "nccl")
BACKEND_ENV = "MASKPOT_DIST_BACKEND"  # gloo | nccl: overrides the choice made from the device
OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class LaunchError(ValueError):
    """A setup that cannot work (one line naming the setting and value); the CLIs exit 2 on it."""


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """`auto` | `cpu` | `cuda` → the torch device of this rank (cuda:LOCAL_RANK). LaunchError on cuda without CUDA."""
    if name not in DEVICES:
        raise LaunchError(f"device {name!r} is not one of {list(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise LaunchError("device 'cuda' was asked for but torch sees no CUDA device "
                          f"(torch {torch.__version__}, "
                          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                          "use device 'cpu' or 'auto'")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    return torch.device("cuda", local)


def choose_backend(device: torch.device, env: Mapping[str, str] = os.environ) -> str:
    """nccl for CUDA ranks, gloo for CPU ranks; MASKPOT_DIST_BACKEND overrides (checked by check_launch)."""
    wanted = env.get(BACKEND_ENV, "")
    if wanted:
        if wanted not in BACKENDS:
            raise LaunchError(f"{BACKEND_ENV}={wanted!r} is not one of {list(BACKENDS)}")
        return wanted
    return "nccl" if device.type == "cuda" else "gloo"


def check_launch(device: torch.device, backend: str, env: Mapping[str, str] = os.environ,
                 gpus: int | None = None) -> None:
    """LaunchError naming the setting and value when this rank's setup cannot work (before any work)."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if backend == "nccl" and gpus == 0:
        raise LaunchError(f"backend 'nccl' needs CUDA but torch sees no GPU ({BACKEND_ENV}="
                          f"{env.get(BACKEND_ENV, '')!r}, device {str(device)!r}); use gloo / device 'cpu'")
    if device.type == "cuda":
        local_ranks = int(env.get("LOCAL_WORLD_SIZE", int(env.get("LOCAL_RANK", 0)) + 1))
        if local_ranks > gpus:
            raise LaunchError(f"{local_ranks} ranks on this node (LOCAL_WORLD_SIZE={local_ranks}) but {gpus} "
                              f"visible GPU(s) (CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r}): "
                              "start one rank per GPU (--nproc / --ntasks-per-node = GPUs per node)")
    addr = env.get("MASTER_ADDR")
    if addr:
        try:
            socket.getaddrinfo(addr, None)
        except (socket.gaierror, UnicodeError) as err:
            raise LaunchError(f"MASTER_ADDR={addr!r} does not resolve on {socket.gethostname()} ({err}); "
                              "set it to the first node's hostname or IP address") from err


HOSTED_STORE_ENV = "MASKPOT_HOSTED_STORE"  # "addr:port" of the store this process tree's rank 0 hosts
_STORES: dict[str, tuple] = {}  # rank 0's TCPStore servers (with their sockets), alive as long as the process


def bind_store() -> None:
    """Rank 0 hosts the rendezvous store on MASTER_ADDR only (torch's own store listens on every interface).

    Skipped under torchrun (TORCHELASTIC_USE_AGENT_STORE set by its agent, which hosts the store).
    Afterwards every rank, rank 0 included, connects to the store as a client.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if agent_store and HOSTED_STORE_ENV not in os.environ:
        return
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    key = f"{addr}:{port}"
    if os.environ["RANK"] == "0" and key not in _STORES:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(128)
        _STORES[key] = (sock, dist.TCPStore(addr, port, is_master=True, wait_for_workers=False,
                                            master_listen_fd=sock.fileno()))
    os.environ.update({HOSTED_STORE_ENV: key, "TORCHELASTIC_USE_AGENT_STORE": "True"})


def init_process_group(device: str = "auto") -> tuple[int, int, torch.device]:
    """Join (or, run alone, create) the process group through DeepSpeed; returns (rank, world_size, device).

    torchrun, the deepspeed launcher and `cluster.launch` set RANK/WORLD_SIZE/MASTER_*; a bare process
    becomes a one-rank group on 127.0.0.1.
    """
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    where = resolve_device(device)
    backend = choose_backend(where)
    check_launch(where, backend)
    if where.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(where)
    bind_store()
    # deepspeed is imported here, after DS_ACCELERATOR is set: it picks its accelerator once, on import.
    import deepspeed  # startup: deepspeed+mlflow+torch
    import deepspeed.ops  # startup: deepspeed+mlflow+torch

    # Otherwise the first initialize JIT-compiles a shared-memory allreduce (about 1-2 minutes on CPU).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size(), where


def is_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_ready() else 0


def world_size() -> int:
    return dist.get_world_size() if is_ready() else 1


def comm_device() -> torch.device:
    """Where collective tensors must live: cuda:LOCAL_RANK under NCCL, the CPU otherwise."""
    if is_ready() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_comm(tensor: torch.Tensor) -> torch.Tensor:
    """A private copy of `tensor` on comm_device(), contiguous: what every collective here is given."""
    return tensor.detach().to(comm_device(), copy=True).contiguous()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Element-wise sum | max | min over ranks of `tensor` (any device); a new CPU tensor, input untouched."""
    t = to_comm(tensor)
    dist.all_reduce(t, op=OPS[op])
    return t.cpu()


def all_reduce_scalar(value: float, op: str = "sum") -> float:
    return all_reduce(torch.tensor([float(value)], dtype=torch.float64), op).item()


def all_sum(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Sums over ranks of several float64 tensors in one all-reduce (CPU results, input shapes)."""
    flat = all_reduce(torch.cat([t.detach().cpu().double().reshape(-1) for t in tensors]))
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


def agree(flag: bool) -> bool:
    """True on every rank iff `flag` is true on every rank."""
    return all_reduce_scalar(1.0 if flag else 0.0, "min") == 1.0


def any_rank(flag: bool) -> bool:
    return all_reduce_scalar(1.0 if flag else 0.0, "max") == 1.0


def all_gather_rows(row: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `row` (same shape and dtype on all ranks), in rank order, as CPU tensors (no pickle)."""
    mine = to_comm(row)
    rows = [to_comm(torch.zeros_like(row)) for _ in range(world_size())]
    dist.all_gather(rows, mine)
    return [r.cpu() for r in rows]


def barrier() -> None:
    if is_ready():
        kwargs: dict[str, Any] = {"device_ids": [comm_device().index]} if comm_device().type == "cuda" else {}
        dist.barrier(**kwargs)


def destroy() -> None:
    """Barrier (no rank tears the group down while another still uses it), then destroy the group."""
    if is_ready():
        barrier()
        dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End this rank now with status `code`: flush stdout/stderr, then skip interpreter finalization.

    For a rank whose work is finished and agreed on (after `destroy()`). torch's C++ threads (gloo's
    workers, the TCPStore rank 0 hosts) may still release Python objects while the interpreter is being
    torn down; a thread that then needs the GIL aborts the process ("terminate called without an active
    exception", status 134) after the rank succeeded (pytorch/pytorch#179291). atexit handlers do not run.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)
