"""Model-only exports: `model.safetensors` (weights and buffers) + `model.json` (how to rebuild it).

model.json, format_version 2:
  {"format_version": 2, "model": "egnn", "params": {...architecture, the cutoff among them...},
   "species": [Z, ...], "normalisation": {"energy_scale": float, "e0": {"Z": eV}},
   "lineage": {"config_sha256", "manifest_sha256", "maskpot_version", "pretrain_objective", "steps"}}
The cutoff (Å) is stored once, in params (`cutoff`; mace: `r_max`); `export_cutoff(meta)` derives it.
Format 1 also held a top-level "cutoff" (the same number): it is still read, checked against params
(a disagreement is refused naming the file) and dropped from the returned meta.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pretrain.config import ModelConfig
from pretrain.models import build_model
from pretrain.models.base import ReferenceEnergyModel

FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
REQUIRED_META = ("model", "params", "species", "normalisation", "lineage")


def export_cutoff(meta: dict) -> float:
    """The graph cutoff (Å) of an export's meta (or any {"model", "params"}): what its architecture builds."""
    return ModelConfig(meta["model"], meta["params"]).cutoff


def save_export(model: torch.nn.Module, directory: str | Path, meta: dict) -> Path:
    """Write the export folder; float tensors are stored as fp32 whatever the training precision."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"export meta lacks {missing}; required: {list(REQUIRED_META)}")
    if "cutoff" in meta:
        raise ValueError(f"export meta holds a top-level 'cutoff' ({meta['cutoff']}); format {FORMAT_VERSION} "
                         f"stores it once, in params (export_cutoff derives it): drop the key")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        tensors[name] = (t.float() if t.is_floating_point() else t).contiguous().clone()
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    (directory / META_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2) + "\n")
    return directory


def read_meta(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a maskpot export ({META_FILE} missing)")
    meta = json.loads(path.read_text())
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise ValueError(f"{path}: format_version missing or not an integer ({version!r})")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version} is newer than this maskpot reads "
                         f"(up to {FORMAT_VERSION}); upgrade maskpot to load it")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing fields {missing}")
    try:
        cutoff = export_cutoff(meta)
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: model {meta['model']!r} with params {meta['params']} is not a valid "
                         f"architecture: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    stored = meta.pop("cutoff", None)   # format 1 held it twice; checked, then dropped
    if stored is not None and not (isinstance(stored, (int, float)) and abs(float(stored) - cutoff) <= 1e-9):
        raise ValueError(f"{path}: top-level cutoff {stored!r} disagrees with the cutoff its params give "
                         f"({cutoff:g} Å from {meta['model']!r} params); fix or delete the top-level cutoff")
    return meta


def read_weights(path: Path, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """safetensors tensors of `path`; a missing, truncated or foreign file is a one-line ValueError."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (an export holds {META_FILE} and {WEIGHTS_FILE})")
    try:
        return load_file(str(path), device=map_location)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or another format: "
                         f"{str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None


def load_export(directory: str | Path, map_location: str = "cpu") -> tuple[ReferenceEnergyModel, dict]:
    """Rebuild the model from model.json and load its weights, strictly: every key must match."""
    directory = Path(directory)
    meta = read_meta(directory)
    model = build_model(meta["model"], meta["params"])
    weights = read_weights(directory / WEIGHTS_FILE, map_location)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS_FILE} does not match model {meta['model']!r} "
                         f"with params {meta['params']}: missing keys {missing}, unexpected keys {unexpected}")
    own = model.state_dict()
    wrong = [f"{k} {tuple(weights[k].shape)} (model.json builds {tuple(own[k].shape)})"
             for k in sorted(own) if tuple(weights[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise ValueError(f"{directory / WEIGHTS_FILE} disagrees with the architecture in {directory / META_FILE} "
                         f"({meta['model']!r}, params {meta['params']}): {len(wrong)} tensor(s) of another shape, "
                         f"e.g. {'; '.join(wrong[:3])}")
    model.load_state_dict(weights, strict=True)
    norm = meta["normalisation"]
    model.set_normalisation(float(norm["energy_scale"]), {int(z): float(v) for z, v in norm["e0"].items()})
    return model, meta


def normalisation_from_stats(manifest: dict) -> dict:
    """{"energy_scale", "e0"} from manifest statistics.

    energy_scale = force_rms (eV/Å). The per-atom network's gradient is O(1) per Å at initialisation, so
    F = -energy_scale · ∂Σe/∂r starts at the data's force scale; energy_per_atom_std is not used because
    for fixed-composition boxes E0 absorbs almost all energy variance and that std is tiny (forces
    would start orders of magnitude too small). e0 is the per-element least-squares reference energy.
    An unlabelled corpus has no statistics: scale 1, no E0.
    """
    stats = manifest.get("stats") or {}
    scale = stats.get("force_rms")
    return {"energy_scale": float(scale) if scale and scale > 0 else 1.0,
            "e0": {str(z): float(v) for z, v in (stats.get("e0") or {}).items()}}


def fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """The engine's model state with fp32 master weights. Collective under ZeRO / bf16: call on every rank."""
    from deepspeed.utils import (
        safe_get_full_fp32_param,  # startup: deepspeed (+11 s over torch); finetune imports this module without it
    )

    state = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    for name, param in engine.module.named_parameters():
        master = safe_get_full_fp32_param(param)
        state[name] = (master if master is not None else param).detach().float().cpu().clone()
    return state
