"""The study's finetunes: one job per setting × model × variant × budget × seed (× pretraining seed), each
with two read-outs, and the per-stage wall and CPU time.

Read-out 1, the fixed budget: `finetune.steps` steps for every variant (RUN/results.json).
Read-out 2, at convergence (when `finetune.converge_steps` > 0): the same finetune again in RUN/converged/
with early stopping on the validation force RMSE (`finetune.patience` validations without a new best, then
`finetune.anneal_steps` of LR annealing; finetune.adapt.EarlyStopping) and at most `converge_steps` steps; its
test figures, steps and stop reason are merged into RUN/results.json under "converged". A run is finished when
both read-outs are in results.json; an interrupted study finishes only what is missing (a finished read-out is
never redone, unless `reread_converged` asks to read out again at convergence the runs whose read-out ran under
another stopping rule: the old one is kept as RUN/converged.previousK).
A stop signal (SIGTERM, SIGUSR1: SLURM preemption, `kill`) checkpoints the running finetunes, starts no other,
and exits naming them; the same command resumes them.
"""
from __future__ import annotations

import fnmatch
import json
import multiprocessing
import os
import resource
import signal
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from data_shards.config_io import from_dict
from maskpot.study.config import ABLATION_MARK, FinetuneStageConfig, StudyConfig
from maskpot.study.stopping_rule import STOPPING_RULE, changes_readout

RESULTS = "results.json"
CONVERGED = "converged"      # sub-folder and results.json key of the at-convergence read-out
CONVERGED_KEYS = ("test", "best_step", "best_val", "steps", "max_steps", "stopped_early", "stopped_at_step",
                  "early_stop_step", "anneal_steps", "train_seconds", "history")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)   # finetune's preemption signals (pretrain.checkpoint.PREEMPT_SIGNALS)
# The stop signal this process received outside a finetune's training loop (which has its own flag), or that
# stopped one: the study parent, or a pool worker, starts no further finetune once it is set.
_stopped_by: list[str] = []
NOT_STARTED = "not started"


@dataclass(frozen=True)
class FinetuneJob:
    setting: str
    model: str
    variant: str
    budget: int
    seed: int
    config: dict                        # a FinetuneConfig mapping (the fixed-budget read-out)
    run_dir: str
    converge_steps: int = 0             # 0: no at-convergence read-out
    patience: int = 10
    patience_min_steps: int = 0
    anneal_steps: int = 0

    @property
    def name(self) -> str:
        return f"{self.setting}/{Path(self.run_dir).name}"

    def converged_config(self) -> dict:
        c = json.loads(json.dumps(self.config))
        c["train"].update(max_steps=self.converge_steps, early_stopping_patience=self.patience,
                          early_stopping_min_steps=self.patience_min_steps,
                          early_stopping_anneal_steps=self.anneal_steps,
                          out_dir=str(Path(self.run_dir) / CONVERGED))
        c["tracking"]["run_name"] += f"/{CONVERGED}"
        c["tracking"]["tags"]["study.readout"] = CONVERGED
        return c

    def finished(self) -> bool:
        path = Path(self.run_dir) / RESULTS
        if not path.is_file():
            return False
        return not self.converge_steps or CONVERGED in json.loads(path.read_text())

    def converged_rule_changes(self) -> dict[str, tuple]:
        """{train key: (old, now)} for each STOPPING_RULE key the finished at-convergence read-out ran with
        another value of (its RUN/converged/config.yaml) that could change it; {"RUN/converged/": ...} when
        results.json holds the read-out but its folder is gone (set aside by a re-read interrupted before it
        dropped the entry); else {}."""
        results = Path(self.run_dir) / RESULTS
        readout = json.loads(results.read_text()).get(CONVERGED) if self.converge_steps and results.is_file() else None
        if readout is None:
            return {}
        saved = Path(self.run_dir) / CONVERGED / "config.yaml"
        if not saved.parent.is_dir():
            return {f"RUN/{CONVERGED}/": ("present", "missing")}
        if not saved.is_file():
            return {}
        stopped_early = readout.get("stopped_early")
        old, now = (yaml.safe_load(saved.read_text()) or {}).get("train", {}), self.converged_config()["train"]
        return {k: (old.get(k, 0), now.get(k, 0)) for k in STOPPING_RULE
                if changes_readout(k, old.get(k, 0), now.get(k, 0), bool(stopped_early))}

    def set_converged_aside(self) -> Path | None:
        """Move the at-convergence read-out to RUN/converged.previousK (the first free K; None when an
        interrupted re-read moved it already) and drop it from RUN/results.json, so the job's next run reads it
        out again; the fixed-budget read-out stays."""
        run_dir = Path(self.run_dir)
        kept = None
        if (run_dir / CONVERGED).exists():
            k = 1
            while (run_dir / f"{CONVERGED}.previous{k}").exists():
                k += 1
            kept = run_dir / f"{CONVERGED}.previous{k}"
            (run_dir / CONVERGED).rename(kept)   # first: results.json still holds the read-out if we stop here
        results = json.loads((run_dir / RESULTS).read_text())
        results.pop(CONVERGED, None)
        _write_json(run_dir / RESULTS, results)
        return kept


def pretraining_run_id(init: Path | None) -> str | None:
    """The MLflow run of the pretraining that wrote the export `init` (its lineage), to nest finetunes under."""
    if init is None or not (Path(init) / "model.json").is_file():
        return None
    return (json.loads((Path(init) / "model.json").read_text()).get("lineage") or {}).get("mlflow_run_id")


def run_name(model: str, variant: str, budget: int, seed: int, pretrain_seed: int | None = None) -> str:
    """MODEL_VARIANT_nBUDGET_sSEED, with pPSEED appended for a pretraining seed other than the study's."""
    return f"{model}_{variant}_n{budget}_s{seed}" + (f"p{pretrain_seed}" if pretrain_seed is not None else "")


def pretrain_seed_tag(pretrain_seed: int | None, own_seed: int) -> int | None:
    """The pretraining seed a run's name carries (`pretrain_seed` of run_name): none for the stage's own seed."""
    return None if pretrain_seed in (None, own_seed) else pretrain_seed


def finetune_config(cfg: StudyConfig, out: Path, setting: str, manifest_dir: Path, model: str, params: dict,
                    variant: str, budget: int, seed: int, init: Path | None,
                    stage: FinetuneStageConfig | None = None, pretrain_seed: int | None = None) -> FinetuneJob:
    """`stage` (default: the study's finetune section) is the finetune budget; a pretrained water variant
    replays the corpus with its own pretext objective when the stage has a `replay` section."""
    f = stage or cfg.finetune
    name = run_name(model, variant, budget, seed, pretrain_seed)
    run_dir = out / "finetune" / setting / name
    tags = {"study.scale": cfg.scale, "study.setting": setting, "study.model": model, "study.variant": variant,
            "study.budget": budget, "study.seed": seed, "study.readout": "budget",
            "study.pretrain_seed": cfg.pretrain.seed if pretrain_seed is None else pretrain_seed}
    if ABLATION_MARK in variant:
        tags["study.ablation"] = variant.split(ABLATION_MARK, 1)[1]
    replay = ({"replay": {"manifest_dir": str(out / "shards" / "corpus"), **f.replay}}
              if init and f.replay and setting != "ethanol" else {})
    config = {
        "data": {"manifest_dir": str(manifest_dir), "train_frames": budget, "batch_size": f.batch_size,
                 "shuffle_buffer": 256},
        "model": {"name": model, "params": params},
        "init": str(init) if init else None,
        **({"adapt": dict(f.adapt)} if init and f.adapt else {}),
        **replay,
        "optim": {"lr": f.lr, "warmup_steps": f.warmup_steps, "min_lr": f.min_lr},
        "loss": {"energy_weight": f.energy_weight, "force_weight": f.force_weight,
                 **({"energy_normalisation": f.energy_normalisation} if f.energy_normalisation else {})},
        "train": {"max_steps": f.steps, "val_every": f.val_every, "log_every": max(f.val_every // 2, 1),
                  "val_batches": f.val_batches, "seed": seed, "out_dir": str(run_dir), "device": "cpu"},
        "tracking": {"uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": cfg.experiment,
                     "run_name": f"{setting}/{name}", "tags": tags, "parent_run_id": pretraining_run_id(init)},
    }
    return FinetuneJob(setting, model, variant, budget, seed, config, str(run_dir), f.converge_steps, f.patience,
                       f.patience_min_steps, f.anneal_steps)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


class FinetuneInterrupted(Exception):
    """A finetune stopped by a signal before the end of its read-out (it left a checkpoint)."""


def _finetune_worker(job: FinetuneJob, threads: int) -> dict:
    if _stopped_by:   # a stop signal came before this job started: leave it to the rerun
        return {"not_started": _stopped_by[0]}
    import torch  # startup: torch (+7 s) off the maskpot CLI start; the parent never needs it to plan or report

    from finetune.config import FinetuneConfig  # startup: imports torch (+7 s); kept off the maskpot CLI start
    from finetune.loop import run_finetune  # startup: imports torch (+7 s); kept off the maskpot CLI start

    torch.set_num_threads(threads)
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir.parent / f"{run_dir.name}.yaml").write_text(yaml.safe_dump(job.config, sort_keys=False))
    t0 = time.perf_counter()

    def finetune(config: dict) -> dict:
        config = {**config, "train": {"threads": threads, **config.get("train", {})}}   # the pool's share
        results = run_finetune(from_dict(FinetuneConfig, config), pending_stop=_pending_stop)
        if "preempted" in results:   # SIGTERM/SIGUSR1: a checkpoint to resume from, not a read-out to record
            _stopped_by.append(results["preempted"])
            raise FinetuneInterrupted(f"{job.name}: stopped by {results['preempted']} at step {results.get('step')}, "
                                      f"checkpoint in {results.get('checkpoint')}")
        return results

    path = run_dir / RESULTS
    try:
        results = json.loads(path.read_text()) if path.is_file() else finetune(job.config)
        if job.converge_steps and CONVERGED not in results:
            if _stopped_by:
                raise FinetuneInterrupted(f"{job.name}: stopped by {_stopped_by[0]} before its at-convergence read-out")
            done = run_dir / CONVERGED / RESULTS      # finished before an interruption, not yet merged
            conv = json.loads(done.read_text()) if done.is_file() else finetune(job.converged_config())
            results = {**json.loads(path.read_text()), CONVERGED: {k: conv.get(k) for k in CONVERGED_KEYS}}
            _write_json(path, results)
    except FinetuneInterrupted as stop:
        return {"name": job.name, "seconds": time.perf_counter() - t0, "interrupted": str(stop)}
    return {"name": job.name, "seconds": time.perf_counter() - t0, "test": results.get("test"),
            "converged": (results.get(CONVERGED) or {}).get("test")}


def wanted(cfg: StudyConfig, name: str) -> bool:
    """Whether `cfg.only` (shell globs on SETTING/RUN) selects the finetune `name`; every one when it is empty."""
    return not cfg.only or any(fnmatch.fnmatchcase(name, p) for p in cfg.only)


def selected(cfg: StudyConfig, jobs: list[FinetuneJob]) -> list[FinetuneJob]:
    """The jobs that `cfg.only` selects."""
    return [j for j in jobs if wanted(cfg, j.name)]


def _stopping_rule_changes(jobs: list[FinetuneJob]) -> dict[str, str]:
    """{name: "key old → now, ..."} for each finished job whose at-convergence read-out ran under another
    stopping rule than the job's."""
    changes = {j.name: j.converged_rule_changes() for j in jobs}
    return {name: ", ".join(f"{k} {old} → {now}" for k, (old, now) in diff.items())
            for name, diff in changes.items() if diff}


def run_finetunes(cfg: StudyConfig, jobs: list[FinetuneJob], what: str = "finetuning") -> None:
    chosen = selected(cfg, jobs)
    changed = _stopping_rule_changes(chosen)
    reread = [j for j in chosen if j.name in changed] if cfg.reread_converged else []
    todo = [j for j in chosen if not j.finished() or j in reread]
    skipped = f" ({len(jobs) - len(chosen)} not selected by `only`)" if len(chosen) < len(jobs) else ""
    banner(f"{what}: {len(chosen) - len(todo)} of {len(chosen)} runs already finished{skipped}, {len(todo)} to go, "
           f"{cfg.finetune.jobs} at a time")
    for job in reread:   # a finished fixed-budget read-out is reused; only the at-convergence one runs again
        kept = job.set_converged_aside()
        print(f"  {job.name}: read out again at convergence ({changed[job.name]}); the old read-out is "
              f"{kept or 'in a converged.previous folder already'}", flush=True)
    if changed and not reread:
        name = next(iter(changed))
        print(f"  {len(changed)} finished run(s) were read out at convergence under another stopping rule, e.g. "
              f"{name} ({changed[name]}); kept as they are: --reread-converged reads them out again", flush=True)
    if not todo:
        return
    _prepare_tracking(cfg, todo[0])
    threads = max(1, (os.cpu_count() or 1) // cfg.finetune.jobs)
    env_before = os.environ.get("TQDM_DISABLE")
    if cfg.finetune.jobs > 1:
        os.environ["TQDM_DISABLE"] = "1"  # interleaved bars from parallel runs are unreadable; one line per run
    _stopped_by.clear()
    stopped: list[str] = []   # what stopped each interrupted run, or "not started"
    try:
        if cfg.finetune.jobs == 1:
            with _stop_signals(_note_stop):
                for i, job in enumerate(todo, 1):
                    stopped += _report(i, len(todo), _finetune_worker(job, threads))
        else:
            stopped = _run_pool(cfg.finetune.jobs, todo, threads)
    finally:
        if env_before is None:
            os.environ.pop("TQDM_DISABLE", None)
    if stopped:   # never recorded as read-outs: the same command resumes them from their checkpoints
        interrupted = [s for s in stopped if s != NOT_STARTED]
        waiting = f", {len(stopped) - len(interrupted)} not started" if len(interrupted) < len(stopped) else ""
        raise SystemExit(f"study: {len(interrupted)} finetune(s) interrupted ({'; '.join(interrupted)}){waiting}; "
                         f"rerun the same command to resume them")


def _run_pool(jobs: int, todo: list[FinetuneJob], threads: int) -> list[str]:
    """`jobs` finetunes at a time in spawned workers. A stop signal to this process (or to its process group)
    reaches every worker: each running finetune checkpoints and returns, queued ones are not started, and this
    process waits for them all, so no worker outlives it."""
    futures: list[Future] = []

    def forward(signum, frame) -> None:
        _note_stop(signum, frame)
        for f in futures:
            f.cancel()   # only the ones no worker has taken yet
        for child in multiprocessing.active_children():   # the pool's workers (their own children are theirs)
            if child.pid is not None:
                os.kill(child.pid, signum)

    stopped: list[str] = []
    with _stop_signals(forward), ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                     initializer=_stop_signals_noted) as pool:
        futures += [pool.submit(_finetune_worker, job, threads) for job in todo]
        for i, fut in enumerate(as_completed(futures), 1):
            result = {"not_started": _stopped_by[0]} if fut.cancelled() else fut.result()
            stopped += _report(i, len(todo), result)
    return stopped


def _note_stop(signum, frame) -> None:
    _stopped_by.append(signal.Signals(signum).name)


@contextmanager
def _stop_signals(handler):
    """`handler` for the stop signals while the block runs (a finetune's training loop installs its own flag
    and restores this one after); the previous handlers come back after."""
    saved = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, previous in saved.items():
            signal.signal(s, previous)


def _pending_stop() -> str | None:
    """The stop signal noted before a finetune's training loop installed its own flag (during its setup)."""
    return _stopped_by[0] if _stopped_by else None


def _stop_signals_noted() -> None:
    """Pool worker initializer: a stop signal between two finetunes is noted, so the worker starts no other."""
    for s in STOP_SIGNALS:
        signal.signal(s, _note_stop)


def banner(text: str) -> None:
    """Print a stage heading of the study's log (`=== study: TEXT`), flushed so it shows in a redirected log."""
    print(f"\n=== study: {text}", flush=True)


def _figures(test: dict | None) -> str:
    if not test:
        return "no test split"
    return (f"test F {test.get('force_rmse_mev_per_a', float('nan')):.1f} meV/Å, "
            f"E {test.get('energy_rmse_mev_per_atom', float('nan')):.2f} meV/atom")


def _report(i: int, n: int, result: dict) -> list[str]:
    """Print one finished (or interrupted) finetune; returns [what stopped it] for an interrupted one."""
    if result.get("not_started"):
        return [NOT_STARTED]
    if result.get("interrupted"):
        print(f"[{i}/{n}] interrupted: {result['interrupted']} ({result['seconds']:.0f} s)", flush=True)
        return [result["interrupted"]]
    conv = f"; at convergence {_figures(result['converged'])}" if result.get("converged") else ""
    print(f"[{i}/{n}] {result['name']}: {_figures(result.get('test'))}{conv} ({result['seconds']:.0f} s)",
          flush=True)
    return []


def _prepare_tracking(cfg: StudyConfig, job: FinetuneJob) -> None:
    """Create the sqlite store and the experiment once, before parallel runs race to migrate the schema."""
    tracking = job.config["tracking"]
    if not tracking.get("enabled", True) or not str(tracking.get("uri")).startswith("sqlite:"):
        return
    from mlflow import MlflowClient  # startup: mlflow (+12 s over torch) only when tracking is on

    from finetune.tracking import ARTIFACTS_DIR  # startup: imports torch (+7 s); kept off the maskpot CLI start

    uri = tracking["uri"]
    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(cfg.experiment) is None:
        artifacts = Path(uri.removeprefix("sqlite:///")).parent / ARTIFACTS_DIR
        client.create_experiment(cfg.experiment, artifact_location=artifacts.resolve().as_uri())


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Timings:
    """Wall and CPU seconds per stage, accumulated over resumed invocations, in timings.json as
    {stage: {"wall_s", "cpu_s"}}. CPU time is this process's and that of the child processes it waited for
    (torchrun ranks, finetune workers); Ray's worker processes (corpus generation, sharding) are not counted."""

    def __init__(self, path: Path):
        self.path = path
        self.data = self._read()

    def _read(self) -> dict[str, dict[str, float]]:
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        return {k: v if isinstance(v, dict) else {"wall_s": v, "cpu_s": 0.0} for k, v in data.items()}

    def stage(self, name: str, fn):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        result = fn()
        # re-read: another study process on the same folder may have recorded its stages meanwhile
        self.data = self._read()
        old = self.data.get(name, {"wall_s": 0.0, "cpu_s": 0.0})
        self.data[name] = {"wall_s": old["wall_s"] + time.perf_counter() - t0,
                           "cpu_s": old["cpu_s"] + _cpu_seconds() - c0}
        _write_json(self.path, self.data)
        return result
