"""Safety checks of `maskpot md`: a model that heats the system, collapses atoms or does not conserve energy.

At every recorded step (`--every`) the run checks
- temperature against `--max-temperature` K (default: 2 × the target temperature, at least 600 K);
- the closest interatomic distance (periodic images included) against `--min-distance` Å (default 0.5 Å);
- in NVE, the total-energy drift |E_tot − E_tot(0)| per atom against `--max-drift` eV/atom (default 0.05).
A value past WARN_FRACTION of its limit is warned about once (logged and printed); a value past the limit
stops the run with MDUnstable, whose one-line message names the step, the value, the limit and the option.
The trajectory and log written up to that step are kept. `--no-guards` turns every check off.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from data_shards.frame import closest_pair

WARN_FRACTION = 0.75         # warn once when a quantity passes this fraction of its limit
DEFAULT_MIN_DISTANCE = 0.5   # Å
DEFAULT_MAX_DRIFT = 0.05     # eV/atom
MIN_TEMPERATURE_LIMIT = 600.0  # K, the default limit for cold runs

log = logging.getLogger("finetune.md")


class MDUnstable(RuntimeError):
    """The run was stopped by a guard; the message is one line for the user."""


def default_max_temperature(target: float) -> float:
    return max(2.0 * target, MIN_TEMPERATURE_LIMIT)


@dataclass
class MDGuards:
    max_temperature: float | None = None   # K; None: default_max_temperature(target)
    min_distance: float = DEFAULT_MIN_DISTANCE   # Å; 0 disables
    max_drift: float = DEFAULT_MAX_DRIFT          # eV/atom, NVE only; 0 disables
    enabled: bool = True
    warned: set = field(default_factory=set)

    def __post_init__(self):
        if self.max_temperature is not None and not self.max_temperature > 0:
            raise ValueError(f"--max-temperature must be > 0 K, got {self.max_temperature!r}")
        if not self.min_distance >= 0:
            raise ValueError(f"--min-distance must be >= 0 Å (0: off), got {self.min_distance!r}")
        if not self.max_drift >= 0:
            raise ValueError(f"--max-drift must be >= 0 eV/atom (0: off), got {self.max_drift!r}")

    def _check(self, name: str, value: float, limit: float, above: bool, step: int, unit: str, option: str,
               hint: str) -> None:
        past = (value > limit) if above else (value < limit)
        near = (value > WARN_FRACTION * limit) if above else (value < limit / WARN_FRACTION)
        if past or not math.isfinite(value):
            raise MDUnstable(f"md stopped at step {step}: {name} {value:.4g} {unit} is past the limit {limit:.4g} "
                             f"{unit} ({option}); {hint}")
        if near and name not in self.warned:
            self.warned.add(name)
            log.warning("md step %d: %s %.4g %s is approaching the limit %.4g %s (%s); %s", step, name, value, unit,
                        limit, unit, option, hint)

    def check(self, atoms, step: int, target_temperature: float, etot: float, etot0: float, nve: bool) -> None:
        """Raise MDUnstable when a limit is passed; warn once per quantity when one is approached."""
        if not self.enabled:
            return
        t_max = self.max_temperature or default_max_temperature(target_temperature)
        self._check("temperature", float(atoms.get_temperature()), t_max, True, step, "K", "--max-temperature",
                    "the model is heating the system (unphysical forces); check it with `maskpot evaluate`")
        if self.min_distance > 0:
            close = closest_pair(atoms.positions, np.asarray(atoms.cell), atoms.pbc,
                                 self.min_distance / WARN_FRACTION)
            if close is not None:
                (i, j), d = close
                self._check("closest distance", d, self.min_distance, False, step, "Å", "--min-distance",
                            f"atoms {i} and {j} overlap: the model lacks short-range repulsion there")
        if nve and self.max_drift > 0:
            drift = abs(etot - etot0) / len(atoms)
            self._check("energy drift", drift, self.max_drift, True, step, "eV/atom", "--max-drift",
                        "NVE total energy is not conserved: reduce --timestep or check the model's forces")


def add_arguments(p) -> None:
    g = p.add_argument_group("safety checks (at every --every step; warn at 75% of a limit, stop past it)")
    g.add_argument("--max-temperature", type=float, default=None, metavar="K",
                   help="stop when the temperature passes this, in K (default: 2 × --temperature, at least 600 K)")
    g.add_argument("--min-distance", type=float, default=DEFAULT_MIN_DISTANCE, metavar="Å",
                   help=f"stop when two atoms come closer than this, in Å; 0 = off (default: {DEFAULT_MIN_DISTANCE})")
    g.add_argument("--max-drift", type=float, default=DEFAULT_MAX_DRIFT, metavar="EV_PER_ATOM",
                   help=f"NVE only: stop when |E_tot − E_tot(0)| per atom passes this, in eV/atom; 0 = off "
                        f"(default: {DEFAULT_MAX_DRIFT})")
    g.add_argument("--no-guards", action="store_true", help="turn every safety check off")


def from_args(args) -> MDGuards:
    return MDGuards(args.max_temperature, args.min_distance, args.max_drift, enabled=not args.no_guards)
