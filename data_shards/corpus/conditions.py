"""`CorpusConfig` (what to generate) and the per-trajectory conditions drawn from it.

Each trajectory i draws its conditions from a generator seeded by (seed, i) only: temperature uniform in
`temperature_k`, density uniform in `density_g_cm3`, molecule count uniform (integers) in `molecules`, the
water model uniformly from `models`, and its own MD seed. So trajectory i is the same whatever the number
of trajectories, workers or restarts, and a corpus is bit-reproducible per seed.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from data_shards.corpus.models import WATER_MODELS, get_model

MAX_MD_SEED = 2**31 - 3           # OpenMM seeds are int32 and 0 means "random"; we pass seed + 1
MAX_MOLECULES = 4096


@dataclass(frozen=True)
class CorpusConfig:
    trajectories: int = 4
    frames_per_trajectory: int = 50
    seed: int = 0
    temperature_k: tuple[float, float] = (250.0, 450.0)
    density_g_cm3: tuple[float, float] = (0.9, 1.1)        # ±10% around 1 g/cm³
    molecules: tuple[int, int] = (32, 128)
    models: tuple[str, ...] = ("tip3p", "spcfw")
    periodic: bool = True          # False: non-periodic clusters (no box, no cutoff)
    steps_between_frames: int = 100
    equilibration_steps: int = 2000
    timestep_fs: float = 0.5
    friction_per_ps: float = 1.0

    def __post_init__(self):
        for name in ("trajectories", "frames_per_trajectory", "steps_between_frames"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.equilibration_steps, int) or self.equilibration_steps < 0:
            raise ValueError(f"equilibration_steps must be an integer >= 0, got {self.equilibration_steps!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("temperature_k", "density_g_cm3", "molecules"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name} range [{lo}, {hi}] is empty (low > high)")
        if not self.temperature_k[0] > 0:
            raise ValueError(f"temperature_k must be > 0 K, got {list(self.temperature_k)}")
        if not self.density_g_cm3[0] > 0:
            raise ValueError(f"density_g_cm3 must be > 0 g/cm³, got {list(self.density_g_cm3)}")
        if not (1 <= self.molecules[0] and self.molecules[1] <= MAX_MOLECULES):
            raise ValueError(f"molecules must lie in [1, {MAX_MOLECULES}], got {list(self.molecules)}")
        if not self.models:
            raise ValueError(f"models is empty; choose from {sorted(WATER_MODELS)}")
        for name in self.models:
            model = get_model(name)
            for t in self.temperature_k:
                model.check(t, self.density_g_cm3[0])
            for d in self.density_g_cm3:
                model.check(self.temperature_k[0], d)
        for name in ("timestep_fs", "friction_per_ps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Trajectory:
    index: int
    model: str
    temperature_k: float
    density_g_cm3: float
    molecules: int
    md_seed: int
    periodic: bool

    @property
    def file_name(self) -> str:
        return f"traj-{self.index:06d}.extxyz"


def draw(cfg: CorpusConfig, index: int) -> Trajectory:
    """Trajectory `index`'s conditions: a pure function of (cfg ranges, cfg.seed, index)."""
    rng = np.random.default_rng([cfg.seed, index])
    temperature = float(rng.uniform(*cfg.temperature_k))
    density = float(rng.uniform(*cfg.density_g_cm3))
    molecules = int(rng.integers(cfg.molecules[0], cfg.molecules[1] + 1))
    model = cfg.models[int(rng.integers(len(cfg.models)))]
    digest = hashlib.sha256(f"{cfg.seed}:{index}".encode()).digest()
    md_seed = int.from_bytes(digest[:4], "little") % MAX_MD_SEED
    return Trajectory(index, model, round(temperature, 6), round(density, 6), molecules, md_seed, cfg.periodic)


def plan(cfg: CorpusConfig) -> list[Trajectory]:
    return [draw(cfg, i) for i in range(cfg.trajectories)]
