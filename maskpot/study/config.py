"""`StudyConfig`: what `maskpot study` runs, one dataclass per stage, validated when built.

The YAML (e.g. `configs/study/water.yaml`) holds a `base:` mapping and a `scales:` mapping whose entries
(tiny, small, full, paper) are merged over the base; `load_study(path, scale)` returns the result.
Unknown keys are refused with the list of valid ones (data_shards.config_io).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from data_shards.config_io import ConfigError, from_dict, merge
from data_shards.corpus.conditions import CorpusConfig as Conditions  # numpy only: no OpenMM, no torch

# variant name → pretraining objective (None: no pretraining, the baseline). "supervised" pretrains on the
# corpus's own TIP3P energies and forces: a reference for what labels, not a pretext task, give.
VARIANTS = {"scratch": None, "denoise": "denoise", "mask": "mask", "mask+denoise": "mask+denoise",
            "supervised": "supervised"}
ABLATION_MARK = "@"   # run folders of an ablation: MODEL_VARIANT@ABLATION_nBUDGET_sSEED
# ethanol variant → its pretraining objective (hmask: each atom points at the nearest deleted H within the
# cutoff; hmask_farthest: the reference code's rule, from the farthest deleted H to the atom)
ETHANOL_VARIANTS = {"scratch": None, "hmask": {"kind": "hmask"},
                    "hmask_farthest": {"kind": "hmask", "h_mask_target": "farthest"}, "denoise": {"kind": "denoise"}}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _pretrain_seeds(seeds: list[int]) -> None:
    _require(len(set(seeds)) == len(seeds) and min(seeds, default=0) >= 0,
             f"pretrain_seeds must be distinct integers >= 0, got {seeds}")


def _models(name: str, models: dict) -> dict:
    """`models` without the entries set to null — how an override drops a model that a scale merges in
    (`--override scaling.models.gns=null`) — after checking that every name is a registered model."""
    from pretrain.models import MODELS  # startup: imports torch (+7 s); kept off the maskpot CLI start

    unknown = [m for m in models if m not in MODELS]
    _require(not unknown, f"{name}: unknown {unknown}; registered: {sorted(MODELS)}")
    return {m: params for m, params in models.items() if params is not None}


def _positive(name: str, values) -> None:
    bad = [v for v in values if v < 1]
    _require(not bad, f"{name} must all be >= 1, got {list(values)}")


@dataclass
class CorpusConfig:
    """Unlabelled pretraining corpus: flexible TIP3P water (OpenMM, 300 K, 0.5 fs steps)."""
    molecules: int = 64                 # H2O per periodic box
    frames: int = 10000
    steps_between_frames: int = 40      # MD steps of 0.5 fs between recorded frames
    seed: int = 0                       # trajectory seed (the TIP3P labelled set uses seed + 1)
    shard_size: int = 500               # frames per WebDataset tar
    val_fraction: float = 0.05          # held out for the pretext validation loss

    def __post_init__(self):
        _positive("corpus.molecules/frames/steps_between_frames/shard_size",
                  [self.molecules, self.frames, self.steps_between_frames, self.shard_size])
        _require(0.0 < self.val_fraction < 0.5, f"corpus.val_fraction must be in (0, 0.5), got {self.val_fraction}")


@dataclass
class PretrainStageConfig:
    steps: int = 2000                   # optimizer steps
    batch_size: int = 4                 # structures per rank per step
    lr: float = 1e-3
    min_lr: float = 1e-5
    nproc: int = 2                      # DeepSpeed ranks (torchrun)
    zero_stage: int = 1
    mask_ratio: float = 0.5             # fraction of water molecules that lose one H
    noise_sigma: float = 0.2            # Å, denoising displacement std
    h_mask_p: float = 0.5               # ethanol (generic H-masking): probability each H is deleted
    seed: int = 0                       # model init, masks, noise, data order; one pretraining per variant,
                                        # shared by every finetune seed

    def __post_init__(self):
        _positive("pretrain.steps/batch_size/nproc", [self.steps, self.batch_size, self.nproc])
        _require(0 < self.min_lr <= self.lr, f"pretrain: need 0 < min_lr <= lr, got {self.min_lr}, {self.lr}")
        _require(self.zero_stage in (0, 1, 2), f"pretrain.zero_stage must be 0, 1 or 2, got {self.zero_stage}")


@dataclass
class FinetuneStageConfig:
    """The same finetune budget for every variant: steps, batch, LR schedule and loss."""
    steps: int = 1000
    batch_size: int = 4
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int = 20
    val_every: int = 50                # validation force RMSE every N steps (learning curves)
    val_batches: int | None = None      # None: the whole validation split
    energy_weight: float = 1.0
    force_weight: float = 10.0
    energy_normalisation: str | None = None   # finetune loss.energy_normalisation; None: maskpot finetune's default
    jobs: int = 2                       # finetunes run side by side, each with cores // jobs threads
    adapt: dict = field(default_factory=dict)  # FinetuneConfig `adapt` section for pretrained variants only
                                               # (e.g. {backbone_lr_mult: 0.25}); scratch has nothing to adapt
    replay: dict = field(default_factory=dict)  # FinetuneConfig `replay` section for pretrained water variants,
                                                # e.g. {weight: 0.1, fraction: 0.25}; manifest_dir = the corpus
    # the second read-out of every finetune, "at convergence": the same run again with early stopping on the
    # validation force RMSE (`patience` validations without a new best, not before step `patience_min_steps`)
    # and at most `converge_steps` steps (the LR schedule spans the cap); 0: only the fixed-budget read-out
    converge_steps: int = 0
    patience: int = 10
    patience_min_steps: int = 0
    anneal_steps: int = 0               # once the early stop fires: steps of LR annealing to min_lr before the end

    def __post_init__(self):
        _positive("finetune.steps/batch_size/val_every/jobs/patience",
                  [self.steps, self.batch_size, self.val_every, self.jobs, self.patience])
        # converge_steps 0 turns the at-convergence read-out off: the small scale's patience_min_steps stays unused
        _require(0 <= self.patience_min_steps <= (self.converge_steps or self.patience_min_steps),
                 f"finetune.patience_min_steps must be in [0, converge_steps], got {self.patience_min_steps}")
        _require(self.anneal_steps >= 0,
                 f"finetune.anneal_steps must be >= 0 (0: stop at once), got {self.anneal_steps}")
        _require(self.converge_steps == 0 or self.converge_steps >= self.steps,
                 f"finetune.converge_steps must be 0 (off) or >= finetune.steps ({self.steps}), "
                 f"got {self.converge_steps}")
        _require(0 <= self.min_lr <= self.lr, f"finetune: need 0 <= min_lr <= lr, got {self.min_lr}, {self.lr}")
        from finetune.config import (  # startup: imports torch (+7 s); kept off the maskpot CLI start
            AdaptConfig,
            ReplayConfig,
        )

        from_dict(AdaptConfig, self.adapt, where="finetune.adapt")
        if self.replay:
            from_dict(ReplayConfig, {"manifest_dir": "corpus", **self.replay}, where="finetune.replay")


@dataclass
class DftWaterSetting:
    """Finetune on DFT water in DeePMD layout: train data_0+1 (240 frames), val data_2, test data_3."""
    enabled: bool = True
    path: str = "../shared/data/water_deepmd"   # holds data_0..data_3 directly or under data/
    budgets: list[int] = field(default_factory=lambda: [30, 60, 120, 240])  # labelled training frames

    def __post_init__(self):
        _positive("dft_water.budgets", self.budgets)
        _require(max(self.budgets, default=0) <= 240, f"dft_water.budgets: the train split holds 240 frames, "
                                                       f"got {self.budgets}")


@dataclass
class Tip3pSetting:
    """The paper's own setting: pretrain and finetune on TIP3P (labels from a separate trajectory)."""
    enabled: bool = True
    labelled_frames: int = 300          # trajectory seed corpus.seed + 1, split 0.6 / 0.2 / 0.2
    budget: int = 30
    variants: list[str] = field(default_factory=lambda: ["scratch", "mask"])

    def __post_init__(self):
        _positive("tip3p.labelled_frames/budget", [self.labelled_frames, self.budget])
        _require(self.budget <= int(0.6 * self.labelled_frames),
                 f"tip3p.budget {self.budget} exceeds the train split (60% of {self.labelled_frames} frames)")
        bad = [v for v in self.variants if v not in VARIANTS]
        _require(not bad, f"tip3p.variants: unknown {bad}; valid: {list(VARIANTS)}")


@dataclass
class EthanolSetting:
    """rMD17 ethanol: generic H-masking pretraining on the train positions, finetune, test on test_MD.xyz."""
    enabled: bool = True
    path: str = "../shared/data/ethanol_rmd17"  # train.xyz, test_MD.xyz
    budgets: list[int] = field(default_factory=lambda: [50, 200, 900])  # 100 of train.xyz validate
    variants: list[str] = field(default_factory=lambda: ["scratch", "hmask"])
    cutoff: float = 5.0                 # Å (the molecule is ~4 Å across: a complete graph)
    pretrain_steps: int = 1000

    def __post_init__(self):
        _positive("ethanol.budgets/pretrain_steps", [*self.budgets, self.pretrain_steps])
        _require(max(self.budgets, default=0) <= 900, f"ethanol.budgets: 900 training frames (100 validate), "
                                                       f"got {self.budgets}")
        bad = [v for v in self.variants if v not in ETHANOL_VARIANTS]
        _require(not bad, f"ethanol.variants: unknown {bad}; valid: {list(ETHANOL_VARIANTS)}")
        _require(self.cutoff > 0, f"ethanol.cutoff must be > 0 Å, got {self.cutoff}")


@dataclass
class AblationConfig:
    """One investigation on DFT water: `variants` re-run with changed pretraining and/or finetuning.

    A pretrained variant is pretrained again only when `pretrain` changes something; scratch runs again
    (as scratch@NAME, the baseline of this ablation) only when `finetune` does, since every compared
    variant must get the same finetune budget. Results land next to the main runs, tagged @NAME.
    """
    variants: list[str] = field(default_factory=lambda: ["mask"])
    budgets: list[int] = field(default_factory=lambda: [30, 240])
    seeds: list[int] = field(default_factory=lambda: [0])
    pretrain_seeds: list[int] = field(default_factory=list)  # pretrainings per variant; empty: pretrain.seed only
    pretrain: dict = field(default_factory=dict)   # overrides of the study's pretrain section
    finetune: dict = field(default_factory=dict)   # overrides of the study's finetune section
    models: dict = field(default_factory=dict)     # other models (name → params) instead of the study's
    pretrain_data: str = "corpus"                  # corpus (TIP3P) | dft_train (positions of the labelled
                                                   # DFT train split only, the paper's own recipe)
    pretrain_init: str = "none"                    # none (random) | corpus: continue the main corpus
                                                   # pretraining's export (two-stage, pretrain train.init)
    note: str = ""                                 # what the ablation asks, for the report

    def __post_init__(self):
        bad = [v for v in self.variants if v not in VARIANTS]
        _require(not bad and bool(self.variants), f"variants: unknown {bad}; valid: {list(VARIANTS)}")
        _positive("budgets", self.budgets)
        _require(max(self.budgets, default=0) <= 240, f"budgets: the DFT train split holds 240 frames, "
                                                       f"got {self.budgets}")
        _require(bool(self.seeds), "seeds: name at least one")
        _pretrain_seeds(self.pretrain_seeds)
        _require(self.pretrain_data in ("corpus", "dft_train"),
                 f"pretrain_data must be 'corpus' or 'dft_train', got {self.pretrain_data!r}")
        _require(self.pretrain_init in ("none", "corpus"),
                 f"pretrain_init must be 'none' or 'corpus', got {self.pretrain_init!r}")
        scratch_only = [v for v in self.variants if VARIANTS[v] is None]
        _require(self.pretrain_init == "none" or not scratch_only,
                 f"pretrain_init: corpus continues a pretraining; variants {scratch_only} have none")
        self.models = _models("models", self.models)


def _conditions(name: str, mapping: dict, frames: int) -> None:
    """Validate a `maskpot generate corpus` conditions mapping (data_shards.corpus CorpusConfig)."""
    c = from_dict(Conditions, {**mapping, "trajectories": 1}, where=name)
    _require(frames % c.frames_per_trajectory == 0,
             f"{name}: corpus sizes must be multiples of frames_per_trajectory ({c.frames_per_trajectory}), "
             f"got {frames}")


@dataclass
class ScalingConfig:
    """Test force RMSE vs corpus size at fixed pretraining compute (the study's pretrain.steps for every
    size). The largest corpus is generated once with sampled conditions (`maskpot generate corpus`); a
    size-N corpus is its first N / frames_per_trajectory trajectories."""
    sizes: list[int] = field(default_factory=list)          # corpus frames; empty: no scaling curve
    variants: list[str] = field(default_factory=lambda: ["mask", "denoise"])
    budgets: list[int] = field(default_factory=lambda: [30])
    conditions: dict = field(default_factory=dict)           # data_shards.corpus CorpusConfig, no trajectories
    models: dict = field(default_factory=dict)               # name → params (null: dropped); empty: the study's

    def __post_init__(self):
        _positive("scaling.sizes/budgets", [*self.sizes, *self.budgets])
        bad = [v for v in self.variants if VARIANTS.get(v) is None or v == "supervised"]
        _require(not bad, f"scaling.variants: {bad} are not pretext objectives; valid: "
                          f"{[v for v in VARIANTS if VARIANTS[v] and v != 'supervised']}")
        for n in self.sizes:
            _conditions("scaling.conditions", self.conditions, n)
        self.models = _models("scaling.models", self.models)


@dataclass
class DiversityConfig:
    """Equal corpus size: one condition (`single`) against the scaling curve's sampled conditions."""
    frames: int = 0                                          # 0: off; else one of scaling.sizes
    variants: list[str] = field(default_factory=lambda: ["mask"])
    budgets: list[int] = field(default_factory=lambda: [30])
    single: dict = field(default_factory=lambda: {"models": ["tip3p"], "temperature_k": [300.0, 300.0],
                                                  "density_g_cm3": [1.0, 1.0], "molecules": [64, 64]})

    def __post_init__(self):
        _positive("diversity.budgets", self.budgets)
        bad = [v for v in self.variants if VARIANTS.get(v) is None or v == "supervised"]
        _require(not bad, f"diversity.variants: {bad} are not pretext objectives")


@dataclass
class TwoStageConfig:
    """Corpus → the target's unlabelled DFT train positions (pretrain train.init) against corpus-only,
    the paper recipe (pretraining on the DFT positions only, pretrain.steps) and scratch."""
    enabled: bool = False
    variants: list[str] = field(default_factory=lambda: ["mask"])
    budgets: list[int] = field(default_factory=lambda: [30, 240])
    steps: int = 500                    # second-stage pretraining steps on the DFT positions
    lr: float = 3.0e-4                  # second-stage peak LR (cosine to pretrain.min_lr)

    def __post_init__(self):
        _positive("two_stage.budgets/steps", [*self.budgets, self.steps])
        bad = [v for v in self.variants if VARIANTS.get(v) is None or v == "supervised"]
        _require(not bad, f"two_stage.variants: {bad} are not pretext objectives")
        _require(self.lr > 0, f"two_stage.lr must be > 0, got {self.lr}")


@dataclass
class StudyConfig:
    experiment: str = "maskpot-study-water"    # one MLflow experiment for every run of the study
    out_dir: str = "runs/study_water"
    scale: str = ""                     # filled in by load_study
    models: dict = field(default_factory=lambda: {"egnn": {"hidden": 64, "layers": 4, "cutoff": 3.5}})
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    pretrain: PretrainStageConfig = field(default_factory=PretrainStageConfig)
    finetune: FinetuneStageConfig = field(default_factory=FinetuneStageConfig)
    dft_water: DftWaterSetting = field(default_factory=DftWaterSetting)
    tip3p: Tip3pSetting = field(default_factory=Tip3pSetting)
    ethanol: EthanolSetting = field(default_factory=EthanolSetting)
    ablations: dict = field(default_factory=dict)  # name → AblationConfig mapping (`--ablation NAME`)
    # pretraining seeds of the headline DFT-water rows and of the scaling and diversity arms (each pretrained
    # variant × each finetune seed); empty: [pretrain.seed]. Runs of another seed than pretrain.seed are named
    # ..._sSEEDpPSEED
    pretrain_seeds: list[int] = field(default_factory=list)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    diversity: DiversityConfig = field(default_factory=DiversityConfig)
    two_stage: TwoStageConfig = field(default_factory=TwoStageConfig)
    # run only the finetunes whose name SETTING/RUN (e.g. dft_water/egnn_mask_n30_s1p1) matches one of these
    # shell globs (`maskpot study --only`); only the pretrainings and corpora they need run; empty: every finetune
    only: list[str] = field(default_factory=list)
    # read out again at convergence the finished finetunes (of those `only` selects) whose at-convergence
    # read-out ran under another stopping rule than finetune's (`maskpot study --reread-converged`)
    reread_converged: bool = False

    def __post_init__(self):
        self.models = _models("models", self.models)
        _require(bool(self.models), "models: name at least one model")
        bad = [v for v in self.variants if v not in VARIANTS]
        _require(not bad, f"variants: unknown {bad}; valid: {list(VARIANTS)}")
        _require("scratch" in self.variants, "variants must include 'scratch' (the baseline every "
                                             "pretrained variant is compared with)")
        _require(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds),
                 f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
        bad_names = [n for n in self.ablations if not str(n).replace("_", "").isalnum()]
        _require(not bad_names, f"ablations: names must be letters, digits and _, got {bad_names}")
        self.ablations = {str(n): a if isinstance(a, AblationConfig) else
                          from_dict(AblationConfig, a or {}, where=f"ablations.{n}")
                          for n, a in self.ablations.items()}
        _pretrain_seeds(self.pretrain_seeds)
        if self.diversity.frames:
            _require(self.diversity.frames in self.scaling.sizes,
                     f"diversity.frames {self.diversity.frames} must be one of scaling.sizes {self.scaling.sizes} "
                     f"(the sampled-conditions corpus of that size is the scaling curve's)")
            _conditions("diversity.single", self.diversity_conditions(), self.diversity.frames)
        for name, budgets in (("scaling", self.scaling.budgets), ("diversity", self.diversity.budgets),
                              ("two_stage", self.two_stage.budgets)):
            _require(max(budgets, default=0) <= 240, f"{name}.budgets: the DFT train split holds 240 frames, "
                                                      f"got {budgets}")
        for name in self.ablations:   # a misspelt key or an impossible value fails now, not an hour in
            self.ablation_stages(name)

    def ablation_stages(self, name: str) -> tuple[PretrainStageConfig, FinetuneStageConfig]:
        """The pretrain and finetune sections of ablation `name`: the study's, with its overrides merged."""
        a = self.ablations[name]
        return (from_dict(PretrainStageConfig, merge(asdict(self.pretrain), a.pretrain),
                          where=f"ablations.{name}.pretrain"),
                from_dict(FinetuneStageConfig, merge(asdict(self.finetune), a.finetune),
                          where=f"ablations.{name}.finetune"))

    def diversity_conditions(self) -> dict:
        """The single-condition corpus: the scaling curve's conditions with `diversity.single` over them."""
        return {**self.scaling.conditions, **self.diversity.single}

    def headline_pretrain_seeds(self) -> list[int]:
        return list(self.pretrain_seeds) or [self.pretrain.seed]

    def pretrain_variants(self) -> list[str]:
        """Water pretraining runs needed by the DFT and TIP3P settings, in order."""
        wanted = list(self.variants) if self.dft_water.enabled else []
        if self.tip3p.enabled:
            wanted += [v for v in self.tip3p.variants if v not in wanted]
        return [v for v in VARIANTS if v in wanted and VARIANTS[v] is not None]


def load_study(path: str | Path, scale: str, overrides: dict | None = None) -> StudyConfig:
    """`base` merged with `scales[scale]` (and `overrides`) from the YAML at `path`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study config not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    unknown = sorted(set(data) - {"base", "scales"})
    if unknown or not isinstance(data.get("scales"), dict):
        raise ConfigError(f"{p}: expected top-level keys 'base' and 'scales' (a mapping of scale name → "
                          f"overrides); unknown: {unknown}")
    if scale not in data["scales"]:
        raise ConfigError(f"{p}: scale {scale!r} is not defined; defined: {sorted(data['scales'])}")
    merged = merge(data.get("base") or {}, data["scales"][scale] or {})
    merged["scale"] = scale
    if overrides:
        merged = merge(merged, overrides)
    return from_dict(StudyConfig, merged, where=f"{p.name}[{scale}]")
