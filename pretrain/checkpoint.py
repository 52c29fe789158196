"""DeepSpeed training checkpoints: save every N steps, keep the last K, resume with compatibility checks.

Layout under `out_dir/checkpoints/`: one DeepSpeed tag folder per save (`step00000100/`), holding
DeepSpeed's own files plus `state.json` (loop position, best validation loss, config and manifest
fingerprints, and the size of every file in the tag; written last, so a tag without it is incomplete),
`rng-rank{r}.json` per rank and, with EMA on, `ema.safetensors`. `best.json` names the tag with the best
validation loss; keep_last never deletes it. The compatibility check reads only JSON, before any weights
are loaded. A tag whose files do not match their recorded sizes, or that DeepSpeed fails to load, is
reported and the previous complete tag is tried (`load_newest_loadable`).
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import math
import random
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pretrain import distributed as D
from pretrain.config import PretrainConfig, resume_hash, resume_relevant

CHECKPOINT_SUBDIR = "checkpoints"
STATE_FILE = "state.json"
BEST_FILE = "best.json"
EMA_FILE = "ema.safetensors"
TAG_PREFIX = "step"
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
log = logging.getLogger("pretrain")


@dataclass
class TrainState:
    """Where the loop stands; everything needed to continue exactly."""

    step: int = 0                   # optimizer steps done
    epoch: int = 0                  # stream epoch in progress
    batches_in_epoch: int = 0       # batches every rank has consumed from that epoch
    best_val: float = math.inf
    best_step: int = -1
    skipped_nonfinite: int = 0
    sets: list = field(default_factory=list)   # data.sets: [epoch, batches consumed] per set (pretrain.mixture)


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


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (SLURM `--signal`) only set a flag; the loop acts on it at a step boundary."""

    def __init__(self, signals=PREEMPT_SIGNALS):
        self.signal: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None


def best_tag(ckpt_dir: Path) -> str | None:
    path = Path(ckpt_dir) / BEST_FILE
    return json.loads(path.read_text())["tag"] if path.is_file() else None


def _file_sizes(tag_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != STATE_FILE}


def tag_problem(ckpt_dir: Path, tag: str) -> str | None:
    """Why the tag cannot be loaded (a file missing or of another size than written), or None."""
    record = json.loads((Path(ckpt_dir) / tag / STATE_FILE).read_text())
    for name, size in record.get("files", {}).items():
        path = Path(ckpt_dir) / tag / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written (truncated or corrupt)"
    return None


def resume_candidates(resume: str, out_dir: str | Path) -> tuple[Path, list[str]] | None:
    """Like `resolve_resume`, but every complete tag to try, oldest first (a named tag: just that one)."""
    where = resolve_resume(resume, out_dir)
    if where is None:
        return None
    ckpt_dir, tag = where
    named_tag = resume not in ("auto", "never") and (Path(resume) / STATE_FILE).is_file()
    return ckpt_dir, [tag] if named_tag else complete_tags(ckpt_dir)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(), "python": repr(random.getstate()),
            "numpy": {"keys": np_state[1].tolist(), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate(ast.literal_eval(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


def save_checkpoint(engine, out_dir: str | Path, state: TrainState, cfg: PretrainConfig,
                    manifest_hash: str, keep_last: int, best: bool = False, ema=None) -> Path:
    """Collective: every rank calls it. Returns the tag folder.

    `best`: this tag holds the best validation loss so far (recorded in best.json, never pruned).
    `ema`: an `engine.WeightEMA` whose averages are saved alongside (rank 0).
    """
    ckpt_dir = Path(out_dir) / CHECKPOINT_SUBDIR
    tag = tag_for(state.step)
    record = {"train_state": asdict(state), "config_hash": resume_hash(cfg),
              "config": resume_relevant(cfg), "manifest_sha256": manifest_hash}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=record)
    rank = D.rank()
    (ckpt_dir / tag / f"rng-rank{rank}.json").write_text(json.dumps(_rng_state()))
    if ema is not None and rank == 0:
        ema.save(ckpt_dir / tag / EMA_FILE)
    D.barrier()
    if rank == 0:
        record["files"] = _file_sizes(ckpt_dir / tag)
        (ckpt_dir / tag / STATE_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")
        if best:
            (ckpt_dir / BEST_FILE).write_text(json.dumps({"tag": tag, "step": state.step,
                                                          "val_loss": state.best_val}) + "\n")
        keep = best_tag(ckpt_dir)
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            if old != keep:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    D.barrier()
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


class CorruptCheckpoint(RuntimeError):
    """A complete tag whose files cannot be loaded."""


def load_checkpoint(engine, ckpt_dir: Path, tag: str, cfg: PretrainConfig, manifest_hash: str,
                    allow_config_change: bool = False, ema=None) -> TrainState:
    """Collective. Checks compatibility, then restores model, optimizer, LR schedule, RNG (and EMA).

    ValueError: incompatible run. CorruptCheckpoint: files truncated, missing or unreadable.
    """
    record = json.loads((ckpt_dir / tag / STATE_FILE).read_text())
    if not allow_config_change:
        check_compatible(record, cfg, manifest_hash, ckpt_dir / tag)
    problem = tag_problem(ckpt_dir, tag)
    if problem:
        raise CorruptCheckpoint(problem)
    try:
        path, _ = _deepspeed_load(engine, ckpt_dir, tag)
        if ema is not None:
            ema_file = ckpt_dir / tag / EMA_FILE
            ema.load(ema_file) if ema_file.is_file() else ema.reset(engine)
    except Exception as err:  # torch.load / zipfile / safetensors errors on damaged files share no type
        raise CorruptCheckpoint(f"{ckpt_dir / tag}: {type(err).__name__}: {err}") from err
    if path is None:
        raise CorruptCheckpoint(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng_file = ckpt_dir / tag / f"rng-rank{D.rank()}.json"
    if rng_file.is_file():
        _set_rng_state(json.loads(rng_file.read_text()))
    return TrainState(**record["train_state"])


def load_newest_loadable(engine, ckpt_dir: Path, tags: list[str], cfg: PretrainConfig, manifest_hash: str,
                         allow_config_change: bool = False, ema=None) -> tuple[str, TrainState]:
    """Collective. Load the newest of `tags` that loads on every rank; older ones are tried in turn.

    Each failure is logged naming the tag; an incompatible config still raises (it is no accident).
    """
    for tag in reversed(tags):
        error = None
        try:
            state = load_checkpoint(engine, ckpt_dir, tag, cfg, manifest_hash, allow_config_change, ema)
        except CorruptCheckpoint as err:
            error = str(err)
        if not D.any_rank(error is not None):
            return tag, state
        log.error("checkpoint %s cannot be loaded (%s); falling back to the previous complete tag",
                  ckpt_dir / tag, error or "failed on another rank")
    raise CorruptCheckpoint(f"no loadable checkpoint among {tags} in {ckpt_dir}: pass --resume never to start over")


def _deepspeed_load(engine, ckpt_dir: Path, tag: str):
    return engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                 load_lr_scheduler_states=True)
