"""Flexible water models the corpus generator runs with OpenMM on CPU, and the conditions each is valid for.

tip3p: OpenMM's own `tip3p.xml` with rigidWater=False (harmonic O-H bonds and H-O-H angle).
spcfw: SPC/Fw (Wu, Tepper, Voth, J. Chem. Phys. 124, 024503, 2006) from `spcfw.xml` in this package:
       parametrised for liquid-state properties with flexibility (O-H 1.012 Å, H-O-H 113.24°), closer to
       ab initio water's structure and dielectric constant than flexible TIP3P.
Validity ranges are the liquid at about ambient pressure the models were fitted near (density within
±30% of 1 g/cm³, 200-600 K); conditions outside refuse to start.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class WaterModel:
    name: str
    forcefield: str            # OpenMM ForceField file: a name OpenMM ships or a path
    oh_bond: float             # Å, equilibrium geometry (initial structures)
    hoh_angle_deg: float
    temperature_k: tuple[float, float] = (200.0, 600.0)
    density_g_cm3: tuple[float, float] = (0.7, 1.3)

    @property
    def hoh_angle(self) -> float:
        return math.radians(self.hoh_angle_deg)

    def check(self, temperature: float, density: float) -> None:
        """ValueError naming the condition outside this model's validity."""
        lo, hi = self.temperature_k
        if not lo <= temperature <= hi:
            raise ValueError(f"temperature {temperature:g} K is outside water model {self.name!r}'s valid range "
                             f"[{lo:g}, {hi:g}] K")
        lo, hi = self.density_g_cm3
        if not lo <= density <= hi:
            raise ValueError(f"density {density:g} g/cm³ is outside water model {self.name!r}'s valid range "
                             f"[{lo:g}, {hi:g}] g/cm³")


WATER_MODELS = {
    "tip3p": WaterModel("tip3p", "tip3p.xml", 0.9572, 104.52),
    "spcfw": WaterModel("spcfw", str(HERE / "spcfw.xml"), 1.012, 113.24),
}


def get_model(name: str) -> WaterModel:
    if name not in WATER_MODELS:
        raise ValueError(f"water model {name!r} is not one of {sorted(WATER_MODELS)}")
    return WATER_MODELS[name]
