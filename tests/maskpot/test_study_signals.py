"""A stop signal to a study's finetune stage (SLURM preemption, `kill`, `scancel`): with a pool of spawned
workers, the parent forwards it, waits for every running finetune's checkpoint, starts none of the queued
ones, and leaves no worker behind (it used to die at once, and its workers, once checkpointed, hung on a
queue nobody fed); the same call then resumes the interrupted runs and runs the rest."""
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from maskpot.study import finetunes
from maskpot.study.config import load_study
from maskpot.study.stages import water_jobs
from tests.helpers.paths import REPO

STUDY = REPO / "configs" / "study" / "water.yaml"


def _jobs(tmp_path: Path, water_shards: Path, jobs: int) -> tuple:
    cfg = load_study(STUDY, "tiny", {"finetune": {"jobs": jobs}, "seeds": [0, 1, 2]})
    todo = water_jobs(cfg, tmp_path, "dft_water", water_shards, ["scratch"], [8], {})
    for job in todo:
        job.config["train"]["checkpoint_every"] = 1      # a checkpoint folder: the run is inside its loop
        job.config["tracking"]["enabled"] = False
    return cfg, todo


def _signal_once_training(todo, running: int, signum: int) -> threading.Thread:
    """SIGTERM to this process once `running` runs have written their first checkpoint."""
    def watch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if sum((Path(j.run_dir) / "checkpoint").is_dir() for j in todo) >= running:
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.2)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("jobs,signum", [(2, signal.SIGTERM), (1, signal.SIGUSR1)])
def test_a_stop_signal_checkpoints_the_running_finetunes_starts_no_other_and_resumes(
        tmp_path, water_shards, monkeypatch, capfd, caplog, jobs, signum):
    monkeypatch.setenv("MASKPOT_TEST_STEP_SLEEP_S", "1")     # slow steps: the signal lands mid-run
    cfg, todo = _jobs(tmp_path, water_shards, jobs)
    from pretrain.checkpoint import PREEMPT_SIGNALS
    assert finetunes.STOP_SIGNALS == PREEMPT_SIGNALS   # the study's copy (kept off torch) is finetune's set
    handlers = [signal.getsignal(s) for s in finetunes.STOP_SIGNALS]
    watcher = _signal_once_training(todo, jobs, signum)
    with pytest.raises(SystemExit) as stop:
        finetunes.run_finetunes(cfg, todo)
    watcher.join()
    name = signal.Signals(signum).name
    assert f"{jobs} finetune(s) interrupted" in str(stop.value) and f"stopped by {name}" in str(stop.value)
    assert f"{3 - jobs} not started" in str(stop.value) and "rerun the same command" in str(stop.value)
    assert multiprocessing.active_children() == []               # no worker outlives the stage
    assert [signal.getsignal(s) for s in finetunes.STOP_SIGNALS] == handlers   # the caller's handlers are back
    started = [j for j in todo if (Path(j.run_dir) / "checkpoint").is_dir()]
    assert len(started) == jobs and not any(j.finished() for j in todo)
    assert not Path(todo[-1].run_dir).exists()                   # the queued run never began

    monkeypatch.delenv("MASKPOT_TEST_STEP_SLEEP_S")
    capfd.readouterr()
    caplog.clear()
    finetunes.run_finetunes(cfg, todo)
    assert all(j.finished() for j in todo)
    logged = capfd.readouterr().err + caplog.text   # the pool's workers log to stderr, this process to caplog
    resumed = [line for line in logged.splitlines() if "resuming from" in line]
    assert len(resumed) == jobs, resumed   # from the step its checkpoint holds, not redone from step 0
    assert all(any(f"{Path(j.run_dir) / 'checkpoint'} at step" in line for line in resumed) for j in started)
