"""Pretraining stage: config validation, the generated DeepSpeed JSON, LR schedule, checkpoints, and
(slow) real 2-process torchrun runs on a tiny shard set: finish, resume exactly, ZeRO-2 + bf16."""
from __future__ import annotations

import json
import math

import pytest
import torch

from data_shards.config_io import ConfigError, load_config
from pretrain.config import PretrainConfig, resume_hash
from pretrain.engine import deepspeed_config, param_groups
from pretrain.schedule import lr_factor
from tests.helpers.paths import PRETRAIN_TINY
from tests.helpers.pretraining import ListStream, cfg_with, run_pretrain, tiny_engine, train_losses, train_tiny

# --- config ------------------------------------------------------------------------------------------

def test_tiny_config_loads_with_model_cutoff():
    cfg = load_config(PretrainConfig, PRETRAIN_TINY)
    assert cfg.model.cutoff == 3.5
    assert cfg.model.arch_params()["hidden"] == 16


@pytest.mark.parametrize("sections, expected", [
    ({"train": {"max_stepz": 3}}, ["max_stepz", "max_steps"]),
    ({"deepspeed": {"zero_stage": 4}}, ["zero_stage", "[0, 1, 2]"]),
    ({"deepspeed": {"precision": "fp16"}}, ["fp16", "unsupported", "CPU", "bf16"]),
    ({"objective": {"mask_ratio": 0.0}}, ["mask_ratio", "(0, 1]"]),
    ({"objective": {"kind": "jigsaw"}}, ["jigsaw", "mask+denoise"]),
    ({"model": {"params": {"hiden": 8}}}, ["hiden", "hidden"]),
    ({"model": {"name": "schnet"}}, ["schnet", "egnn", "mace"]),
    ({"data": {"batch_size": 0}}, ["batch_size"]),
])
def test_bad_config_fails_naming_the_key_and_options(sections, expected):
    with pytest.raises(ConfigError) as err:
        cfg_with(**sections)
    for text in expected:
        assert text in str(err.value)


def test_resume_hash_ignores_harmless_keys_only():
    base = cfg_with(optim={"decay_steps": 10})
    assert resume_hash(base) == resume_hash(cfg_with(optim={"decay_steps": 10},
                                                     train={"max_steps": 99, "log_every": 7}))
    assert resume_hash(base) != resume_hash(cfg_with(optim={"decay_steps": 10, "lr": 0.1}))
    # without decay_steps the schedule follows max_steps, so changing it changes the run
    assert resume_hash(cfg_with()) != resume_hash(cfg_with(train={"max_steps": 99}))


# --- DeepSpeed JSON, optimizer, schedule ---------------------------------------------------------

def test_deepspeed_json_is_generated_from_the_dataclass():
    ds = deepspeed_config(cfg_with(deepspeed={"zero_stage": 2, "precision": "bf16",
                                              "gradient_accumulation_steps": 3}, optim={"grad_clip": 0.5}))
    assert ds["train_micro_batch_size_per_gpu"] == 1   # one loader batch (a whole PyG graph) per micro step
    assert "train_batch_size" not in ds                # DeepSpeed derives it from the world size
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["steps_per_print"] >= 10**9 and ds["wall_clock_breakdown"] is False
    assert deepspeed_config(cfg_with())["bf16"] == {"enabled": False}
    json.dumps(ds)


def test_lr_warms_up_linearly_then_decays_to_min_lr():
    lr, min_lr, warm, total = 1e-3, 1e-5, 4, 20
    factors = [lr_factor(s, lr, min_lr, warm, total) for s in range(total + 5)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    decay = factors[4:total + 1]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert factors[total] * lr == pytest.approx(min_lr)
    assert factors[-1] * lr == pytest.approx(min_lr)  # past the horizon it stays at min_lr


def test_one_optim_section_for_both_stages():
    """Pretraining and finetuning share OptimConfig (finetuning only changes defaults): same schedule, checks."""
    from finetune.config import OptimConfig as FinetuneOptim
    from pretrain.config import OptimConfig

    assert issubclass(FinetuneOptim, OptimConfig) and FinetuneOptim().lr != OptimConfig().lr
    for cls in (OptimConfig, FinetuneOptim):
        cosine = cls(lr=1e-3, min_lr=1e-5, warmup_steps=2, decay_steps=10)
        assert cosine.lr_multiplier(0, 100) == pytest.approx(0.5)
        assert cosine.lr_multiplier(10, 100) * 1e-3 == pytest.approx(1e-5)     # decay_steps wins over max_steps
        assert cls(lr=1e-3, warmup_steps=2, schedule="constant").lr_multiplier(50, 100) == 1.0
        with pytest.raises(ValueError, match=r"optim.schedule 'step' is not one of \['cosine', 'constant'\]"):
            cls(schedule="step")


def test_weight_decay_skips_biases_norms_and_embeddings():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]     # the Linear weight only
    assert len(no_decay["params"]) == 4  # embedding, linear bias, norm weight and bias


# --- engine + checkpoints in one process (world size 1), on a throwaway module -------------------

def test_checkpoint_round_trip_keep_last_and_refusals(one_rank, tmp_path):
    from pretrain import checkpoint as ckpt

    manifest_dir = tmp_path / "shards"
    manifest_dir.mkdir()
    (manifest_dir / "manifest.json").write_text('{"schema_version": 1}')
    cfg = cfg_with(train={"out_dir": str(tmp_path / "run"), "max_steps": 20},
                   data={"manifest_dir": str(manifest_dir)})
    mhash = ckpt.manifest_sha256(manifest_dir)
    engine = tiny_engine(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "deepspeed_config.json").read_text()) == deepspeed_config(cfg)
    state = ckpt.TrainState()
    for step in (2, 4, 6):
        train_tiny(engine, 2)
        state.step, state.batches_in_epoch = step, step * 3
        ckpt.save_checkpoint(engine, cfg.train.out_dir, state, cfg, mhash, keep_last=2)
    assert ckpt.complete_tags(tmp_path / "run" / "checkpoints") == ["step00000004", "step00000006"]
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    lr = engine.get_lr()[0]

    resumed = tiny_engine(cfg, None)
    assert not torch.equal(resumed.module.lin.weight, weights["lin.weight"])
    where = ckpt.resolve_resume("auto", cfg.train.out_dir)
    assert where[1] == "step00000006"
    got = ckpt.load_checkpoint(resumed, *where, cfg, mhash)
    assert (got.step, got.batches_in_epoch) == (6, 18)
    for k, v in resumed.module.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert resumed.get_lr()[0] == lr
    train_tiny(engine, 1, seed=5)
    train_tiny(resumed, 1, seed=5)  # same optimizer moments: the next update is identical
    assert torch.equal(engine.module.lin.weight, resumed.module.lin.weight)

    changed = cfg_with(train={"out_dir": str(tmp_path / "run"), "max_steps": 20},
                       data={"manifest_dir": str(manifest_dir)}, optim={"lr": 0.5})
    with pytest.raises(ValueError, match=r"optim\.lr.*0\.001.*0\.5.*--allow-config-change"):
        ckpt.load_checkpoint(resumed, *where, changed, mhash)
    with pytest.raises(ValueError, match="manifest sha256"):
        ckpt.load_checkpoint(resumed, *where, cfg, "0" * 64)
    assert ckpt.load_checkpoint(resumed, *where, changed, mhash, allow_config_change=True).step == 6
    assert ckpt.resolve_resume("never", cfg.train.out_dir) is None
    with pytest.raises(FileNotFoundError):
        ckpt.resolve_resume(str(tmp_path / "nowhere"), cfg.train.out_dir)


# --- real 2-process runs on a tiny shard set (slow) ----------------------------------------------

@pytest.mark.slow
def test_two_ranks_train_checkpoint_export_and_resume_exactly(tiny_shards, tmp_path):
    from pretrain.export import load_export

    full, split = tmp_path / "full", tmp_path / "split"
    assert run_pretrain(tiny_shards, full, "train.max_steps=10") == 0
    losses = train_losses(full)
    assert sorted(losses) == list(range(1, 11))
    assert all(math.isfinite(v) for v in losses.values())
    assert sorted(p.name for p in (full / "checkpoints").glob("step*")) == ["step00000005", "step00000010"]
    model, meta = load_export(full / "export")
    assert meta["lineage"]["steps"] in (5, 10) and meta["lineage"]["pretrain_objective"] == "mask"
    assert meta["species"] == [1, 8] and meta["normalisation"]["energy_scale"] > 0
    assert json.loads((full / "deepspeed_config.json").read_text())["zero_optimization"] == {"stage": 0}

    assert run_pretrain(tiny_shards, split, "train.max_steps=6") == 0
    assert run_pretrain(tiny_shards, split, "train.max_steps=10") == 0  # resumes from step 6
    resumed = train_losses(split)
    assert sorted(resumed) == list(range(1, 11))
    assert [resumed[s] for s in range(1, 11)] == [losses[s] for s in range(1, 11)]  # bit-identical


@pytest.mark.slow
def test_zero2_bf16_with_accumulation_runs(tiny_shards, tmp_path):
    from pretrain.export import load_export

    out = tmp_path / "z2"
    assert run_pretrain(tiny_shards, out, "train.max_steps=3", "deepspeed.zero_stage=2",
                        "deepspeed.precision=bf16", "deepspeed.gradient_accumulation_steps=2",
                        "objective.kind=mask+denoise", resume="never") == 0
    losses = train_losses(out)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    model, _ = load_export(out / "export")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the export holds the fp32 master weights, not the bf16 working copy
    assert any((p != p.bfloat16().float()).any() for p in model.parameters())


def test_cli_rejects_a_bad_config_before_launching(tmp_path):
    with pytest.raises(ConfigError, match="fp16"):
        run_pretrain(tmp_path, tmp_path / "never", "deepspeed.precision=fp16")
    with pytest.raises(ValueError, match="manifest"):
        run_pretrain(tmp_path / "no_shards", tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_nonfinite_loss_is_skipped_and_counted(one_rank, tiny_shards, tmp_path):
    from data_shards.stream import ShardStream
    from pretrain import checkpoint as ckpt
    from pretrain.engine import build_engine
    from pretrain.loop import LockstepBatches, make_transform, train_step
    from pretrain.models import build_model

    cfg = cfg_with(data={"manifest_dir": str(tiny_shards)}, train={"out_dir": str(tmp_path)})
    stream = ShardStream(tiny_shards, "train", 2, cfg.model.cutoff, transform=make_transform(cfg, 0))
    good = list(stream)[:3]
    poisoned = good[1].clone()
    poisoned.pos[0, 0] = float("nan")
    torch.manual_seed(0)
    engine = build_engine(cfg, build_model(cfg.model.name, cfg.model.params))
    batches = LockstepBatches(ListStream([good[0], poisoned, good[2]]))
    state = ckpt.TrainState()
    losses = [train_step(engine, cfg, batches, state) for _ in range(2)]
    assert state.skipped_nonfinite == 1 and batches.position() == (0, 3)
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())
    batches.next()  # the list is exhausted: the next epoch starts over
    assert batches.position() == (1, 1) and batches.stream.epochs == [0, 1]
