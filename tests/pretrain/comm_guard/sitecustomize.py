"""Test-only NCCL stand-in for gloo runs: a collective issued by project code on a tensor that was never
put on the communication device fails exactly as NCCL fails on a CPU tensor.

Python imports `sitecustomize` at start-up from the path, so every process of a run (torchrun and each
rank) that has this folder on PYTHONPATH and MASKPOT_COMM_GUARD=1 gets the guard, whatever version of
the project it runs (that is how the test shows the old code failing).

Why this is NCCL's failure on a CPU machine: under NCCL a tensor is usable by a collective only if it
lives on the rank's GPU, and the only way the project's tensors get there is `pretrain.distributed.to_comm`
(a copy onto `comm_device()`). Here every tensor returned by `to_comm` is marked as "on the comm device";
any other tensor reaching a collective from project code is a tensor that, on a GPU node, would still be
on the CPU: the guard raises NCCL's own error (`No backend type associated with device type cpu`).
Collectives issued by torch or DeepSpeed internals (their own tensors live on the engine's device) are
left alone; a project call that goes through `deepspeed.comm` is still checked.
"""
from __future__ import annotations

import os

if os.environ.get("MASKPOT_COMM_GUARD") == "1":
    import functools
    import importlib.abc
    import sys

    import torch
    import torch.distributed as dist

    MARK = "_maskpot_on_comm_device"
    ROOT = os.path.realpath(os.environ.get("MASKPOT_COMM_GUARD_ROOT", os.getcwd())) + os.sep
    TORCH_DIR = os.path.dirname(os.path.realpath(torch.__file__)) + os.sep
    COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "gather",
                   "scatter", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
                   "send", "recv", "isend", "irecv")

    def _project_caller() -> str | None:
        """'file:line' of the first frame outside torch, deepspeed.comm and this file, if it is project code."""
        frame = sys._getframe(2)
        while frame is not None:
            name = os.path.realpath(frame.f_code.co_filename)
            passthrough = (name.startswith(TORCH_DIR) or f"{os.sep}deepspeed{os.sep}comm{os.sep}" in name
                           or name == os.path.realpath(__file__))
            if not passthrough:
                inside = name.startswith(ROOT) and "site-packages" not in name and f"{os.sep}tests{os.sep}" not in name
                return f"{name[len(ROOT):]}:{frame.f_lineno}" if inside else None
            frame = frame.f_back
        return None

    def _tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from _tensors(v)

    def _guarded(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            caller = _project_caller()
            if caller is not None:
                for t in _tensors([*args, *kwargs.values()]):
                    if not getattr(t, MARK, False):
                        raise RuntimeError(f"No backend type associated with device type {t.device.type} "
                                           f"[maskpot comm guard, standing in for NCCL: dist.{name} called from "
                                           f"{caller} on a tensor that never went to comm_device()]")
            return fn(*args, **kwargs)
        return wrapper

    for _name in COLLECTIVES:
        if hasattr(dist, _name):
            setattr(dist, _name, _guarded(_name, getattr(dist, _name)))

    def _mark_to_comm(module) -> None:
        original = module.to_comm

        @functools.wraps(original)
        def to_comm(tensor):
            out = original(tensor)
            setattr(out, MARK, True)
            return out
        module.to_comm = to_comm

    class _MarkOnImport(importlib.abc.MetaPathFinder):
        """When `pretrain.distributed` loads, mark what its to_comm returns as living on the comm device."""

        def find_spec(self, fullname, path, target=None):
            if fullname != "pretrain.distributed":
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                _mark_to_comm(module)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _MarkOnImport())
