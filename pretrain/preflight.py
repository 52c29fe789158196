"""Distributed preflight of a pretraining config: every rank proves it can do the real work, in seconds.

Per rank (`python -m pretrain.preflight --config run.yaml`, under torchrun or
`srun python -m cluster.launch python -m pretrain.preflight …`):
  1. the config and the data manifest load (checked before the rendezvous, so a bad path fails alone);
  2. rendezvous (`init_distributed`), with a watchdog: no group after --timeout s → a message naming
     MASTER_ADDR/MASTER_PORT and exit status 3;
  3. an all-reduce of rank+1 on every rank must sum to world·(world+1)/2;
  4. forward/backward of the configured model on real batches of the configured shards, through the
     objective's transform; per-rank throughput (atoms/s) is all-gathered and rank 0 prints a table
     with the slowest rank.
Any failure exits non-zero on every rank with a one-line reason. `maskpot preflight --config … --nproc N`
runs it on this machine with torchrun.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

from data_shards import keys as K
from data_shards.cli_errors import EXIT_USER_ERROR
from data_shards.config_io import load_config, parse_dotted_overrides
from pretrain import distributed as D
from pretrain.cli import check_local_launch
from pretrain.config import PretrainConfig

EXIT_FAILED, EXIT_RENDEZVOUS_TIMEOUT = 1, 3
HOST_BYTES = 64


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain.preflight", description="One rank of the preflight.")
    p.add_argument("--config", required=True)
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--batches", type=int, default=2, help="forward/backward passes timed per rank (default 2)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds allowed for the rendezvous")
    return p.parse_args(argv)


def _fail(rank: str | int, message: str) -> None:
    print(f"preflight FAILED [rank {rank}]: {message}", file=sys.stderr, flush=True)


def _rendezvous(timeout_s: float, device: str) -> tuple[int, int]:
    from pretrain.engine import init_distributed  # startup: torch

    where = (f"MASTER_ADDR={os.environ.get('MASTER_ADDR', '?')} MASTER_PORT={os.environ.get('MASTER_PORT', '?')} "
             f"(RANK={os.environ.get('RANK', '?')} of WORLD_SIZE={os.environ.get('WORLD_SIZE', '?')})")

    def give_up() -> None:
        _fail(os.environ.get("RANK", "?"), f"no rendezvous within {timeout_s:.0f} s at {where}: is rank 0 "
              "running, is that address reachable from this node and the port free/not firewalled?")
        os._exit(EXIT_RENDEZVOUS_TIMEOUT)

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        return init_distributed(device)
    finally:
        watchdog.cancel()


def check_all_reduce(rank: int, world_size: int) -> None:
    total = D.all_reduce_scalar(rank + 1.0)
    expected = world_size * (world_size + 1) / 2
    if total != expected:
        raise RuntimeError(f"all-reduce of rank+1 gave {total}, expected {expected}: the collective is broken")


def objective_loss(cfg, out: dict, batch):
    """The configured pretext loss on a model output (as in training), else a plain force magnitude."""
    from pretrain.objectives import pretext_loss  # startup: torch

    return pretext_loss(cfg.objective, out[K.PRED_FORCES].float(), batch) + 0.0 * out[K.PRED_ENERGY].float().sum()


def measure(cfg, manifest: dict, rank: int, world_size: int, n_batches: int) -> tuple[float, float, float]:
    """(atoms, seconds, last loss) of `n_batches` forward/backward passes on this rank's shard share."""
    import torch  # startup: torch

    from pretrain.distributed import resolve_device  # startup: torch
    from pretrain.export import normalisation_from_stats  # startup: safetensors+torch
    from pretrain.loop import make_stream  # startup: ase+safetensors+torch+vesin
    from pretrain.models import build_model  # startup: torch

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, cfg.model.params)
    norm = normalisation_from_stats(manifest)
    model.set_normalisation(norm["energy_scale"], {int(z): v for z, v in norm["e0"].items()})
    device = resolve_device(cfg.train.device)
    model.to(device).train()
    batches = iter(make_stream(cfg, cfg.data.train_split, rank, world_size))
    atoms, seconds, loss = 0, 0.0, float("nan")
    for i in range(n_batches):
        batch = next(batches, None)
        if batch is None:
            if i == 0:
                raise RuntimeError(f"split {cfg.data.train_split!r} of {cfg.data.manifest_dir} gives this rank no "
                                   "batch: use fewer ranks, a smaller data.batch_size or more shards")
            break
        batch = batch.to(device)
        started = time.perf_counter()
        value = objective_loss(cfg, model(batch, compute_forces=True), batch)
        value.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - started
        atoms += batch.num_nodes
        loss = value.item()
        if not all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters()):
            raise FloatingPointError(f"non-finite gradients on batch {i}")
    return float(atoms), seconds, loss


def gather_rows(atoms: float, seconds: float, loss: float, ok: bool) -> list[dict]:
    """Every rank's (host, atoms, seconds, loss, ok) via all_gather of fixed-size tensors (no pickle)."""
    import torch  # startup: torch


    host = socket.gethostname().encode()[:HOST_BYTES].ljust(HOST_BYTES, b"\0")
    rows = D.all_gather_rows(torch.tensor([atoms, seconds, loss, 1.0 if ok else 0.0, *host], dtype=torch.float64))
    return [{"rank": r, "host": bytes(int(b) for b in t[4:]).rstrip(b"\0").decode(errors="replace"),
             "atoms": t[0].item(), "seconds": t[1].item(), "loss": t[2].item(), "ok": bool(t[3].item())}
            for r, t in enumerate(rows)]


def format_table(rows: list[dict]) -> str:
    lines = [f"{'rank':>4}  {'host':<16} {'atoms':>7} {'seconds':>8} {'atoms/s':>10} {'loss':>9}  status"]
    for r in rows:
        rate = r["atoms"] / r["seconds"] if r["seconds"] > 0 else 0.0
        lines.append(f"{r['rank']:>4}  {r['host'][:16]:<16} {r['atoms']:>7.0f} {r['seconds']:>8.3f} "
                     f"{rate:>10.1f} {r['loss']:>9.4f}  {'ok' if r['ok'] else 'FAILED'}")
    done = [r for r in rows if r["ok"] and r["seconds"] > 0]
    if done:
        rates = {r["rank"]: r["atoms"] / r["seconds"] for r in done}
        slowest = min(rates, key=rates.__getitem__)
        lines.append(f"slowest rank: {slowest} ({rates[slowest]:.1f} atoms/s, "
                     f"{max(rates.values()) / rates[slowest]:.2f}x slower than the fastest)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank_env = os.environ.get("RANK", "0")
    try:
        from data_shards.manifest import load_manifest  # startup: ase

        cfg = load_config(PretrainConfig, args.config, parse_dotted_overrides(args.override))
        manifest = load_manifest(cfg.data.manifest_dir)
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(rank_env, str(e))
        return EXIT_FAILED

    try:
        rank, world_size = _rendezvous(args.timeout, cfg.train.device)
    except D.LaunchError as e:  # a setup that cannot work: one line (preflight's FAILED format), before any work
        _fail(rank_env, str(e))
        return EXIT_USER_ERROR

    error = None
    try:
        check_all_reduce(rank, world_size)
        atoms, seconds, loss = measure(cfg, manifest, rank, world_size, args.batches)
    except Exception as e:  # reported, then agreed on by every rank below
        error, atoms, seconds, loss = f"{type(e).__name__}: {e}", 0.0, 0.0, float("nan")
        _fail(rank, error)
    rows = gather_rows(atoms, seconds, loss, error is None)
    if rank == 0:
        print(format_table(rows), flush=True)
    failed = [r["rank"] for r in rows if not r["ok"]]
    if rank == 0:
        print(f"preflight FAILED on rank(s) {failed}" if failed else
              f"preflight ok: {world_size} rank(s), all-reduce and forward/backward of {cfg.model.name} "
              f"on {cfg.data.manifest_dir}", flush=True)
    D.destroy()  # a barrier first: no rank tears the group down while another still uses it
    return EXIT_FAILED if failed else 0


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "preflight", help="check a pretraining setup on N local ranks: rendezvous, all-reduce, forward/backward",
        description="Runs N ranks of `python -m pretrain.preflight` (pretrain.launch, rendezvous on 127.0.0.1); "
                    "prints per-rank "
                    "throughput and exits non-zero on any failure. On SLURM the pretrain job runs it first.")
    p.add_argument("--config", required=True, help="pretraining YAML")
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) on this machine (default 2)")
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--timeout", type=float, default=120.0, help="rendezvous timeout in seconds")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_shards.manifest import load_manifest  # startup: ase

    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    cfg = load_config(PretrainConfig, args.config, parse_dotted_overrides(args.override))
    load_manifest(cfg.data.manifest_dir)

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if check_local_launch(cfg.train.device, args.nproc).type == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "pretrain.launch", "--nproc", str(args.nproc), "--", "-m", "pretrain.preflight",
           "--config", str(args.config), "--timeout", str(args.timeout)]
    if args.override:
        cmd += ["--override", *args.override]
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    D.exit_rank(main())  # not sys.exit: a finished rank must not abort in torch's teardown (see exit_rank)
