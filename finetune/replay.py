"""Replay (`replay:` section): pretraining structures with their pretext loss mixed into finetuning steps.

Each finetuning step also draws round(replay.fraction · data.batch_size) structures from an endless
ShardStream over the pretraining corpus's manifest (`replay.split`), with the pretext transform applied
(masking and/or noise, seeded by train.seed and the epoch like pretraining), and the step minimises
energy/force loss + replay.weight · pretext loss.

The pretext loss is pretraining's: cosine loss on the flagged atoms and/or denoising MSE on the model's
vector output. That output is −energy_scale · ∂(Σe)/∂r, and finetuning refits energy_scale to the
labelled data, so it is rescaled to the replay corpus's own scale (what pretraining used) first.
The objective is `replay.objective` (pretrain `objective:` keys); without a kind, the init export's
lineage `pretrain_objective`, else `mask`. A replay corpus of several data sets (manifest `datasets`) has its
energies put on one E0 table first (data_shards.e0.Rereference), as finetuning does, so structures that carry
energies never mix energy zeros; the pretext loss itself uses the force scale (pooled force RMS) only.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_shards import keys as K
from data_shards.manifest import file_sha256, load_manifest, rereference_transform
from data_shards.stream import ShardStream
from finetune.config import FinetuneConfig
from finetune.resume import endless_batches
from pretrain.config import OBJECTIVES, ObjectiveConfig
from pretrain.export import export_cutoff, normalisation_from_stats
from pretrain.loop import objective_transform
from pretrain.objectives import pretext_loss

log = logging.getLogger("finetune.replay")
PRETEXT_KINDS = tuple(k for k in OBJECTIVES if k != "supervised")


@dataclass
class ReplayPlan:
    """What `check_replay` found in the files: the objective to use, the corpus's scale and hash."""
    objective: ObjectiveConfig
    objective_source: str        # "replay.objective.kind" | "init lineage" | "default"
    energy_scale: float          # the replay corpus's normalisation (pretraining's force scale)
    manifest_sha256: str
    batch_size: int
    samples: int


def resolve_objective(cfg: FinetuneConfig, init_meta: dict | None) -> tuple[ObjectiveConfig, str]:
    kind, source = cfg.replay.objective.get("kind"), "replay.objective.kind"
    if kind is None:
        kind, source = ((init_meta or {}).get("lineage") or {}).get("pretrain_objective"), "init lineage"
        if kind is None:
            kind, source = "mask", "default"
        elif kind not in PRETEXT_KINDS:
            raise ValueError(f"replay: the init export {cfg.init} was pretrained with objective {kind!r}, which "
                             f"is not a pretext task; set replay.objective.kind to one of {list(PRETEXT_KINDS)}")
    return cfg.replay.objective_config(kind), source


def _transform(objective: ObjectiveConfig, seed: int):
    return objective_transform(objective, seed)


def check_replay(cfg: FinetuneConfig, init_meta: dict | None) -> ReplayPlan:
    """Every replay check that needs the files: the corpus, its split, the transform on its first sample."""
    r = cfg.replay
    assert r.manifest_dir is not None, "check_replay needs replay on (replay.manifest_dir set)"
    manifest = load_manifest(r.manifest_dir)
    where = Path(r.manifest_dir) / "manifest.json"
    samples = manifest["splits"].get(r.split, {}).get("samples", 0)
    if not samples:
        raise ValueError(f"{where}: replay split {r.split!r} is empty; set replay.split to a split with samples")
    objective, source = resolve_objective(cfg, init_meta)
    cutoff = export_cutoff(init_meta) if init_meta is not None else cfg.model.cutoff
    probe = ShardStream(r.manifest_dir, r.split, 1, cutoff, transform=_transform(objective, cfg.train.seed), limit=1)
    try:
        next(iter(probe))
    except ValueError as e:   # FrameError: e.g. water masking on a corpus that is not water
        raise ValueError(f"replay: objective {objective.kind!r} cannot be applied to {where} split {r.split!r}: "
                         f"{e}") from e
    log.info("replay: %d structures per step from %s (%s, objective %s from %s), weight %g",
             r.batch_size(cfg.data.batch_size), where, r.split, objective.kind, source, r.weight)
    return ReplayPlan(objective, source, normalisation_from_stats(manifest)["energy_scale"], file_sha256(where),
                      r.batch_size(cfg.data.batch_size), samples)


@dataclass
class Replay:
    """The replay stream of one finetuning run and the record of its losses."""
    cfg: FinetuneConfig
    plan: ReplayPlan
    cutoff: float
    losses: list[float] = field(default_factory=list)

    def __post_init__(self):
        d, r = self.cfg.data, self.cfg.replay
        self.stream = ShardStream(r.manifest_dir, r.split, self.plan.batch_size, self.cutoff,
                                  num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer, seed=self.cfg.train.seed,
                                  transform=rereference_transform(load_manifest(r.manifest_dir),
                                                                  _transform(self.plan.objective, self.cfg.train.seed)))
        self.batches = endless_batches(self.stream, what=f"the replay split {r.split!r} of {r.manifest_dir}")

    def loss(self, model: torch.nn.Module, device: torch.device) -> torch.Tensor:
        """Pretext loss of the next replay batch (attached to the graph, not yet weighted)."""
        batch = next(self.batches).to(device)
        out = model(batch, compute_forces=True)
        pred = out[K.PRED_FORCES].float() * (self.plan.energy_scale / float(model.get_buffer("energy_scale")))
        return pretext_loss(self.plan.objective, pred, batch)

    def record(self, loss: torch.Tensor) -> float:
        value = loss.item()
        self.losses.append(value)
        return value

    def summary(self) -> dict:
        r = self.cfg.replay
        finite = [v for v in self.losses if math.isfinite(v)]
        return {"steps": len(self.losses), "mean_loss": sum(finite) / len(finite) if finite else None,
                "last_loss": self.losses[-1] if self.losses else None, "structures_per_step": self.plan.batch_size,
                "weight": r.weight, "split": r.split, "samples": self.plan.samples,
                "objective": self.plan.objective.kind, "objective_source": self.plan.objective_source,
                "manifest_sha256": self.plan.manifest_sha256}
