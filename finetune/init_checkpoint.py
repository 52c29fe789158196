"""`init:` as a pretrain export folder or a DeepSpeed training checkpoint of `maskpot pretrain`.

A checkpoint is named by its tag folder (`RUN/checkpoints/step00000100`, holding `state.json`), by a
checkpoints folder or by the run folder; for the latter two the tag in `best.json` (best validation
loss) is taken when it is complete, else the newest complete tag. The architecture comes from the
config recorded in `state.json`, the weights from DeepSpeed's `mp_rank_00_model_states.pt`, read with
`torch.load(weights_only=True)` (no arbitrary unpickling). That file holds the full module weights in
the training precision under ZeRO stages 0-2: fp32 runs load exactly; bf16 runs and ZeRO-3 (whose
fp32 master weights exist only as optimizer partitions) are refused: use the run's export, which
gathers them. The species are the elements with a reference energy in the checkpoint (the pretraining
manifest's E0), else the elements of the pretraining manifest if it is still there, unchanged.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from pretrain.checkpoint import (
    BEST_FILE,
    CHECKPOINT_SUBDIR,
    STATE_FILE,
    best_tag,
    complete_tags,
    manifest_sha256,
    tag_problem,
)
from pretrain.export import META_FILE, WEIGHTS_FILE, load_export, read_meta
from pretrain.models import build_model
from pretrain.models.base import ReferenceEnergyModel

MODEL_STATES = "mp_rank_00_model_states.pt"


def checkpoint_tag(path: str | Path) -> Path | None:
    """The tag folder `path` names (tag, checkpoints folder or run folder), or None if it is no checkpoint."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for ckpt_dir in (path, path / CHECKPOINT_SUBDIR):
        tags = complete_tags(ckpt_dir)
        if tags:
            best = best_tag(ckpt_dir) if (ckpt_dir / BEST_FILE).is_file() else None
            return ckpt_dir / (best if best in tags else tags[-1])
    return None


def weights_file(init: str | Path) -> Path:
    """The file whose sha256 identifies the init weights."""
    tag = None if (Path(init) / META_FILE).is_file() else checkpoint_tag(init)
    return Path(init) / WEIGHTS_FILE if tag is None else tag / MODEL_STATES


def read_init_meta(init: str | Path) -> dict:
    """Export-style meta ({"model", "params", "species", "lineage", ...}) of an export or checkpoint.

    The cutoff is in params: `pretrain.export.export_cutoff(meta)`."""
    return load_init(init)[1] if _is_checkpoint(init) else read_meta(init)


def load_init(init: str | Path) -> tuple[ReferenceEnergyModel, dict]:
    """(model with the init weights, export-style meta)."""
    if not _is_checkpoint(init):
        return load_export(init)

    tag = checkpoint_tag(init)
    assert tag is not None  # _is_checkpoint(init)
    record = json.loads((tag / STATE_FILE).read_text())
    config = record.get("config", {})
    _check_loadable(tag, config)
    model = build_model(config["model.name"], config["model.params"])
    states = _read_model_states(tag / MODEL_STATES)
    weights = states.get("module") if isinstance(states, dict) else None
    if not isinstance(weights, dict):
        raise ValueError(f"{tag / MODEL_STATES}: no 'module' weights in this DeepSpeed checkpoint file")
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"{tag / MODEL_STATES} does not match model {config['model.name']!r} with params "
                         f"{config['model.params']}: missing keys {missing}, unexpected keys {unexpected}")
    model.load_state_dict(weights, strict=True)
    meta = {"model": config["model.name"], "params": config["model.params"],   # params hold the cutoff
            "species": _species(model, config, record, tag),
            "lineage": {"config_sha256": record.get("config_hash"), "manifest_sha256": record.get("manifest_sha256"),
                        "pretrain_objective": config.get("objective.kind"),
                        "steps": record.get("train_state", {}).get("step"), "checkpoint": str(tag)}}
    return model, meta


def _read_model_states(path: Path):
    """torch.load(weights_only=True): a pickled object is refused (never run), a damaged file reported."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [x for x in str(e).splitlines() if "GLOBAL" in x or "Unsupported" in x]
        what = (lines or ["pickled objects"])[0].strip()[:160]
        raise ValueError(f"{path}: refused to load: not plain weights ({what}); nothing in it was executed. "
                         f"Finetune from the run's export (RUN/export)") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable DeepSpeed checkpoint file (truncated or corrupt: "
                         f"{str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None


def _is_checkpoint(init: str | Path) -> bool:
    return not (Path(init) / META_FILE).is_file() and checkpoint_tag(init) is not None


def _check_loadable(tag: Path, config: dict) -> None:
    if "model.name" not in config or "model.params" not in config:
        raise ValueError(f"{tag / STATE_FILE}: no model.name / model.params in its recorded config")
    stage, precision = config.get("deepspeed.zero_stage", 0), config.get("deepspeed.precision", "fp32")
    if stage == 3 or precision != "fp32":
        raise ValueError(f"{tag}: a ZeRO stage {stage}, {precision} checkpoint holds its fp32 weights only as "
                         f"optimizer partitions; finetune from the run's export (RUN/export) instead")
    problem = tag_problem(tag.parent, tag.name)
    if problem:
        raise ValueError(f"checkpoint {tag} is damaged: {problem}")
    if not (tag / MODEL_STATES).is_file():
        raise FileNotFoundError(f"{tag}: {MODEL_STATES} missing (not a DeepSpeed checkpoint of maskpot pretrain)")


def _species(model, config: dict, record: dict, tag: Path) -> list[int]:
    if model.species:
        return model.species
    manifest_dir = config.get("data.manifest_dir")
    if manifest_dir and (Path(manifest_dir) / "manifest.json").is_file() \
            and manifest_sha256(manifest_dir) == record.get("manifest_sha256"):
        return sorted(int(z) for z in json.loads((Path(manifest_dir) / "manifest.json").read_text())["elements"])
    raise ValueError(f"{tag}: cannot tell which elements the checkpoint was trained on (no reference energies "
                     f"in it, and its pretraining manifest {manifest_dir} is gone or changed); finetune from "
                     f"the run's export instead")
