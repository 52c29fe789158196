"""Production pretraining features: preemption signals, best checkpoint, corrupt-tag fallback, weight EMA,
the hmask and supervised objectives. Fast tests use one rank in-process; the preemption test is 2-rank."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from data_shards.config_io import ConfigError
from pretrain.config import LATER_KEY_DEFAULTS, resume_relevant
from tests.helpers.paths import PRETRAIN_TINY as TINY
from tests.helpers.pretraining import ListStream, cfg_with, run_pretrain, tiny_engine, train_losses, train_tiny


def fake_manifest(tmp_path: Path, labelled: bool = True) -> Path:
    manifest_dir = tmp_path / "shards"
    manifest_dir.mkdir(exist_ok=True)
    (manifest_dir / "manifest.json").write_text(json.dumps({"schema_version": 1, "labelled": labelled}))
    return manifest_dir


# --- config ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sections, expected", [
    ({"optim": {"ema_decay": 1.0}}, ["ema_decay", "(0, 1)", "null"]),
    ({"optim": {"ema_decay": 0.0}}, ["ema_decay"]),
    ({"objective": {"kind": "jigsaw"}}, ["jigsaw", "hmask", "supervised"]),
    ({"objective": {"h_mask_p": 1.5}}, ["h_mask_p", "(0, 1]"]),
    ({"objective": {"energy_weight": 0.0, "force_weight": 0.0}}, ["energy_weight", "force_weight"]),
])
def test_new_config_keys_are_validated(sections, expected):
    with pytest.raises(ConfigError) as err:
        cfg_with(**sections)
    for text in expected:
        assert text in str(err.value)


def test_later_keys_at_their_defaults_stay_out_of_the_resume_hash():
    plain = resume_relevant(cfg_with())
    assert not set(LATER_KEY_DEFAULTS) & set(plain)  # checkpoints written before these keys still resume
    assert resume_relevant(cfg_with(optim={"ema_decay": 0.99}))["optim.ema_decay"] == 0.99
    assert resume_relevant(cfg_with(objective={"kind": "hmask", "h_mask_p": 0.3}))["objective.h_mask_p"] == 0.3


def test_objective_kinds_build_their_transform_and_supervised_needs_labels(tmp_path):
    from pretrain.loop import check_objective_fits_data, make_transform
    from pretrain.transforms import HydrogenMasking

    cfg = cfg_with(objective={"kind": "hmask", "h_mask_p": 0.25, "h_mask_radius": 3.0})
    transform = make_transform(cfg, 7)
    assert isinstance(transform, HydrogenMasking)
    assert (transform.p, transform.radius, transform.seed) == (0.25, 3.0, 7)
    supervised = cfg_with(objective={"kind": "supervised"}, data={"manifest_dir": str(fake_manifest(tmp_path))})
    assert make_transform(supervised, 0) is None  # labels must reach the loss untouched
    check_objective_fits_data(supervised, {"labelled": True})
    with pytest.raises(ValueError, match=r"labelled: false.*'mask'.*'hmask'"):
        check_objective_fits_data(supervised, {"labelled": False})
    check_objective_fits_data(cfg, {"labelled": False})  # self-supervised kinds need no labels
    carbon_only = {"labelled": True, "elements": {"6": 10}}
    with pytest.raises(ValueError, match=r"'hmask' deletes H atoms.*no H \(elements \[6\]\).*'denoise'"):
        check_objective_fits_data(cfg, carbon_only)
    water = cfg_with(objective={"kind": "mask"})
    check_objective_fits_data(water, {"elements": {"1": 8, "8": 4}})
    with pytest.raises(ValueError, match=r"water masking .* also holds elements \[6\]; use 'hmask'"):
        check_objective_fits_data(water, {"elements": {"1": 8, "6": 2, "8": 4}})
    check_objective_fits_data(cfg_with(objective={"kind": "denoise"}), carbon_only)


def test_supervised_and_hmask_steps_train_on_real_batches(one_rank, tiny_shards, tmp_path):
    from data_shards import keys as K
    from data_shards.stream import ShardStream
    from pretrain import checkpoint as ckpt
    from pretrain.engine import build_engine
    from pretrain.loop import LockstepBatches, make_transform, pretext_loss, train_step
    from pretrain.models import build_model
    from pretrain.objectives import energy_force_loss

    for kind in ("supervised", "hmask"):
        cfg = cfg_with(objective={"kind": kind}, data={"manifest_dir": str(tiny_shards)},
                       train={"out_dir": str(tmp_path)})
        batches = list(ShardStream(tiny_shards, "train", 2, cfg.model.cutoff, transform=make_transform(cfg, 0)))[:3]
        torch.manual_seed(0)
        model = build_model(cfg.model.name, cfg.model.params)
        model.set_normalisation(0.5, {1: -13.0, 8: -440.0})
        engine = build_engine(cfg, model)
        if kind == "supervised":
            assert K.ENERGY in batches[0] and K.MASK_FLAG not in batches[0]
            out = engine(batches[0], compute_forces=True)
            expected = energy_force_loss(out[K.PRED_ENERGY], batches[0][K.ENERGY], out[K.PRED_FORCES].float(),
                                         batches[0][K.FORCES], batches[0][K.NATOMS], energy_scale=0.5)
            assert pretext_loss(cfg, engine, batches[0]).item() == pytest.approx(expected.item(), rel=1e-6)
        else:
            assert batches[0][K.MASK_FLAG].sum() > 0 and K.ENERGY not in batches[0]
        before = [p.detach().clone() for p in engine.module.parameters()]
        state = ckpt.TrainState()
        losses = [train_step(engine, cfg, LockstepBatches(ListStream(batches)), state) for _ in range(2)]
        assert all(math.isfinite(v) and v > 0 for v in losses), kind
        assert any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters())), kind


# --- checkpoints: best kept, corrupt newest falls back ------------------------------------------

def _checkpointed_run(tmp_path, steps, best_at=(), ema=None, keep_last=2):
    from pretrain import checkpoint as ckpt

    manifest_dir = fake_manifest(tmp_path)
    cfg = cfg_with(train={"out_dir": str(tmp_path / "run"), "max_steps": 20}, data={"manifest_dir": str(manifest_dir)})
    mhash = ckpt.manifest_sha256(manifest_dir)
    engine = tiny_engine(cfg, tmp_path / "run")
    state, weights = ckpt.TrainState(), {}
    for step in steps:
        train_tiny(engine, 1, seed=step)
        if ema is not None:
            ema.update(engine)
        state.step = step
        if step in best_at:
            state.best_val, state.best_step = 1.0 / step, step
        ckpt.save_checkpoint(engine, cfg.train.out_dir, state, cfg, mhash, keep_last, best=step in best_at, ema=ema)
        weights[step] = engine.module.lin.weight.detach().clone()
    return cfg, mhash, engine, weights


def test_best_checkpoint_is_never_pruned(one_rank, tmp_path):
    from pretrain import checkpoint as ckpt

    cfg, _, _, _ = _checkpointed_run(tmp_path, steps=(1, 2, 3, 4, 5), best_at=(2,))
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert ckpt.complete_tags(ckpt_dir) == ["step00000002", "step00000004", "step00000005"]
    best = json.loads((ckpt_dir / ckpt.BEST_FILE).read_text())
    assert best["tag"] == "step00000002" and best["step"] == 2 and best["val_loss"] == 0.5
    assert ckpt.resolve_resume("auto", cfg.train.out_dir)[1] == "step00000005"  # resume takes the newest


def test_truncated_newest_checkpoint_falls_back_to_the_previous(one_rank, tmp_path, caplog):
    from pretrain import checkpoint as ckpt

    cfg, mhash, _, weights = _checkpointed_run(tmp_path, steps=(1, 2, 3), keep_last=3)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    damaged = next((ckpt_dir / "step00000003").glob("*model_states.pt"))
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert "truncated" in ckpt.tag_problem(ckpt_dir, "step00000003")
    assert ckpt.tag_problem(ckpt_dir, "step00000002") is None

    resumed = tiny_engine(cfg, None)
    with caplog.at_level(logging.ERROR, logger="pretrain"):
        tag, state = ckpt.load_newest_loadable(resumed, *ckpt.resume_candidates("auto", cfg.train.out_dir), cfg, mhash)
    assert (tag, state.step) == ("step00000002", 2)
    assert "step00000003" in caplog.text and damaged.name in caplog.text
    assert torch.equal(resumed.module.lin.weight, weights[2])

    # a file that keeps its size but is garbage is caught by the loader itself
    for tag in ("step00000001", "step00000002"):
        f = next((ckpt_dir / tag).glob("*model_states.pt"))
        f.write_bytes(b"\0" * f.stat().st_size)
    with pytest.raises(ckpt.CorruptCheckpoint, match="--resume never"):
        ckpt.load_newest_loadable(resumed, *ckpt.resume_candidates("auto", cfg.train.out_dir), cfg, mhash)


def test_weight_ema_averages_swaps_and_resumes(one_rank, tmp_path):
    from pretrain import checkpoint as ckpt
    from pretrain.engine import WeightEMA

    manifest_dir = fake_manifest(tmp_path)
    cfg = cfg_with(train={"out_dir": str(tmp_path / "run")}, data={"manifest_dir": str(manifest_dir)},
                   optim={"ema_decay": 0.5})
    engine = tiny_engine(cfg, tmp_path / "run")
    ema = WeightEMA(engine, 0.5)
    w0 = engine.module.lin.weight.detach().clone()
    train_tiny(engine, 1)
    ema.update(engine)
    w1 = engine.module.lin.weight.detach().clone()
    assert not torch.equal(w0, w1)
    assert torch.allclose(ema.shadow["lin.weight"], 0.5 * w0 + 0.5 * w1)
    with ema.swapped_in(engine):
        assert torch.allclose(engine.module.lin.weight, 0.5 * w0 + 0.5 * w1)
    assert torch.equal(engine.module.lin.weight, w1)  # training weights restored exactly
    assert torch.equal(ema.state_dict(engine)["lin.weight"], ema.shadow["lin.weight"])

    state = ckpt.TrainState(step=1)
    ckpt.save_checkpoint(engine, cfg.train.out_dir, state, cfg, ckpt.manifest_sha256(manifest_dir), 2, ema=ema)
    assert (tmp_path / "run" / "checkpoints" / "step00000001" / ckpt.EMA_FILE).is_file()
    resumed = tiny_engine(cfg, None)
    resumed_ema = WeightEMA(resumed, 0.5)
    ckpt.load_checkpoint(resumed, tmp_path / "run" / "checkpoints", "step00000001", cfg,
                         ckpt.manifest_sha256(manifest_dir), ema=resumed_ema)
    assert torch.equal(resumed_ema.shadow["lin.weight"], ema.shadow["lin.weight"])


# --- preemption: 2 ranks, SIGUSR1 to one worker (slow) --------------------------------------------

def start_pretrain(shards: Path, out_dir: Path, *overrides: str, step_sleep: float) -> subprocess.Popen:
    import argparse

    from pretrain.cli import add_command, launch_command

    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers())
    args = parser.parse_args(["pretrain", "--config", str(TINY), "--nproc", "2", "--override",
                              f"data.manifest_dir={shards}", f"train.out_dir={out_dir}", "optim.decay_steps=10",
                              *overrides])
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MASKPOT_TEST_STEP_SLEEP_S=str(step_sleep))
    return subprocess.Popen(launch_command(args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for_step(out_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out_dir / "metrics.jsonl").is_file() and max(train_losses(out_dir) or [0]) >= step:
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} in {out_dir / 'metrics.jsonl'} after {timeout} s")


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_cleanly_and_resume_is_exact(tiny_shards, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert run_pretrain(tiny_shards, full, "train.max_steps=8", resume="never") == 0
    expected = train_losses(full)

    proc = start_pretrain(tiny_shards, split, "train.max_steps=8", step_sleep=1.0)
    wait_for_step(split, 2, proc)
    worker = int((split / "rank1.pid").read_text())  # torchrun does not forward SIGUSR1: signal one worker
    os.kill(worker, signal.SIGUSR1)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    records = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    stop = [r for r in records if r.get("preempted")]
    assert len(stop) == 1 and stop[0]["signal"] == signal.SIGUSR1  # rank 0 stopped too: the ranks agreed
    at = stop[0]["step"]
    assert 2 <= at < 8 and max(train_losses(split)) == at
    assert f"preempted at step {at}, checkpoint written" in output
    assert (split / "checkpoints" / f"step{at:08d}" / "state.json").is_file()

    assert run_pretrain(tiny_shards, split, "train.max_steps=8") == 0
    resumed = train_losses(split)
    assert sorted(resumed) == list(range(1, 9))
    assert [resumed[s] for s in range(1, 9)] == [expected[s] for s in range(1, 9)]  # bit-identical


@pytest.mark.slow
@pytest.mark.parametrize("engine_overrides", [(), ("deepspeed.zero_stage=2", "deepspeed.precision=bf16")])
def test_two_ranks_hmask_with_ema_exports_the_average(tiny_shards, tmp_path, engine_overrides):
    from pretrain.export import load_export

    out = tmp_path / "ema"
    assert run_pretrain(tiny_shards, out, "train.max_steps=4", "train.val_every=2", "optim.ema_decay=0.9",
                        "objective.kind=hmask", *engine_overrides, resume="never") == 0
    assert all(math.isfinite(v) for v in train_losses(out).values())
    _, meta = load_export(out / "export")
    assert meta["lineage"]["ema_decay"] == 0.9 and meta["lineage"]["pretrain_objective"] == "hmask"
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert (out / "checkpoints" / best["tag"] / "ema.safetensors").is_file()
    from safetensors.torch import load_file
    ema = load_file(str(out / "checkpoints" / best["tag"] / "ema.safetensors"))
    exported = load_file(str(out / "export" / "model.safetensors"))
    assert meta["lineage"]["steps"] == best["step"]  # the export and the best tag come from the same step
    assert all(torch.equal(exported[k], v) for k, v in ema.items())  # the export holds the average


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_torchrun_is_forwarded_and_checkpointed(tiny_shards, tmp_path, signum):
    out = tmp_path / "term"
    proc = start_pretrain(tiny_shards, out, "train.max_steps=8", step_sleep=1.0)
    wait_for_step(out, 2, proc)
    # TERM: what SLURM sends at walltime / scancel; USR1: `--signal=USR1@T` before the walltime.
    # `maskpot pretrain` asks torchrun to forward both to the ranks.
    proc.send_signal(signum)
    output = proc.communicate(timeout=120)[0]  # torchrun itself exits non-zero after a forwarded signal
    stop = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "preempted" in x]
    assert len(stop) == 1 and stop[0]["signal"] == signum, output[-3000:]
    at = stop[0]["step"]
    assert f"preempted at step {at}, checkpoint written" in output
    assert (out / "checkpoints" / f"step{at:08d}" / "state.json").is_file()
