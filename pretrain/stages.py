"""Two-stage pretraining: `train.init` (`maskpot pretrain --init EXPORT`) starts from an export's weights.

The export must be of the configured architecture (model.name, every architecture parameter, the cutoff among them):
anything else is refused before any rank starts. The weights are loaded strictly; the normalisation
(E0, energy scale) is then refitted from the new data, as for a fresh model. A checkpoint in OUT_DIR
(resume) wins over the init export. The new export's lineage records the init export's lineage, so
both stages (data, objective, steps) can be read from the final model.json.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pretrain.export import load_export, read_meta


def check_init(cfg) -> dict | None:
    """The init export's meta, or None; ValueError naming train.init when it cannot continue this config."""
    if cfg.train.init is None:
        return None
    meta = read_meta(cfg.train.init)        # missing folder / files, newer format: clear errors
    mine = {"model": cfg.model.name, "params": cfg.model.arch_params()}   # params hold the cutoff
    theirs = {"model": meta["model"], "params": meta["params"]}
    if mine != theirs:
        keys = set(mine["params"]) | set(theirs["params"])
        diff = sorted(k for k in keys if mine["params"].get(k) != theirs["params"].get(k))
        what = (f"model {theirs['model']!r} (this config: {mine['model']!r})" if mine["model"] != theirs["model"]
                else f"parameters {diff} {[theirs['params'].get(k) for k in diff]} (this config: "
                     f"{[mine['params'].get(k) for k in diff]})")
        raise ValueError(f"train.init {cfg.train.init}: the export is another architecture, {what}; two-stage "
                         f"pretraining continues the same architecture: set model.name/model.params to the export's")
    return meta


def load_init_weights(model: torch.nn.Module, init: str) -> None:
    """Copy the export's weights (strict) into `model`; its normalisation buffers are set afterwards."""
    source, _ = load_export(init)
    model.load_state_dict(source.state_dict(), strict=True)


def init_lineage(cfg) -> dict:
    """Lineage fields an export of a run with `train.init` adds: the init export and its own lineage."""
    if cfg.train.init is None:
        return {}
    meta = read_meta(cfg.train.init)
    return {"stage": "pretrain", "init": str(Path(cfg.train.init)), "init_lineage": meta["lineage"]}
