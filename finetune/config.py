"""`FinetuneConfig`: one dataclass per section, each validated when built (ValueError lists valid options).

Load with `data_shards.config_io.load_config(FinetuneConfig, path, overrides)`. Checks that need the
files themselves (the manifest's splits, the init export's format_version) run in
`finetune.inputs.check_inputs`, still before anything is trained or written.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from data_shards.config_io import from_dict, to_dict
from data_shards.manifest import SPLITS
from finetune.energy import ENERGY_NORMALISATIONS, SELECT_METRICS
from pretrain.config import ModelConfig, ObjectiveConfig
from pretrain.config import OptimConfig as PretrainOptimConfig
from pretrain.objectives import LOSS_KINDS
from pretrain.tracking_config import TrackingConfig, check_tracking_uri  # shared with pretraining; re-exported here

DEVICES = ("cpu", "cuda", "auto")

__all__ = ["FinetuneConfig", "DataConfig", "ModelConfig", "OptimConfig", "LossConfig", "TrainConfig",
           "TrackingConfig", "AdaptConfig", "ReplayConfig", "check_tracking_uri", "flatten_config"]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_split(name: str, value: str, allow_empty: bool) -> None:
    if allow_empty and value == "":
        return
    _require(value in SPLITS, f"{name} {value!r} is not one of {list(SPLITS)}"
             + (" (or '' for none)" if allow_empty else ""))


@dataclass
class DataConfig:
    manifest_dir: str = ""
    train_split: str = "train"
    val_split: str = "val"              # required: the best model is chosen on it
    test_split: str = "test"            # "" skips the final test evaluation
    train_frames: int | None = None     # labelled budget: the first N training frames (manifest order)
    batch_size: int = 4                 # structures per step
    num_workers: int = 0
    shuffle_buffer: int = 0             # samples; 0 keeps manifest order
    RENAMED: ClassVar[dict[str, str]] = {"val_batches": "train.val_batches"}   # pretraining's name

    def __post_init__(self):
        _require(bool(self.manifest_dir), "data.manifest_dir is required (folder holding manifest.json)")
        _check_split("data.train_split", self.train_split, allow_empty=False)
        _require(self.val_split != "", "data.val_split is empty: finetuning keeps the model with the best "
                                       f"validation force RMSE, so name one of {list(SPLITS)}")
        _check_split("data.val_split", self.val_split, allow_empty=False)
        _check_split("data.test_split", self.test_split, allow_empty=True)
        _require(self.train_frames is None or self.train_frames >= 1,
                 f"data.train_frames must be >= 1 or null (all), got {self.train_frames}")
        _require(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _require(self.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")


@dataclass
class OptimConfig(PretrainOptimConfig):
    """Pretraining's optim section (fields, checks, schedule) with finetuning's defaults."""
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    min_lr: float = 1e-5
    grad_clip: float = 10.0
    ema_decay: float | None = None      # e.g. 0.99: validate, keep and export an EMA of the weights


@dataclass
class LossConfig:
    energy_weight: float = 1.0
    force_weight: float = 10.0
    kind: str = "l2"                    # l1 | l2 | huber, on errors divided by their scales
    huber_delta: float = 1.0            # in those normalised units
    # per-atom energy errors are divided by (finetune.energy): annealed = geometric from the force RMS at step 0
    # to the train split's per-atom energy spread after E0 at the last step; energy_std = that spread
    # throughout; force_scale = the force RMS throughout (the old behaviour; forces are always divided by it)
    energy_normalisation: str = "annealed"
    refit_energy_offset: bool = True    # before step 1 and each validation: E0 shifted so that the mean energy
    #                                     error on the training frames is 0 (forces leave the zero free to drift)

    def __post_init__(self):
        _require(self.energy_weight >= 0 and self.force_weight >= 0,
                 f"loss weights must be >= 0, got energy {self.energy_weight}, force {self.force_weight}")
        _require(self.energy_weight + self.force_weight > 0, "loss.energy_weight and loss.force_weight are both 0")
        _require(self.kind in LOSS_KINDS, f"loss.kind {self.kind!r} is not one of {list(LOSS_KINDS)}")
        _require(self.huber_delta > 0, f"loss.huber_delta must be > 0, got {self.huber_delta}")
        _require(self.energy_normalisation in ENERGY_NORMALISATIONS, f"loss.energy_normalisation "
                 f"{self.energy_normalisation!r} is not one of {list(ENERGY_NORMALISATIONS)}")


@dataclass
class TrainConfig:
    # keys this section had before they took pretraining's names (one knob, one name in both stages)
    RENAMED: ClassVar[dict[str, str]] = {"eval_every": "train.val_every", "ema_decay": "optim.ema_decay"}
    max_steps: int = 1000
    val_every: int = 100                # validation every N steps (and at step 0 and the last step)
    val_batches: int | None = None      # batches per validation; None = the whole split
    log_every: int = 10                 # train metrics are averaged and sent to MLflow every N steps
    seed: int = 0
    out_dir: str = "runs/finetune"
    device: str = "auto"                # cpu | cuda | auto (cuda when available)
    early_stopping_patience: int | None = None  # stop after N validations without a new best `select` score
    early_stopping_min_steps: int = 0   # ... but never before this step (a plateau at high LR is not the end)
    # when early stopping fires, N more steps with the LR on a half-cosine from its value there to optim.min_lr,
    # then stop (0: stop at once); a cosine stopped early otherwise ends at a high LR, without annealing
    early_stopping_anneal_steps: int = 0
    # CPU threads for torch; null: $OMP_NUM_THREADS when set, else 1 (under CPU contention torch's default,
    # one per core, ran 18x slower than 1 thread); 0: torch's default
    threads: int | None = None
    select: str = "force"               # best model by validation: force | energy | weighted (loss weights)
    checkpoint_every: int = 0           # OUT_DIR/checkpoint every N steps (0: only on SIGUSR1/SIGTERM)

    def __post_init__(self):
        _require(self.max_steps >= 1, f"train.max_steps must be >= 1, got {self.max_steps}")
        _require(self.val_every >= 1, f"train.val_every must be >= 1, got {self.val_every}")
        _require(self.val_batches is None or self.val_batches >= 1,
                 f"train.val_batches must be >= 1 or null (whole split), got {self.val_batches}")
        _require(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _require(bool(self.out_dir), "train.out_dir is required")
        _require(self.device in DEVICES, f"train.device {self.device!r} is not one of {list(DEVICES)}")
        _require(self.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0 (0 = on signals only), "
                 f"got {self.checkpoint_every}")
        _require(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
                 f"train.early_stopping_patience must be >= 1 or null (off), got {self.early_stopping_patience}")
        _require(0 <= self.early_stopping_min_steps <= self.max_steps,
                 f"train.early_stopping_min_steps must be in [0, max_steps={self.max_steps}], "
                 f"got {self.early_stopping_min_steps}")
        _require(self.early_stopping_anneal_steps >= 0, f"train.early_stopping_anneal_steps must be >= 0 "
                 f"(0: stop at once), got {self.early_stopping_anneal_steps}")
        _require(not self.early_stopping_anneal_steps or self.early_stopping_patience is not None,
                 "train.early_stopping_anneal_steps needs train.early_stopping_patience (early stopping is off)")
        _require(self.threads is None or self.threads >= 0,
                 f"train.threads must be >= 1, 0 (torch's default) or null ($OMP_NUM_THREADS, else 1), "
                 f"got {self.threads}")
        _require(self.select in SELECT_METRICS, f"train.select {self.select!r} is not one of {list(SELECT_METRICS)}")

    def resolved_threads(self) -> int:
        """Threads to give torch (0: leave torch's default)."""
        if self.threads is not None:
            return self.threads
        env = os.environ.get("OMP_NUM_THREADS", "")
        return int(env) if env.isdigit() and int(env) >= 1 else 1


@dataclass
class AdaptConfig:
    """How a pretrained model is adapted; `head` = the energy/force output heads, the rest = backbone."""
    freeze_backbone_steps: int = 0      # backbone frozen for the first K steps; 0 = never, -1 = throughout
    backbone_lr_mult: float = 1.0       # backbone learning rate = optim.lr · this (schedule applied on top)
    head_lr_mult: float = 1.0           # head learning rate = optim.lr · this
    reinit_heads: bool = False          # re-initialise the heads after loading `init`
    allow_new_species: bool = False     # finetune elements absent from `init`: fresh embedding rows

    def __post_init__(self):
        _require(self.freeze_backbone_steps >= -1,
                 f"adapt.freeze_backbone_steps must be a number of steps >= 0 (0 = off) or -1 (frozen "
                 f"throughout), got {self.freeze_backbone_steps}")
        for name in ("backbone_lr_mult", "head_lr_mult"):
            value = getattr(self, name)
            _require(value > 0 and value != float("inf"), f"adapt.{name} must be a finite number > 0, got {value}")


@dataclass
class ReplayConfig:
    """Pretraining structures mixed into every finetuning step with their pretext loss (finetune.replay)."""
    manifest_dir: str | None = None     # the pretraining corpus (folder holding manifest.json); null = off
    split: str = "train"
    fraction: float = 0.25              # replay structures per step = round(fraction · data.batch_size)
    weight: float = 0.1                 # loss = energy/force loss + weight · pretext loss
    objective: dict = field(default_factory=dict)  # pretrain `objective:` keys; no kind: init lineage's, else mask

    def __post_init__(self):
        _require(self.manifest_dir is None or bool(self.manifest_dir),
                 "replay.manifest_dir must be the pretraining corpus's folder (manifest.json) or null (off)")
        _check_split("replay.split", self.split, allow_empty=False)
        _require(0 < self.fraction < math.inf, f"replay.fraction must be a finite number > 0, got {self.fraction}")
        _require(0 < self.weight < math.inf, f"replay.weight must be a finite number > 0 (turn replay off with "
                                             f"replay.manifest_dir: null), got {self.weight}")
        _require(self.objective.get("kind") != "supervised",
                 "replay.objective.kind 'supervised' is not a pretext task; use one of "
                 "['mask', 'denoise', 'mask+denoise', 'hmask']")
        self.objective_config(self.objective.get("kind") or "mask")   # unknown keys, bad values fail here

    def objective_config(self, kind: str) -> ObjectiveConfig:
        return from_dict(ObjectiveConfig, {**self.objective, "kind": kind}, "replay.objective")

    def batch_size(self, data_batch_size: int) -> int:
        return math.floor(self.fraction * data_batch_size + 0.5)


@dataclass
class FinetuneConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # ignored (with a note) when `init` is set
    init: str | None = None             # pretrain export, or fp32 training checkpoint (tag, checkpoints/ or run)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)

    def __post_init__(self):
        _require(self.init is None or bool(self.init),
                 "init must be an export or checkpoint folder, or null (from scratch)")
        if self.init is None:
            _require(self.adapt.freeze_backbone_steps == 0, "adapt.freeze_backbone_steps needs `init` (a "
                     "pretrained backbone): from scratch a frozen backbone stays random; set it to 0")
            _require(not self.adapt.reinit_heads, "adapt.reinit_heads needs `init`: from scratch the heads are "
                     "freshly initialised anyway; set it to false")
        if self.replay.manifest_dir is not None:
            _require(self.replay.batch_size(self.data.batch_size) >= 1,
                     f"replay.fraction {self.replay.fraction} of data.batch_size {self.data.batch_size} rounds to 0 "
                     f"replay structures per step; raise it to at least {0.5 / self.data.batch_size:g}")


def flatten_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{"data.batch_size": 4, "model.params.hidden": 16, ...}: every leaf under its dotted path."""
    source = to_dict(cfg) if not isinstance(cfg, dict) else cfg
    flat: dict[str, Any] = {}
    for key, value in source.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = value
    return flat
