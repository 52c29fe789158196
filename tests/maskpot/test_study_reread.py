"""`maskpot study --reread-converged`: after the at-convergence stopping rule changes (the annealing tail, a
longer cap), a finished run is read out again at convergence only when asked, only where its read-out ran
under another rule; the old read-out is kept, the fixed-budget read-out is never redone, repeating the
command re-reads nothing more, and a re-read interrupted after it moved the old read-out aside still runs."""
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from maskpot.study import finetunes
from maskpot.study.config import load_study
from maskpot.study.stages import water_jobs
from maskpot.study.stopping_rule import changes_readout
from tests.helpers.paths import REPO

STUDY = REPO / "configs" / "study" / "water.yaml"


def _job(cfg, out: Path, water_shards: Path) -> finetunes.FinetuneJob:
    (job,) = water_jobs(cfg, out, "dft_water", water_shards, ["scratch"], [8], {})
    job.config["tracking"]["enabled"] = False
    return job


def _stamps(run_dir: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


def test_reread_converged_reruns_only_stale_readouts_and_keeps_the_old_one(tmp_path, water_shards, capsys):
    cfg = load_study(STUDY, "tiny", {"seeds": [0], "finetune": {"jobs": 1}})
    job = _job(cfg, tmp_path, water_shards)
    run_dir = Path(job.run_dir)
    finetunes.run_finetunes(cfg, [job])
    first = json.loads((run_dir / "results.json").read_text())
    assert job.converged_rule_changes() == {}
    budget_files = {p: t for p, t in _stamps(run_dir).items() if p.relative_to(run_dir).parts[0] != "converged"}

    # the rule changes (a longer cap): a plain run names the stale read-out and redoes nothing
    longer = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, converge_steps=14))
    job = _job(longer, tmp_path, water_shards)
    assert job.converged_rule_changes() == {"max_steps": (12, 14)}
    before = _stamps(run_dir)
    capsys.readouterr()
    finetunes.run_finetunes(longer, [job])
    said = capsys.readouterr().out
    assert "1 of 1 runs already finished" in said and "max_steps 12 → 14" in said
    assert "--reread-converged reads them out again" in said and _stamps(run_dir) == before

    # asked: the at-convergence read-out runs again under the new rule; the old one is kept, the budget one reused
    reread = dataclasses.replace(longer, reread_converged=True)
    finetunes.run_finetunes(reread, [job])
    said = capsys.readouterr().out
    assert "0 of 1 runs already finished" in said and "read out again at convergence" in said
    now = json.loads((run_dir / "results.json").read_text())
    kept = json.loads((run_dir / "converged.previous1" / "results.json").read_text())
    assert {k: kept[k] for k in finetunes.CONVERGED_KEYS} == first["converged"]
    saved = yaml.safe_load((run_dir / "converged" / "config.yaml").read_text())
    fresh = json.loads((run_dir / "converged" / "results.json").read_text())
    assert saved["train"]["max_steps"] == 14 and fresh["max_steps"] == 14
    assert now["converged"] == {k: fresh[k] for k in finetunes.CONVERGED_KEYS}, "the new read-out is the one merged"
    assert {k: v for k, v in now.items() if k != "converged"} == {k: v for k, v in first.items() if k != "converged"}
    assert {p: t for p, t in _stamps(run_dir).items() if p in budget_files and p.name != "results.json"} == \
        {p: t for p, t in budget_files.items() if p.name != "results.json"}, "the fixed-budget read-out is reused"

    # the same command again: the rules match now, nothing runs
    before = _stamps(run_dir)
    finetunes.run_finetunes(reread, [job])
    assert "1 of 1 runs already finished" in capsys.readouterr().out and _stamps(run_dir) == before

    # a re-read stopped after it moved the read-out aside but before it dropped it from results.json
    (run_dir / "converged").rename(run_dir / "converged.previous2")
    assert job.converged_rule_changes() == {"RUN/converged/": ("present", "missing")}
    finetunes.run_finetunes(reread, [job])
    assert "in a converged.previous folder already" in capsys.readouterr().out
    assert (run_dir / "converged" / "results.json").is_file() and not (run_dir / "converged.previous3").exists()
    assert "converged" in json.loads((run_dir / "results.json").read_text()) and job.converged_rule_changes() == {}


@pytest.mark.parametrize("key,old,now,stopped_early,changes", [
    ("max_steps", 6000, 8000, False, True),                        # the LR schedule spans the cap
    ("early_stopping_anneal_steps", 0, 1000, True, True),          # the criterion fired: the tail runs now
    ("early_stopping_anneal_steps", 0, 1000, False, False),        # ran to the cap: no tail to run
    ("early_stopping_patience", 10, 20, False, False),             # laxer: would not have fired either
    ("early_stopping_patience", 10, 5, False, True),               # stricter: might fire now
    ("early_stopping_patience", None, 10, False, True),            # off → on
    ("early_stopping_patience", 10, None, False, False),
    ("early_stopping_min_steps", 3000, 2000, False, True),
    ("early_stopping_min_steps", 3000, 3000, True, False),
])
def test_a_rule_change_matters_only_where_it_could_end_the_readout_otherwise(key, old, now, stopped_early, changes):
    assert changes_readout(key, old, now, stopped_early) is changes
