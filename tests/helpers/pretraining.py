"""Pretraining test helpers: the tiny config with overrides, `maskpot pretrain` through its CLI handler (2 ranks
under torchrun), the losses a run logged, and a throwaway module + engine for one-rank checkpoint tests."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from data_shards.config_io import load_config
from pretrain.cli import add_command
from pretrain.config import PretrainConfig
from pretrain.engine import build_engine
from tests.helpers.paths import PRETRAIN_TINY


def cfg_with(**sections) -> PretrainConfig:
    return load_config(PretrainConfig, PRETRAIN_TINY, sections)


def pretrain_cli(config: Path, shards: Path, out_dir: Path, *overrides: str, resume: str = "auto") -> int:
    """`maskpot pretrain --config CONFIG --nproc 2` through its CLI handler: validates here, then torchrun."""
    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers())
    args = parser.parse_args(["pretrain", "--config", str(config), "--nproc", "2", "--resume", resume,
                              "--override", f"data.manifest_dir={shards}", f"train.out_dir={out_dir}", *overrides])
    return args.func(args)


def run_pretrain(shards: Path, out_dir: Path, *overrides: str, resume: str = "auto") -> int:
    """The tiny config on 2 ranks, its schedule fixed at 10 decay steps whatever max_steps is."""
    return pretrain_cli(PRETRAIN_TINY, shards, out_dir, "optim.decay_steps=10", *overrides, resume=resume)


def train_losses(out_dir: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


class Tiny(torch.nn.Module):
    """A throwaway module for engine and checkpoint tests: a 3×3 linear map and a squared-output loss."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x):
        return (self.lin(x) ** 2).mean()


def tiny_engine(cfg: PretrainConfig, run_dir):
    torch.manual_seed(0)
    return build_engine(cfg, Tiny(), run_dir)


def train_tiny(engine, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = engine(torch.randn(8, 3, generator=g))
        engine.backward(loss)
        engine.step()


class ListStream:
    """A fixed list of real batches with the stream's epoch interface."""

    def __init__(self, batches):
        self.batches, self.epochs = batches, []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __iter__(self):
        return iter(self.batches)
