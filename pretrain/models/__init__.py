"""Model registry: architecture name → (config dataclass, module class); `build_model` validates params."""
from __future__ import annotations

from torch import nn

from data_shards.config_io import from_dict
from pretrain.models.egnn import EGNN, EGNNConfig
from pretrain.models.egnn_paper import PaperEGNN, PaperEGNNConfig
from pretrain.models.forcenet import ForceNet, ForceNetConfig
from pretrain.models.gns import GNS, GNSConfig
from pretrain.models.mace import (  # mace-torch itself is imported on first use
    MACE,
    MACEConfig,
)

MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "egnn": (EGNNConfig, EGNN),
    "egnn_paper": (PaperEGNNConfig, PaperEGNN),
    "gns": (GNSConfig, GNS),
    "forcenet": (ForceNetConfig, ForceNet),
    "mace": (MACEConfig, MACE),
}


def build_model(name: str, params: dict | None = None) -> nn.Module:
    """Instantiate architecture `name`; unknown names or params raise ValueError listing the valid ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {sorted(MODELS)}")
    config_cls, model_cls = MODELS[name]
    config = from_dict(config_cls, params or {}, f"model {name!r} params")
    return model_cls(config)
