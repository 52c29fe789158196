"""`maskpot evaluate`'s predictions file: every evaluated structure as extxyz with reference and predicted labels.

Like MACE's `mace_eval_configs`, the reference labels keep their names and the predictions get a prefix:
per structure `energy` (reference, eV), `maskpot_energy` (eV), `maskpot_energy_error_per_atom` (pred − ref,
eV/atom) and, when the model returns a stress, `maskpot_stress` (eV/Å³, 3×3 row-major; the reference
`stress` when the data carries it); per atom `forces` (reference, eV/Å), `maskpot_forces` (eV/Å) and
`maskpot_force_error` (|F_pred − F_ref|, eV/Å). Read it back with `ase.io.read(path, ":")`.

`Recorder` wraps the model while `metrics.evaluate` runs, so structures and predictions are taken from the
one evaluation pass, in the same order as the metrics' arrays.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch

from data_shards import keys as K
from pretrain.models.strain import energy_forces_stress

PREDICTIONS = "predictions.extxyz"
PREFIX = "maskpot_"


class Recorder(torch.nn.Module):
    """The model, plus a record of each batch's structures and their stress: the strain derivative of an
    energy-centric model's energy for fully periodic cells (none for force-centric models or open cells)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.stress_kwargs = {"compute_stress": True} if "compute_stress" in params else {}
        self.structures: list[dict] = []

    @property
    def force_centric(self) -> bool:   # the strain-derivative stress refuses force-centric models through this
        return bool(getattr(self.model, "force_centric", False))

    def stress_available(self, batch) -> bool:
        cells = batch[K.CELL].reshape(-1, 3, 3).double()
        return (not self.force_centric and bool(batch[K.PBC].all())
                and bool((torch.linalg.det(cells).abs() > 1e-9).all()))

    def forward(self, batch, compute_forces: bool = True) -> dict:
        out = self.model(batch, compute_forces=compute_forces, **self.stress_kwargs)
        if K.PRED_STRESS not in out and self.stress_available(batch):
            out = {**out, K.PRED_STRESS: energy_forces_stress(self.model, batch)[K.PRED_STRESS]}
        ptr = torch.cumsum(batch[K.NATOMS], 0).cpu().tolist()
        pos = batch[K.POSITIONS].detach().double().cpu().numpy()
        species = batch[K.SPECIES].cpu().numpy()
        cell = batch[K.CELL].detach().double().cpu().numpy().reshape(-1, 3, 3)
        pbc = batch[K.PBC].cpu().numpy().reshape(-1, 3)
        stress = out.get(K.PRED_STRESS)
        stress = None if stress is None else stress.detach().double().cpu().numpy().reshape(-1, 3, 3)
        ref_stress = getattr(batch, K.STRESS, None)
        ref_stress = None if ref_stress is None else ref_stress.detach().double().cpu().numpy().reshape(-1, 3, 3)
        start = 0
        for b, stop in enumerate(ptr):
            self.structures.append({"species": species[start:stop], "pos": pos[start:stop], "cell": cell[b],
                                    "pbc": pbc[b], "stress": None if stress is None else stress[b],
                                    "ref_stress": None if ref_stress is None else ref_stress[b]})
            start = stop
        return out


def write_predictions(structures: list[dict], arrays: dict, path: str | Path) -> Path:
    """The extxyz of the recorded structures with the metrics arrays (eV/atom, eV/Å) as labels."""
    from ase import Atoms  # startup: ase (+2.5 s) off the maskpot CLI start
    from ase.io import write  # startup: ase (+2.5 s) off the maskpot CLI start

    e_ref, e_pred = arrays["energy_per_atom_ref"], arrays["energy_per_atom_pred"]
    f_ref, f_pred = arrays["forces_ref"], arrays["forces_pred"]
    if len(structures) != len(e_ref):
        raise RuntimeError(f"recorded {len(structures)} structures but the metrics have {len(e_ref)}")
    frames, start = [], 0
    for s, er, ep in zip(structures, e_ref, e_pred, strict=True):
        n = len(s["species"])
        atoms = Atoms(numbers=s["species"], positions=s["pos"], cell=s["cell"], pbc=s["pbc"])
        fr, fp = f_ref[start:start + n], f_pred[start:start + n]
        start += n
        atoms.info.update({K.ENERGY: float(er * n), PREFIX + "energy": float(ep * n),
                           PREFIX + "energy_error_per_atom": float(ep - er)})
        if s["stress"] is not None:
            atoms.info[PREFIX + "stress"] = np.asarray(s["stress"]).reshape(9)
        if s["ref_stress"] is not None:
            atoms.info[K.STRESS] = np.asarray(s["ref_stress"]).reshape(9)
        atoms.arrays[K.FORCES] = np.asarray(fr, dtype=np.float64)
        atoms.arrays[PREFIX + "forces"] = np.asarray(fp, dtype=np.float64)
        atoms.arrays[PREFIX + "force_error"] = np.linalg.norm(fp - fr, axis=1)
        frames.append(atoms)
    path = Path(path)
    write(path, frames, format="extxyz")
    return path
