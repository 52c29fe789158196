"""DeepSpeed checkpoint engine that never unpickles: `torch.load(weights_only=True)` plus an allow-list.

DeepSpeed's own `TorchCheckpointEngine.load` calls `torch.load(..., weights_only=False)`, which runs any
pickled code placed in a checkpoint folder. Every DeepSpeed load of a ZeRO ≤ 2 checkpoint (model states,
optimizer states, ZeRO partitions) goes through `engine.checkpoint_engine.load`, so `install(engine)`
swaps in this engine after `deepspeed.initialize`. The weights-only unpickler builds tensors, containers
and plain Python values; beyond those, only the few DeepSpeed types its optimizer states hold are allowed
(`SAFE_GLOBALS`), and those only have their attributes set (no code runs). Anything else is refused with
`UnsafeCheckpoint`, naming the file and the global it asked for.
"""
from __future__ import annotations

import pickle

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
    TorchCheckpointEngine,
)
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# what ZeRO 1/2 optimizer states (fp32 and bf16) hold besides tensors and builtins, found by loading
# real checkpoints with weights_only=True (tests/pretrain/test_no_pickle_resume.py saves and loads each)
SAFE_GLOBALS = (LossScaler, ZeroStageEnum, fragment_address)


class UnsafeCheckpoint(ValueError):
    """A checkpoint file that is not plain weights (pickled code or an object outside the allow-list)."""


def safe_load(path, map_location=None):
    """torch.load with weights_only=True and only SAFE_GLOBALS allowed; UnsafeCheckpoint otherwise."""
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        reason = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise UnsafeCheckpoint(f"{path}: refused to load: not plain weights ({reason.strip()[:200]}); "
                               f"nothing in it was executed") from None


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch engine for saving; loading through `safe_load`."""

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location=map_location)


def install(engine) -> None:
    """Replace the engine's checkpoint engine (called right after deepspeed.initialize)."""
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
