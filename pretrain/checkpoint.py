"""DeepSpeed training checkpoints: save every N steps, keep the last K, resume with compatibility checks.

Layout under `out_dir/checkpoints/`: one DeepSpeed tag folder per save (`step00000100/`), holding
DeepSpeed's own files plus `state.json` (loop position, best validation loss, config and manifest
fingerprints; written last, so a tag without it is incomplete) and `rng-rank{r}.json` per rank.
The compatibility check reads only JSON, before any weights are loaded.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import PretrainConfig, resume_hash, resume_relevant

CHECKPOINT_SUBDIR = "checkpoints"
STATE_FILE = "state.json"
TAG_PREFIX = "step"


@dataclass
class TrainState:
    """Where the loop stands; everything needed to continue exactly."""

    step: int = 0                   # optimizer steps done
    epoch: int = 0                  # stream epoch in progress
    batches_in_epoch: int = 0       # batches every rank has consumed from that epoch
    best_val: float = math.inf
    best_step: int = -1
    skipped_nonfinite: int = 0


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def manifest_sha256(manifest_dir: str | Path) -> str:
    return hashlib.sha256((Path(manifest_dir) / "manifest.json").read_bytes()).hexdigest()


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a state.json, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir()
            if p.is_dir() and p.name.startswith(TAG_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(tags)


def resolve_resume(resume: str, out_dir: str | Path) -> tuple[Path, str] | None:
    """`--resume` value → (checkpoint folder, tag) or None.

    "never": start fresh. "auto": the newest complete tag under out_dir/checkpoints, if any.
    PATH: a tag folder, or a checkpoints folder (its newest complete tag).
    """
    if resume == "never":
        return None
    if resume == "auto":
        ckpt_dir = Path(out_dir) / CHECKPOINT_SUBDIR
        tags = complete_tags(ckpt_dir)
        return (ckpt_dir, tags[-1]) if tags else None
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path.parent, path.name
    tags = complete_tags(path)
    if not tags:
        raise FileNotFoundError(f"--resume {resume}: no complete checkpoint (a step*/ folder with "
                                f"{STATE_FILE}) found there")
    return path, tags[-1]


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(), "python": repr(random.getstate()),
            "numpy": {"keys": np_state[1].tolist(), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}


def _set_rng_state(state: dict) -> None:
    import ast

    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate(ast.literal_eval(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


def save_checkpoint(engine, out_dir: str | Path, state: TrainState, cfg: PretrainConfig,
                    manifest_hash: str, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the tag folder."""
    ckpt_dir = Path(out_dir) / CHECKPOINT_SUBDIR
    tag = tag_for(state.step)
    record = {"train_state": asdict(state), "config_hash": resume_hash(cfg),
              "config": resume_relevant(cfg), "manifest_sha256": manifest_hash}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=record)
    rank = dist.get_rank()
    (ckpt_dir / tag / f"rng-rank{rank}.json").write_text(json.dumps(_rng_state()))
    dist.barrier()
    if rank == 0:
        (ckpt_dir / tag / STATE_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()
    return ckpt_dir / tag


def describe_differences(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k, '<absent>')!r} → now {current.get(k, '<absent>')!r}"
            for k in keys if json.dumps(saved.get(k), sort_keys=True, default=str)
            != json.dumps(current.get(k), sort_keys=True, default=str)]


def check_compatible(record: dict, cfg: PretrainConfig, manifest_hash: str, where: Path) -> None:
    """ValueError saying what differs between the checkpoint's run and this one."""
    problems = []
    if record["config_hash"] != resume_hash(cfg):
        current = json.loads(json.dumps(resume_relevant(cfg), default=str))
        problems += describe_differences(record["config"], current) or ["config hash differs"]
    if record["manifest_sha256"] != manifest_hash:
        problems.append(f"data manifest sha256: checkpoint {record['manifest_sha256'][:12]}… → "
                        f"now {manifest_hash[:12]}… (the shards were rebuilt or another set is used)")
    if problems:
        raise ValueError(f"refusing to resume from {where}: " + "; ".join(problems)
                         + " (pass --allow-config-change to resume anyway, or --resume never)")


def load_checkpoint(engine, ckpt_dir: Path, tag: str, cfg: PretrainConfig, manifest_hash: str,
                    allow_config_change: bool = False) -> TrainState:
    """Collective. Checks compatibility, then restores model, optimizer, LR schedule and RNG."""
    record = json.loads((ckpt_dir / tag / STATE_FILE).read_text())
    if not allow_config_change:
        check_compatible(record, cfg, manifest_hash, ckpt_dir / tag)
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng_file = ckpt_dir / tag / f"rng-rank{dist.get_rank()}.json"
    if rng_file.is_file():
        _set_rng_state(json.loads(rng_file.read_text()))
    return TrainState(**record["train_state"])
