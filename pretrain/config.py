"""`PretrainConfig`: one dataclass per section, each validated when built (ValueError lists valid options).

Load with `data_shards.config_io.load_config(PretrainConfig, path, overrides)`: unknown keys and bad
values fail there, before any process starts.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from data_shards.config_io import from_dict, to_dict
from pretrain.pretext import PRETEXT_TASKS, PretextTask
from pretrain.schedule import SCHEDULES, schedule_factor
from pretrain.tracking_config import TrackingConfig
from pretrain.transforms import H_MASK_TARGETS, WATER_GROUPINGS

OBJECTIVES = tuple(PRETEXT_TASKS)   # pretrain/pretext.py: what each kind does
ZERO_STAGES = (0, 1, 2)
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")

# Keys that may change between a checkpoint and its resume without changing the training trajectory.
RESUME_HARMLESS_KEYS = (
    "train.max_steps", "train.log_every", "train.val_every", "train.checkpoint_every",
    "train.keep_last", "train.out_dir", "train.linear_probe", "train.device",
    "tracking.enabled", "tracking.uri", "tracking.experiment", "tracking.run_name", "tracking.tags",
    "tracking.registered_model", "tracking.parent_run_id", "tracking.retry_every_s",
)
# Keys added after checkpoints existed: at their default they stay out of the resume hash, so older
# checkpoints still resume.
LATER_KEY_DEFAULTS: dict[str, Any] = {
    "optim.ema_decay": None, "objective.h_mask_p": 0.5, "objective.h_mask_radius": 5.0,
    "objective.energy_weight": 1.0, "objective.force_weight": 1.0, "objective.h_mask_target": "nearest",
    "data.sets": [], "train.init": None, "optim.schedule": "cosine",
}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class DataConfig:
    manifest_dir: str = ""
    train_split: str = "train"
    val_split: str = "val"          # "" disables validation
    batch_size: int = 16            # structures per rank per micro step
    num_workers: int = 0
    shuffle_buffer: int = 0
    limit: int | None = None        # at most this many samples per split (None: all)
    # several shard sets streamed at once: [{manifest_dir, weight}]; each step's batch comes from one set,
    # drawn with probability weight / Σ weights (pretrain.mixture). manifest_dir is then the first set's,
    # whose val split is validated on and whose statistics normalise the model.
    sets: list = field(default_factory=list)

    def __post_init__(self):
        for i, entry in enumerate(self.sets):
            _require(isinstance(entry, dict) and set(entry) <= {"manifest_dir", "weight"}
                     and bool(entry.get("manifest_dir")),
                     f"data.sets[{i}] must be {{manifest_dir: DIR, weight: NUMBER}}, got {entry!r}")
            weight = entry.get("weight", 1.0)
            _require(isinstance(weight, (int, float)) and 0 < weight < float("inf"),
                     f"data.sets[{i}].weight must be a finite number > 0, got {weight!r}")
        if self.sets:   # the first set is the one validated on (and its statistics normalise the model)
            self.manifest_dir = self.sets[0]["manifest_dir"]
        _require(bool(self.manifest_dir), "data.manifest_dir is required (folder holding manifest.json)")
        _require(bool(self.train_split), "data.train_split must name a split, e.g. 'train'")
        _require(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _require(self.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        _require(self.limit is None or self.limit >= 1, f"data.limit must be >= 1 or null, got {self.limit}")


@dataclass
class ModelConfig:
    name: str = "egnn"
    params: dict = field(default_factory=dict)  # passed to build_model; holds the cutoff

    def __post_init__(self):
        from pretrain.models import MODELS  # startup: imports torch (+7 s); kept off the maskpot CLI start

        _require(self.name in MODELS, f"model.name {self.name!r} is not one of {sorted(MODELS)}")
        config_cls, _ = MODELS[self.name]
        self._arch = from_dict(config_cls, self.params, "model.params")  # unknown params fail here

    @property
    def cutoff(self) -> float:
        return float(self._arch.cutoff)

    def arch_params(self) -> dict:
        """All architecture parameters, defaults filled in (what an export records)."""
        return to_dict(self._arch)


@dataclass
class ObjectiveConfig:
    kind: str = "mask"
    mask_ratio: float = 0.5         # fraction of water molecules masked per frame
    noise_sigma: float = 0.2        # Å, std of the Gaussian displacement (denoise)
    pooled_cosine: bool = False     # one pooled cosine over all masked atoms instead of per-atom mean
    water_grouping: str = "ohh"     # how atoms form molecules: "ohh" (stored O,H,H) | "nearest_oxygen"
    h_mask_p: float = 0.5           # hmask: probability that each H is deleted
    h_mask_radius: float = 5.0      # hmask, nearest: Å, atoms this close to a deleted H are flagged
    h_mask_target: str = "nearest"  # hmask: "nearest" deleted H (atom → H) | "farthest" (H → atom, reference)
    energy_weight: float = 1.0      # supervised: weight of the per-atom energy term
    force_weight: float = 1.0       # supervised: weight of the force term

    def __post_init__(self):
        _require(self.kind in OBJECTIVES, f"objective.kind {self.kind!r} is not one of {list(OBJECTIVES)}")
        _require(0.0 < self.mask_ratio <= 1.0, f"objective.mask_ratio must be in (0, 1], got {self.mask_ratio}")
        _require(self.noise_sigma > 0.0, f"objective.noise_sigma must be > 0 Å, got {self.noise_sigma}")
        _require(self.water_grouping in WATER_GROUPINGS,
                 f"objective.water_grouping {self.water_grouping!r} is not one of {list(WATER_GROUPINGS)}")
        _require(0.0 < self.h_mask_p <= 1.0, f"objective.h_mask_p must be in (0, 1], got {self.h_mask_p}")
        _require(self.h_mask_target in H_MASK_TARGETS,
                 f"objective.h_mask_target {self.h_mask_target!r} is not one of {list(H_MASK_TARGETS)}")
        _require(self.h_mask_radius > 0.0, f"objective.h_mask_radius must be > 0 Å, got {self.h_mask_radius}")
        _require(self.energy_weight >= 0 and self.force_weight >= 0 and self.energy_weight + self.force_weight > 0,
                 f"objective.energy_weight and force_weight must be >= 0 and not both 0, got "
                 f"{self.energy_weight}, {self.force_weight}")

    @property
    def task(self) -> PretextTask:
        return PRETEXT_TASKS[self.kind]

    @property
    def uses_mask(self) -> bool:
        return self.task.mask

    @property
    def uses_denoise(self) -> bool:
        return self.task.denoise


@dataclass
class OptimConfig:
    """AdamW, its schedule and the weight EMA: one section for pretraining and finetuning (finetune.config
    subclasses it with finetuning's defaults)."""
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr: float = 1e-7
    grad_clip: float = 1.0          # max gradient norm; 0 disables clipping
    schedule: str = "cosine"        # cosine: warm-up, then half-cosine to min_lr at decay_steps; constant: lr
    decay_steps: int | None = None  # cosine horizon in optimizer steps; null: train.max_steps
    ema_decay: float | None = None  # EMA of the weights (validation, export) when set; null: off

    def __post_init__(self):
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        _require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        _require(self.decay_steps is None or self.decay_steps >= 1,
                 f"optim.decay_steps must be >= 1 or null (= train.max_steps), got {self.decay_steps}")
        _require(self.ema_decay is None or 0.0 < self.ema_decay < 1.0,
                 f"optim.ema_decay must be in (0, 1) (e.g. 0.999) or null (off), got {self.ema_decay}")
        _require(self.schedule in SCHEDULES, f"optim.schedule {self.schedule!r} is not one of {list(SCHEDULES)}")

    def lr_multiplier(self, step: int, max_steps: int) -> float:
        """Multiplier of `lr` after `step` optimizer steps of a run of `max_steps`."""
        return schedule_factor(self.schedule, step, self.lr, self.min_lr, self.warmup_steps,
                               self.decay_steps or max_steps)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: str = "fp32"
    gradient_accumulation_steps: int = 1

    def __post_init__(self):
        _require(self.zero_stage in ZERO_STAGES,
                 f"deepspeed.zero_stage {self.zero_stage!r} is not one of {list(ZERO_STAGES)}")
        _require(self.precision != "fp16",
                 "deepspeed.precision 'fp16' is unsupported: DeepSpeed's CPU accelerator refuses it "
                 f"('Type fp16 is not supported'); use one of {list(PRECISIONS)}")
        _require(self.precision in PRECISIONS,
                 f"deepspeed.precision {self.precision!r} is not one of {list(PRECISIONS)}")
        _require(self.gradient_accumulation_steps >= 1,
                 f"deepspeed.gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")


@dataclass
class TrainConfig:
    max_steps: int = 1000           # optimizer steps (each = gradient_accumulation_steps batches per rank)
    log_every: int = 10
    val_every: int = 100            # 0 disables validation
    val_batches: int = 8            # per rank
    checkpoint_every: int = 100     # 0: only at the end
    keep_last: int = 3
    seed: int = 0
    out_dir: str = "runs/pretrain"
    linear_probe: bool = True       # labelled corpus: log a per-atom energy linear probe at each validation
    init: str | None = None         # an export to continue from (two-stage pretraining; `maskpot pretrain --init`)
    device: str = "auto"            # auto (cuda:LOCAL_RANK when CUDA is present, nccl) | cpu (gloo) | cuda

    def __post_init__(self):
        _require(self.max_steps >= 1, f"train.max_steps must be >= 1, got {self.max_steps}")
        _require(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _require(self.val_every >= 0, f"train.val_every must be >= 0 (0 = off), got {self.val_every}")
        _require(self.val_batches >= 1, f"train.val_batches must be >= 1, got {self.val_batches}")
        _require(self.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        _require(self.keep_last >= 1, f"train.keep_last must be >= 1, got {self.keep_last}")
        _require(bool(self.out_dir), "train.out_dir is required")
        _require(self.init is None or bool(self.init), "train.init must be an export folder or null")
        _require(self.device in DEVICES, f"train.device {self.device!r} is not one of {list(DEVICES)}")


@dataclass
class PretrainTrackingConfig(TrackingConfig):
    """`tracking:` of a pretraining: rank 0 makes it an MLflow run (pretrain/run_tracking.py). Off unless
    enabled (the shipped configs and the study turn it on); default store sqlite:///<train.out_dir>/mlflow.db."""
    enabled: bool = False
    experiment: str = "maskpot-pretrain"


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: PretrainTrackingConfig = field(default_factory=PretrainTrackingConfig)


def flatten(cfg: Any) -> dict[str, Any]:
    """{"train.max_steps": 10, "model.params": {...}, ...} (dicts inside a section stay whole)."""
    return {f"{section}.{key}": value
            for section, values in to_dict(cfg).items() for key, value in values.items()}


def resume_relevant(cfg: PretrainConfig) -> dict[str, Any]:
    """The flattened config (model params with defaults filled) without keys that may change on resume."""
    flat = flatten(cfg)
    flat["model.params"] = cfg.model.arch_params()
    # the LR schedule's horizon defaults to max_steps: changing max_steps then changes the trajectory
    flat["optim.decay_steps"] = cfg.optim.decay_steps or cfg.train.max_steps
    return {k: v for k, v in flat.items() if k not in RESUME_HARMLESS_KEYS
            and not (k in LATER_KEY_DEFAULTS and v == LATER_KEY_DEFAULTS[k])}


def resume_hash(cfg: PretrainConfig) -> str:
    blob = json.dumps(resume_relevant(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()
