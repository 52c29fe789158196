"""`maskpot finetune` survives preemption: SIGUSR1 (or a crash after a periodic checkpoint) and `--resume auto`
give the same loss trajectory, best model, test figures and export as an uninterrupted run, in the same
MLflow run; a finished run that is started again does not train again."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune.loop as loop
import finetune.training as training
from data_shards.config_io import load_config
from finetune.config import FinetuneConfig
from finetune.resume import CHECKPOINT_DIR
from tests.helpers.paths import FINETUNE_TINY as TINY

STEPS = 12


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """run_finetune installs SIGUSR1/SIGTERM handlers in this process: put pytest's back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    torch.set_num_threads(threads)


def config(shards: Path, out_dir: Path, **train) -> FinetuneConfig:
    return load_config(FinetuneConfig, TINY, {
        "data": {"manifest_dir": str(shards)},
        "optim": {"ema_decay": 0.9},
        "train": {"out_dir": str(out_dir), "max_steps": STEPS, "val_every": 3, "log_every": 1,
                  "early_stopping_patience": 10, **train},
        "tracking": {"enabled": True}})


def interrupt_at(monkeypatch, call: int, action) -> None:
    """Run `action` during the `call`-th training loss of the next run (then stop interfering)."""
    real, calls = training.energy_force_loss, []

    def counting(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            monkeypatch.setattr(training, "energy_force_loss", real)
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "energy_force_loss", counting)


def mlflow_view(out_dir: Path) -> tuple[list, dict[int, float]]:
    """(runs in the run folder's store, latest train/loss per step of its one run)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = sorted(client.get_metric_history(runs[0].info.run_id, "train/loss"), key=lambda m: m.timestamp)
    return runs, {m.step: m.value for m in history}


def same_outcome(full: dict, resumed: dict, full_dir: Path, resumed_dir: Path) -> None:
    assert resumed["best_step"] == full["best_step"]
    assert resumed["best_val"] == full["best_val"] and resumed["test"] == full["test"]
    assert resumed["history"] == full["history"] and resumed["final_train_loss"] == full["final_train_loss"]
    a, b = (load_file(str(d / "export" / "model.safetensors")) for d in (full_dir, resumed_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (full_run,), full_losses = mlflow_view(full_dir)
    runs, losses = mlflow_view(resumed_dir)
    assert len(runs) == 1 and runs[0].info.run_id == resumed["tracking"]["run_id"]  # one run, continued
    assert runs[0].info.status == "FINISHED"
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses == full_losses   # bit-identical
    assert not (resumed_dir / CHECKPOINT_DIR).exists()


@pytest.mark.slow
def test_sigusr1_checkpoints_and_resume_is_exact(water_shards, tmp_path, monkeypatch):
    full = loop.run_finetune(config(water_shards, tmp_path / "full"))
    out = tmp_path / "split"
    interrupt_at(monkeypatch, 5, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    stopped = loop.run_finetune(config(water_shards, out))
    assert stopped["preempted"] == "SIGUSR1" and stopped["step"] == 5
    files = sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir())
    assert files == ["state.json", "tensors.safetensors"]   # nothing pickled
    state = json.loads((out / CHECKPOINT_DIR / "state.json").read_text())
    assert state["step"] == 5 and not (out / "results.json").exists()
    run_id = state["tracking"]["run_id"]

    resumed = loop.run_finetune(config(water_shards, out))
    assert resumed["tracking"]["run_id"] == run_id
    same_outcome(full, resumed, tmp_path / "full", out)
    # requeued once more after it finished: nothing is trained again, no new MLflow run
    again = loop.run_finetune(config(water_shards, out))
    assert again["tracking"]["run_id"] == run_id and len(mlflow_view(out)[0]) == 1


@pytest.mark.slow
def test_a_crash_resumes_from_the_last_periodic_checkpoint(water_shards, tmp_path, monkeypatch):
    full = loop.run_finetune(config(water_shards, tmp_path / "full", checkpoint_every=4))
    out = tmp_path / "crash"

    def crash():
        raise RuntimeError("node lost")

    interrupt_at(monkeypatch, 7, crash)
    with pytest.raises(RuntimeError, match="node lost"):
        loop.run_finetune(config(water_shards, out, checkpoint_every=4))
    assert json.loads((out / CHECKPOINT_DIR / "state.json").read_text())["step"] == 4
    resumed = loop.run_finetune(config(water_shards, out, checkpoint_every=4))
    same_outcome(full, resumed, tmp_path / "full", out)   # steps 5-6 ran twice; their latest values agree


def test_a_checkpoint_of_another_config_is_refused(water_shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    interrupt_at(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    assert loop.run_finetune(config(water_shards, out, max_steps=4))["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is before   # the caller's handlers are back once the loop ends
    with pytest.raises(ValueError, match="refusing to resume from .*another finetune config.*--resume never"):
        loop.run_finetune(config(water_shards, out, max_steps=4, val_every=2))
    fresh = loop.run_finetune(config(water_shards, out, max_steps=4, val_every=2), resume="never")
    assert fresh["steps"] == 4


def test_a_signal_during_setup_stops_after_the_first_step(water_shards, tmp_path, monkeypatch):
    """A caller that catches the stop signals itself (the study's pool worker) and got one while the run was
    still being set up hands it over with `pending_stop`: the loop checkpoints after step 1 instead of
    training to the end."""
    caught: list[str] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signal.Signals(signum).name))
    real = loop.check_cutoff_fits_data

    def signalled_during_setup(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "check_cutoff_fits_data", signalled_during_setup)
    out = tmp_path / "run"
    stopped = loop.run_finetune(config(water_shards, out), pending_stop=lambda: caught[0] if caught else None)
    assert caught == ["SIGTERM"] and stopped["preempted"] == "SIGTERM" and stopped["step"] == 1
    assert json.loads((out / CHECKPOINT_DIR / "state.json").read_text())["step"] == 1


@pytest.mark.slow
def test_a_run_stopped_inside_its_annealing_tail_resumes_the_tail(water_shards, tmp_path, monkeypatch):
    """Early stopping fires at step 3 (lr 1e-12 moves no weight: no validation beats step 0's) and starts a
    6-step annealing tail; SIGUSR1 at step 5 and a resume give the same LR at every step and the same end (9)
    as the run that was never stopped. A resume that forgot where the tail began would keep the constant LR
    and train to max_steps."""
    def tail_config(out_dir: Path) -> FinetuneConfig:
        return load_config(FinetuneConfig, TINY, {
            "data": {"manifest_dir": str(water_shards)},
            "optim": {"lr": 1e-12, "min_lr": 0.0, "schedule": "constant", "warmup_steps": 0},
            "train": {"out_dir": str(out_dir), "max_steps": STEPS, "val_every": 3, "log_every": 1,
                      "early_stopping_patience": 1, "early_stopping_anneal_steps": 6},
            "tracking": {"enabled": True}})

    def lr_per_step(out_dir: Path) -> dict[int, float]:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{out_dir / 'mlflow.db'}")
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        return {m.step: m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/lr"),
                                                key=lambda m: m.timestamp)}

    full = loop.run_finetune(tail_config(tmp_path / "full"))
    assert (full["early_stop_step"], full["steps"], full["anneal_steps"]) == (3, 9, 6)
    out = tmp_path / "split"
    interrupt_at(monkeypatch, 5, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    assert loop.run_finetune(tail_config(out))["step"] == 5
    assert json.loads((out / CHECKPOINT_DIR / "state.json").read_text())["early_stopping_fired_at"] == 3
    resumed = loop.run_finetune(tail_config(out))
    assert (resumed["early_stop_step"], resumed["steps"], resumed["stopped_early"]) == (3, 9, True)
    assert resumed["history"] == full["history"]
    full_lrs, resumed_lrs = lr_per_step(tmp_path / "full"), lr_per_step(out)
    assert sorted(full_lrs) == list(range(1, 10)) and resumed_lrs == full_lrs
    # train/lr is the LR a step used: step 4's was set before step 3's validation fired the criterion
    assert full_lrs[3] == full_lrs[4] == 1e-12 > full_lrs[5] > full_lrs[7] > full_lrs[9] > 0.0
