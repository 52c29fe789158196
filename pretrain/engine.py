"""DeepSpeed plumbing: the JSON config generated from `PretrainConfig`, process-group setup, the engine.

The DeepSpeed JSON is never edited by hand: `deepspeed_config(cfg)` derives it from the dataclass and
`build_engine` writes a copy into the run folder for the record.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from data_shards import keys as K
from pretrain import checkpoint_engine
from pretrain import distributed as D
from pretrain.config import PretrainConfig

STEPS_PER_PRINT_NEVER = 10**9


def deepspeed_config(cfg: PretrainConfig) -> dict:
    """DeepSpeed JSON for `cfg`.

    One micro batch is one loader batch: the loader already packs `data.batch_size` structures into a
    single torch_geometric graph, and DeepSpeed never slices it. So train_micro_batch_size_per_gpu is 1
    (it only enters DeepSpeed's bookkeeping: train_batch_size = 1 × accumulation × world size, which
    DeepSpeed derives itself, so the JSON does not depend on the launch).
    """
    ds = cfg.deepspeed
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": STEPS_PER_PRINT_NEVER,
        "wall_clock_breakdown": False,
    }


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Join (or, run alone, create) the process group on `device` (auto | cpu | cuda); (rank, world_size).

    See `pretrain.distributed.init_process_group`: nccl for CUDA ranks, gloo for CPU ranks.
    """
    rank, world_size, _ = D.init_process_group(device)
    return rank, world_size


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only; none on biases, norm scales, embeddings."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or id(p) in embedding_weights else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: PretrainConfig, model: torch.nn.Module):
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: o.lr_multiplier(step, cfg.train.max_steps))
    return optimizer, scheduler


def build_engine(cfg: PretrainConfig, model: torch.nn.Module, run_dir: str | Path | None = None):
    """deepspeed.initialize with a torch AdamW (DeepSpeed's own Adam would JIT-compile) and LR schedule."""
    import deepspeed  # startup: deepspeed (and checkpoint_engine, which imports it) take seconds to import


    ds_config = deepspeed_config(cfg)
    if run_dir is not None and D.rank() == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    optimizer, scheduler = build_optimizer(cfg, model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    checkpoint_engine.install(engine)  # loads with weights_only=True: nothing on disk is unpickled
    return engine


MODEL_INPUT_FLOATS = (K.POSITIONS, K.SHIFT_VECTORS, K.CELL)


def to_model_precision(batch, engine):
    """Move the batch to the engine's device and its geometry to the weights' dtype (bf16 runs).

    DeepSpeed bf16 casts the weights, so the model computes in bf16 throughout: coordinates are then
    rounded to ~0.03-0.06 Å in a 12 Å box. Targets stay fp32 and losses are taken in fp32.
    """
    batch = batch.to(device_of(engine))
    dtype = next(engine.module.parameters()).dtype
    for key in MODEL_INPUT_FLOATS:
        if key in batch and batch[key].is_floating_point() and batch[key].dtype != dtype:
            batch[key] = batch[key].to(dtype)
    return batch


def device_of(engine) -> torch.device:
    return torch.device(engine.device) if hasattr(engine, "device") else torch.device("cpu")


class WeightEMA:
    """Exponential moving average of the fp32 master weights, kept identically on every rank.

    `update` follows each optimizer step (collective under ZeRO / bf16, like `export.fp32_state_dict`);
    buffers (the normalisation) are not averaged. Saved as safetensors.
    """

    def __init__(self, engine, decay: float):
        assert 0.0 < decay < 1.0, decay
        self.decay = decay
        self.reset(engine)

    def reset(self, engine) -> None:
        from pretrain.export import fp32_state_dict  # startup: safetensors+torch

        names = {name for name, _ in engine.module.named_parameters()}
        self.shadow = {k: v.clone() for k, v in fp32_state_dict(engine).items() if k in names}

    @torch.no_grad()
    def update(self, engine) -> None:
        from deepspeed.utils import safe_get_full_fp32_param  # startup: deepspeed+mlflow+torch

        for name, param in engine.module.named_parameters():
            master = safe_get_full_fp32_param(param)
            current = (master if master is not None else param).detach().float().cpu()
            self.shadow[name].mul_(self.decay).add_(current, alpha=1.0 - self.decay)

    def state_dict(self, engine) -> dict[str, torch.Tensor]:
        """The model state with averaged parameters (buffers from the engine)."""
        from pretrain.export import fp32_state_dict  # startup: safetensors+torch

        return {**fp32_state_dict(engine), **{k: v.clone() for k, v in self.shadow.items()}}

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file  # startup: safetensors+torch

        save_file({k: v.contiguous() for k, v in self.shadow.items()}, str(path),
                  metadata={"decay": str(self.decay)})

    def load(self, path: str | Path) -> None:
        from safetensors.torch import load_file  # startup: safetensors+torch

        loaded = load_file(str(path))
        if set(loaded) != set(self.shadow):
            raise ValueError(f"{path}: EMA parameters {sorted(set(loaded) ^ set(self.shadow))} do not match the model")
        self.shadow = {k: v.float() for k, v in loaded.items()}

    @contextmanager
    def swapped_in(self, engine):
        """Temporarily put the averaged weights into the engine's module (e.g. for validation)."""
        params = dict(engine.module.named_parameters())
        saved = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.shadow[k].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(saved[k])
