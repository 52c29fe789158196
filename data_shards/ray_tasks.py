"""Run one function over many argument tuples as Ray tasks (shards build, corpus generation).

In-process Ray (`address="local"`, loopback, a capped object store) unless `ray_address` names a running
cluster; a task whose worker dies is retried `MAX_RETRIES` times; results reach `on_result` as they finish.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable

MAX_RETRIES = 3        # a task whose worker dies is rerun this many times
OBJECT_STORE_BYTES = 256 * 1024**2
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def run_ray_tasks(fn: Callable, arg_tuples: Iterable[tuple], on_result: Callable,
                  ray_address: str | None = None, num_cpus: int | None = None) -> None:
    """`on_result(fn(*args))` for every args, each call a Ray task of one CPU."""
    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)
    import ray  # startup: ray (+4 s over torch) only for Ray runs; `maskpot --help` and serial runs do without

    started_here = not ray.is_initialized()
    if started_here and ray_address:
        ray.init(address=ray_address, logging_level=logging.WARNING)
    elif started_here:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=OBJECT_STORE_BYTES, logging_level=logging.WARNING)
    try:
        task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(fn)
        pending = [task.remote(*args) for args in arg_tuples]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                on_result(ray.get(ref))
    finally:
        if started_here:
            ray.shutdown()
