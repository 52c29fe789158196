"""`maskpot study`: config scales, the report maths on hand-made results, and the tiny scale end to end."""
import dataclasses
import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from data_shards.config_io import ConfigError
from maskpot.cli import main as cli_main
from maskpot.study import report as study_report
from maskpot.study.config import load_study
from maskpot.study.pretraining import check_run_configs
from maskpot.study.stages import describe_plan
from tests.helpers.paths import REPO

STUDY = REPO / "configs" / "study" / "water.yaml"


@pytest.mark.parametrize("scale", ["tiny", "small", "full", "paper"])
def test_every_scale_in_the_repo_yaml_is_valid(scale):
    cfg = load_study(STUDY, scale)
    assert cfg.scale == scale and {"scratch", "mask"} <= set(cfg.variants)
    if scale != "tiny":   # tiny (a pipeline check, one pretraining) leaves denoise out
        assert "denoise" in cfg.variants   # every other scale compares scratch, denoise and mask
    plan = describe_plan(cfg, REPO / "runs" / "x")
    assert f"scale {scale}" in plan and "finetunes" in plan


def test_small_scale_keeps_one_finetune_budget_and_the_required_budgets():
    cfg = load_study(STUDY, "small")
    assert {10, 30} <= set(cfg.dft_water.budgets) and cfg.dft_water.budgets[-1] == 240
    assert len(cfg.seeds) >= 2 and cfg.corpus.frames >= 1000


@pytest.mark.parametrize("overrides,needle", [
    ({"finetune": {"stepz": 3}}, "valid keys"),
    ({"variants": ["mask", "denoise"]}, "must include 'scratch'"),
    ({"variants": ["scratch", "maks"]}, "valid: ['scratch', 'denoise', 'mask', 'mask+denoise', 'supervised']"),
    ({"models": {"schnet": {}}}, "registered"),
    ({"dft_water": {"budgets": [30, 500]}}, "240 frames"),
    ({"seeds": [0, 0]}, "distinct"),
])
def test_bad_study_configs_say_what_is_valid(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_study(STUDY, "tiny", overrides)
    assert needle in str(err.value)


@pytest.mark.parametrize("overrides,needle", [
    ({"pretrain": {"mask_ratio": 1.5}}, ["study pretraining egnn_mask", "objective.mask_ratio must be in (0, 1]"]),
    ({"models": {"egnn": {"hiden": 8}}}, ["model.params", "'hiden'"]),
    ({"finetune": {"val_batches": 0}}, ["study finetuning egnn", "train.val_batches must be >= 1"]),
    ({"finetune": {"energy_normalisation": "eV"}}, ["study finetuning egnn", "loss.energy_normalisation 'eV'"]),
    ({"ablations": {"lr": {"pretrain": {"mask_ratio": 2.0}}}}, ["(ablation lr)", "mask_ratio"]),
])
def test_every_run_config_is_validated_before_any_work(overrides, needle, tmp_path, capsys):
    """Through PretrainConfig/FinetuneConfig, at start: not after the corpus was generated and sharded."""
    cfg = load_study(STUDY, "tiny", overrides)
    with pytest.raises(ConfigError) as err:
        check_run_configs(cfg, tmp_path / "study")
    assert all(n in str(err.value) for n in needle), err.value
    dotted = [f"{k}.{kk}={json.dumps(vv)}" for k, v in overrides.items() for kk, vv in v.items()
              if not isinstance(vv, dict)]
    if dotted:   # the command refuses before writing anything
        args = ["study", "--config", str(STUDY), "--scale", "tiny", "--out", str(tmp_path / "study"), "--plan"]
        assert cli_main([*args, *[x for d in dotted for x in ("--override", d)]]) == 2
        assert needle[1] in capsys.readouterr().err and not (tmp_path / "study").exists()


def test_unknown_scale_lists_the_defined_ones():
    with pytest.raises(ConfigError) as err:
        load_study(STUDY, "huge")
    assert "'full', 'paper', 'small', 'tiny'" in str(err.value)


def maskpot(*args, cwd):
    env = dict(os.environ, TQDM_DISABLE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "maskpot.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def _fake_run(root, setting, name, force, energy, curve, converged=None):
    d = root / "finetune" / setting / name
    d.mkdir(parents=True)
    history = [{"step": s, "force_rmse_mev_per_a": f, "energy_rmse_mev_per_atom": 1.0} for s, f in curve]
    conv = {"converged": {"test": {"force_rmse_mev_per_a": converged, "energy_rmse_mev_per_atom": energy},
                          "steps": 1000, "stopped_early": True}} if converged is not None else {}
    d.joinpath("results.json").write_text(json.dumps({
        "test": {"force_rmse_mev_per_a": force, "energy_rmse_mev_per_atom": energy}, "history": history, **conv}))


def test_report_means_changes_and_steps_to_reach_scratch(tmp_path):
    _fake_run(tmp_path, "dft_water", "egnn_scratch_n30_s0", 100.0, 2.0, [(0, 900), (50, 300), (100, 110)])
    _fake_run(tmp_path, "dft_water", "egnn_scratch_n30_s1", 120.0, 4.0, [(0, 900), (50, 280), (100, 130)])
    _fake_run(tmp_path, "dft_water", "egnn_mask_n30_s0", 70.0, 1.0, [(0, 500), (50, 115), (100, 80)])
    _fake_run(tmp_path, "dft_water", "egnn_mask_n30_s1", 90.0, 1.0, [(0, 500), (50, 125), (100, 90)])
    _fake_run(tmp_path, "dft_water", "egnn_denoise_n30_s0", 200.0, 5.0, [(0, 600), (50, 400), (100, 300)])
    _fake_run(tmp_path, "dft_water", "egnn_mask+denoise_n240_s0", 50.0, 1.0, [(0, 400), (100, 60)])
    summary = study_report.summarize(study_report.collect(tmp_path))["dft_water"]
    rows = {(r["budget"], r["variant"]): r for r in summary["rows"]}
    scratch, mask = rows[(30, "scratch")], rows[(30, "mask")]
    assert scratch["force_mean"] == pytest.approx(110.0) and scratch["force_std"] == pytest.approx(math.sqrt(200))
    assert mask["force_change_vs_scratch_pct"] == pytest.approx(100 * (80 / 110 - 1))
    assert rows[(30, "denoise")]["force_std"] == 0.0 and rows[(30, "denoise")]["seeds"] == 1
    assert math.isnan(rows[(240, "mask+denoise")]["force_change_vs_scratch_pct"])  # no scratch at 240
    reach = {(r["budget"], r["variant"]): r for r in summary["steps_to_scratch"]}
    assert reach[(30, "scratch")]["scratch_final_val_force"] == pytest.approx(120.0)  # mean of 110 and 130
    assert reach[(30, "mask")]["first_step_reaching"] == 50  # mean 120 at step 50
    assert reach[(30, "denoise")]["first_step_reaching"] is None
    text = study_report.write_report(tmp_path)
    assert "| egnn | 30 | mask | 2 | 1.00 ± 0.00 | 80.0 ± 14.1 | -27.3% (larger than the spread) |" in text
    for png in ("learning_curves_dft_water_egnn.png", "data_efficiency_dft_water_egnn.png"):
        assert (tmp_path / "report" / png).stat().st_size > 5000


def test_ablations_compare_with_their_own_baseline_over_the_same_seeds(tmp_path):
    curve = [(0, 900), (100, 100)]
    _fake_run(tmp_path, "dft_water", "egnn_scratch_n30_s0", 100.0, 2.0, curve, converged=60.0)
    _fake_run(tmp_path, "dft_water", "egnn_scratch_n30_s1", 140.0, 2.0, curve, converged=90.0)   # not an ablation seed
    _fake_run(tmp_path, "dft_water", "egnn_mask_n30_s0", 90.0, 2.0, curve)
    _fake_run(tmp_path, "dft_water", "egnn_mask@lowlr_n30_s0", 80.0, 1.0, curve, converged=45.0)   # finetune unchanged
    _fake_run(tmp_path, "dft_water", "egnn_scratch@long_n30_s0", 50.0, 1.0, curve)       # finetune changed
    _fake_run(tmp_path, "dft_water", "egnn_mask@long_n30_s0", 40.0, 1.0, curve)
    _fake_run(tmp_path, "dft_water", "egnn_mask@long2_n30_s0", 45.0, 1.0, curve)   # shares long's scratch
    (tmp_path / "finetune/dft_water/egnn_mask@long2_n30_s0.yaml").write_text(
        "tracking:\n  tags: {study.baseline: scratch@long}\n")
    records = study_report.collect(tmp_path)
    main = {r["variant"] for r in study_report.summarize(records)["dft_water"]["rows"]}
    assert main == {"scratch", "mask"}                     # ablation runs stay out of the main table
    rows = {r["ablation"]: r for r in study_report.summarize_ablations(records)}
    assert set(rows) == {"lowlr", "long", "long2"}
    assert rows["long2"]["baseline"] == "scratch@long" and rows["long2"]["baseline_force"] == pytest.approx(50.0)
    low, long = rows["lowlr"], rows["long"]
    assert low["baseline"] == "scratch" and low["baseline_force"] == pytest.approx(100.0)   # seed 0 only
    assert low["force_change_vs_baseline_pct"] == pytest.approx(-20.0)
    assert low["without_ablation_force"] == pytest.approx(90.0)
    assert low["without_ablation_change_pct"] == pytest.approx(-10.0)
    assert long["baseline"] == "scratch@long" and long["force_change_vs_baseline_pct"] == pytest.approx(-20.0)
    text = study_report.write_report(tmp_path)
    assert "| egnn | 30 | mask | 2 |" not in text   # the main table counts main runs only (1 mask seed)
    ablations = (tmp_path / "report" / "ablations.md").read_text()
    assert "| lowlr | egnn | 30 | mask | 0 | 1.00 ± 0.00 | 80.0 ± 0.0 | 100.0 (scratch) | -20.0% | 90.0 (-10.0%) " \
           "| 45.0 ± 0.0 | -25.0% (n/a (runs: 1 vs 1)) |" in ablations   # at convergence: against scratch seed 0's 60
    assert "| long | egnn | 30 | mask | 0 |" in ablations and "| — | — |" in ablations   # no converged read-out
    assert (tmp_path / "report" / "ablation_long_dft_water_egnn.png").stat().st_size > 5000


def test_ablations_reuse_a_shared_pretraining_and_a_shared_scratch_baseline(tmp_path):
    from maskpot.study.ablation import ablation_jobs

    cfg = load_study(STUDY, "tiny", {"ablations": {
        "a": {"variants": ["mask"], "budgets": [8], "pretrain_data": "dft_train"},
        "b": {"variants": ["mask"], "budgets": [8], "pretrain_data": "dft_train", "finetune": {"steps": 9}},
        "c": {"variants": ["mask"], "budgets": [8], "finetune": {"steps": 9}}}})
    for run in ("egnn_mask@a", "egnn_mask"):   # finished pretrainings: nothing is run again
        (tmp_path / "pretrain" / run / "export").mkdir(parents=True)
        (tmp_path / "pretrain" / run / "export" / "model.json").write_text("{}")
    names = {n: {Path(j.run_dir).name: j for j in ablation_jobs(cfg, tmp_path, n, tmp_path / "corpus",
                                                                  tmp_path / "dft")} for n in ("b", "c")}
    assert set(names["b"]) == {"egnn_scratch@b_n8_s0", "egnn_mask@b_n8_s0"}
    assert names["b"]["egnn_mask@b_n8_s0"].config["init"] == str(tmp_path / "pretrain/egnn_mask@a/export")
    assert set(names["c"]) == {"egnn_scratch@b_n8_s0", "egnn_mask@c_n8_s0"}   # b's scratch serves c too
    assert names["c"]["egnn_mask@c_n8_s0"].config["init"] == str(tmp_path / "pretrain/egnn_mask/export")
    assert names["c"]["egnn_mask@c_n8_s0"].config["tracking"]["tags"]["study.baseline"] == "scratch@b"
    assert names["c"]["egnn_mask@c_n8_s0"].config["train"]["max_steps"] == 9


def test_a_two_stage_ablation_continues_the_main_corpus_export(tmp_path, pretrain_configs):
    """pretrain_init: corpus — the DFT-position pretraining starts from the main corpus export (train.init),
    is its own run (not the paper recipe's, which has the same stages), and a scratch variant is refused."""
    from maskpot.study.ablation import ablation_jobs

    same = {"variants": ["mask"], "budgets": [8], "pretrain_data": "dft_train"}
    cfg = load_study(STUDY, "tiny", {"ablations": {"paper": same, "two": {**same, "pretrain_init": "corpus"}}})
    jobs = {Path(j.run_dir).name: j for j in ablation_jobs(cfg, tmp_path, "two", tmp_path / "corpus", tmp_path / "dft")}
    assert set(jobs) == {"egnn_scratch_n8_s0", "egnn_mask@two_n8_s0"}
    assert jobs["egnn_mask@two_n8_s0"].config["init"] == str(tmp_path / "pretrain/egnn_mask@two/export")
    first, second = pretrain_configs["egnn_mask"], pretrain_configs["egnn_mask@two"]   # in the order they ran
    assert first["data"]["manifest_dir"] == str(tmp_path / "corpus") and "init" not in first["train"]
    assert second["data"]["manifest_dir"] == str(tmp_path / "dft")
    assert second["train"]["init"] == str(tmp_path / "pretrain/egnn_mask/export")
    assert list(pretrain_configs) == ["egnn_mask", "egnn_mask@two"]
    with pytest.raises(ConfigError, match="pretrain_init: corpus continues a pretraining"):
        load_study(STUDY, "tiny", {"ablations": {"x": {"variants": ["scratch"], "pretrain_init": "corpus"}}})
    with pytest.raises(ConfigError, match="pretrain_init must be 'none' or 'corpus', got 'tip3p'"):
        load_study(STUDY, "tiny", {"ablations": {"x": {"pretrain_init": "tip3p"}}})


def test_ethanol_variants_pretrain_with_the_nearest_or_the_farthest_deleted_h(tmp_path, pretrain_configs):
    from maskpot.study.stages import ethanol_jobs

    (tmp_path / "shards" / "ethanol").mkdir(parents=True)
    (tmp_path / "shards" / "ethanol" / "manifest.json").write_text("{}")   # already sharded
    cfg = load_study(STUDY, "tiny", {"ethanol": {"variants": ["scratch", "hmask", "hmask_farthest"]}})
    jobs = ethanol_jobs(cfg, tmp_path)
    objectives = {name: c["objective"] for name, c in pretrain_configs.items()}
    assert objectives["ethanol_egnn_hmask"]["kind"] == objectives["ethanol_egnn_hmask_farthest"]["kind"] == "hmask"
    assert objectives["ethanol_egnn_hmask_farthest"]["h_mask_target"] == "farthest"
    assert "h_mask_target" not in objectives["ethanol_egnn_hmask"]   # the default: nearest
    assert {Path(j.run_dir).name for j in jobs} >= {"egnn_hmask_farthest_n20_s0", "egnn_scratch_n40_s0"}


def test_an_ablation_can_rerun_a_pretraining_with_another_seed(tmp_path, pretrain_configs):
    from maskpot.study.ablation import ablation_jobs

    cfg = load_study(STUDY, "tiny", {"ablations": {"again": {"variants": ["mask"], "budgets": [8], "seeds": [0, 1],
                                                             "pretrain": {"seed": 1}}}})
    jobs = {Path(j.run_dir).name: j for j in ablation_jobs(cfg, tmp_path, "again", tmp_path / "c", tmp_path / "d")}
    assert {name: c["train"]["seed"] for name, c in pretrain_configs.items()} == {"egnn_mask@again": 1}
    assert set(jobs) == {"egnn_scratch_n8_s0", "egnn_scratch_n8_s1", "egnn_mask@again_n8_s0", "egnn_mask@again_n8_s1"}
    assert jobs["egnn_mask@again_n8_s1"].config["init"] == str(tmp_path / "pretrain/egnn_mask@again/export")
    assert cfg.pretrain.seed == 0


def test_an_ablation_with_two_pretraining_seeds_runs_each_pretraining_under_each_finetune_seed(tmp_path,
                                                                                               pretrain_configs):
    """pretrain_seeds: the paper recipe's headline row is 2 pretraining × 2 finetune seeds; the second
    pretraining is VARIANT@NAME_pSEED and its finetunes RUN_sSEEDpPSEED (the report's run-name pattern)."""
    from maskpot.study.ablation import ablation_jobs, needs_corpus
    from maskpot.study.finetunes import selected

    cfg = load_study(STUDY, "tiny", {"ablations": {"paper": {"variants": ["mask"], "budgets": [8], "seeds": [0, 1],
                                                             "pretrain_seeds": [0, 1], "pretrain_data": "dft_train"}}})
    jobs = {Path(j.run_dir).name: j for j in ablation_jobs(cfg, tmp_path, "paper", tmp_path / "c", tmp_path / "d")}
    assert {name: c["train"]["seed"] for name, c in pretrain_configs.items()} == {"egnn_mask@paper": 0,
                                                                                  "egnn_mask@paper_p1": 1}
    assert set(jobs) == {"egnn_scratch_n8_s0", "egnn_scratch_n8_s1", "egnn_mask@paper_n8_s0", "egnn_mask@paper_n8_s1",
                         "egnn_mask@paper_n8_s0p1", "egnn_mask@paper_n8_s1p1"}
    assert jobs["egnn_mask@paper_n8_s0p1"].config["init"] == str(tmp_path / "pretrain/egnn_mask@paper_p1/export")
    assert jobs["egnn_mask@paper_n8_s0p1"].config["tracking"]["tags"]["study.pretrain_seed"] == 1
    assert study_report.RUN_NAME.match("egnn_mask@paper_n8_s0p1")["pseed"] == "1"
    assert not needs_corpus(cfg, "paper")   # the paper recipe reads no TIP3P corpus: none is generated for it
    assert needs_corpus(load_study(STUDY, "tiny", {"ablations": {"x": {"variants": ["mask"]}}}), "x")
    only = dataclasses.replace(cfg, only=["dft_water/*_s*p1", "dft_water/egnn_scratch_n8_s1"])
    assert [Path(j.run_dir).name for j in selected(only, list(jobs.values()))] == [
        "egnn_scratch_n8_s1", "egnn_mask@paper_n8_s0p1", "egnn_mask@paper_n8_s1p1"]
    assert selected(cfg, list(jobs.values())) == list(jobs.values())
    with pytest.raises(ConfigError, match="pretrain_seeds must be distinct"):
        load_study(STUDY, "tiny", {"ablations": {"x": {"pretrain_seeds": [1, 1]}}})


@pytest.mark.parametrize("ablation,needle", [
    ({"variants": ["maks"]}, "valid: ['scratch'"),
    ({"finetune": {"stepz": 3}}, "ablations.x.finetune: unknown key(s) ['stepz']"),
    ({"finetune": {"adapt": {"backbone_lr": 0.2}}}, "finetune.adapt: unknown key(s) ['backbone_lr']"),
    ({"pretrain": {"zero_stage": 4}}, "zero_stage must be 0, 1 or 2"),
    ({"budgets": [500]}, "240 frames"),
    ({"colour": "red"}, "valid keys"),
])
def test_bad_ablations_fail_when_the_study_config_is_read(ablation, needle):
    with pytest.raises(ConfigError) as err:
        load_study(STUDY, "tiny", {"ablations": {"x": ablation}})
    assert needle in str(err.value)


def test_ablation_plan_names_what_changes_and_refuses_unknown_names(tmp_path):
    run = maskpot("study", "--scale", "small", "--ablation", "all", "--plan", cwd=REPO)
    assert run.returncode == 0, run.stderr
    cfg = load_study(STUDY, "small")
    for name in cfg.ablations:
        assert f"ablation {name}:" in run.stdout
    bad = maskpot("study", "--scale", "small", "--ablation", "nope", "--plan", cwd=REPO)
    assert bad.returncode == 2 and "defined: ['backbone_lr'" in bad.stderr


@pytest.mark.slow
def test_tiny_study_runs_every_stage_resumes_and_tracks_each_run(tmp_path, shared_data):
    """corpus → one pretraining (mask) → scratch and mask finetunes on DFT water, each read out at the budget
    and at convergence → report; a rerun redoes nothing; an ablation reuses the pretraining and scratch run.
    Then the scaling, diversity and two-stage arms switched on (off at tiny by default) run over the same
    folder. TIP3P and ethanol are off at tiny: their jobs, plan and report are tested without training."""
    out = tmp_path / "study"
    args = ["study", "--scale", "tiny", "--out", out, "--config", STUDY, "--override",
            f"dft_water.path={shared_data / 'water_deepmd'}"]
    first = maskpot(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    cfg = load_study(STUDY, "tiny")
    assert not (cfg.scaling.sizes or cfg.diversity.frames or cfg.two_stage.enabled or cfg.tip3p.enabled
                or cfg.ethanol.enabled)
    expected = len(cfg.variants) * len(cfg.dft_water.budgets) * len(cfg.seeds)
    results = sorted(out.glob("finetune/*/*/results.json"))
    assert len(results) == expected == 2
    readouts = [json.loads(p.read_text()) for p in results]
    assert all(r["converged"]["max_steps"] == cfg.finetune.converge_steps for r in readouts)   # both read-outs
    assert all(r["converged"]["test"] and r["test"] for r in readouts)
    summary = (out / "report" / "summary.md").read_text()
    for section in (study_report.SETTING_TITLES["dft_water"], "At convergence", "At the fixed finetune budget",
                    "## Time per stage"):
        assert section in summary
    assert (out / "report" / "learning_curves_dft_water_egnn.png").is_file()
    exports = sorted(p.parent.parent.name for p in out.glob("pretrain/*/export/model.json"))
    assert exports == ["egnn_mask"]
    with sqlite3.connect(out / "mlflow.db") as db:
        finished = "select count(*) from runs r join experiments e on r.experiment_id = e.experiment_id " \
                   "join tags t on t.run_uuid = r.run_uuid where e.name = ? and r.status = 'FINISHED' and t.key = ?"
        runs = db.execute(finished, (cfg.experiment, "study.setting")).fetchone()[0]
        pretrainings = db.execute(finished + " and t.value = 'pretrain'", (cfg.experiment, "study.stage")).fetchone()[0]
        nested = db.execute("select count(*) from tags where key = 'mlflow.parentRunId'").fetchone()[0]
        variants = {v for (v,) in db.execute("select value from tags where key = 'study.variant'")}
        readout_tags = sorted(v for (v,) in db.execute("select value from tags where key = 'study.readout'"))
    assert runs == 2 * expected and variants == {"scratch", "mask"}
    assert readout_tags == ["budget", "budget", "converged", "converged"]
    assert pretrainings == len(exports)
    assert nested == 2, nested   # both read-outs of the mask finetune nest under its pretraining
    stamps = {p: p.stat().st_mtime_ns for p in results}
    again = maskpot(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{expected} of {expected} runs already finished, 0 to go" in again.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in results}

    ablated = maskpot(*args, "--ablation", "all", cwd=tmp_path)
    assert ablated.returncode == 0, ablated.stdout[-3000:] + ablated.stderr[-3000:]
    assert stamps == {p: p.stat().st_mtime_ns for p in results}, "the main runs are reused, never redone"
    runs = {p.parent.name for p in out.glob("finetune/dft_water/*@*/results.json")}
    assert runs == {"egnn_mask@backbone_lr_n8_s0"}
    assert sorted(p.parent.parent.name for p in out.glob("pretrain/*/export/model.json")) == exports   # reused
    adapt = json.loads((out / "finetune/dft_water/egnn_mask@backbone_lr_n8_s0/results.json").read_text())["adapt"]
    assert adapt["backbone_lr_mult"] == 0.2
    table = (out / "report" / "ablations.md").read_text()
    assert "| backbone_lr | egnn | 8 | mask | 0 |" in table
    _extended_arms_reuse_the_main_runs_and_report(args, out, stamps, tmp_path)


EXTENDED = ["scaling.sizes=[8,16]", "diversity.frames=16", "two_stage.enabled=true"]


def _extended_arms_reuse_the_main_runs_and_report(args, out, stamps, cwd):
    """The scaling, diversity and two-stage arms switched on over the finished tiny study: a corpus with sampled
    conditions and both water models (one Ray task per trajectory), one pretraining per size and arm, a
    two-stage export whose lineage holds both stages, both read-outs of every new finetune, and the report's
    scaling curve, comparisons and stage times; the main runs are reused."""
    done = maskpot(*args, *EXTENDED, cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}, "the main runs are reused, never redone"
    arms = {"twostage", "dft_positions", "corpus8", "corpus16", "single16"}
    for arm in arms:
        results = json.loads((out / f"finetune/dft_water/egnn_mask@{arm}_n8_s0/results.json").read_text())
        assert results["test"] and results["converged"]["test"], arm
        assert (out / f"pretrain/egnn_mask@{arm}/export/model.json").is_file(), arm
    lineage = json.loads((out / "pretrain/egnn_mask@twostage/export/model.json").read_text())["lineage"]
    assert Path(lineage["init"]) == out / "pretrain/egnn_mask/export" and lineage["init_lineage"]["steps"] == 4
    sampled = json.loads((out / "data/generated/corpus/corpus.json").read_text())
    assert {t["model"] for t in sampled["trajectories"]} == {"tip3p", "spcfw"}
    assert len({(t["temperature_k"], t["density_g_cm3"]) for t in sampled["trajectories"]}) == 4
    assert len(list((out / "data/generated/corpus").glob("traj-*.extxyz"))) == 4
    single = json.loads((out / "data/generated/single/corpus.json").read_text())
    assert {(t["model"], t["temperature_k"]) for t in single["trajectories"]} == {("tip3p", 300.0)}
    summary = (out / "report" / "summary.md").read_text()
    assert "| egnn | mask | 8 | 8 | 1 |" in summary and "| egnn | mask | 8 | 16 | 1 |" in summary   # the curve
    assert "\n\n## Two-stage and diversity" in summary and "| two-stage | 1 |" in summary
    assert "| sampled conditions and models | 1 |" in summary and "| one condition | 1 |" in summary
    for stage in ("scaling_pretrain", "diversity_finetune", "two_stage_pretrain"):
        assert f"| {stage} |" in summary
    assert (out / "report" / "scaling.png").is_file() and (out / "report" / "two_stage_egnn_n8.png").is_file()


def test_only_runs_just_the_pretrainings_of_the_selected_ablation_finetunes_and_a_typo_fails_first(
        tmp_path, pretrain_configs):
    """`--only` on a 2 × 2 ablation: the pretraining no selected finetune reads is not run (it once cost a
    20-minute pretraining for nothing), and a glob that names no finetune — pretraining seed 0 has no p0
    suffix — fails before any work instead of silently selecting nothing."""
    from maskpot.study.ablation import ablation_jobs, run_ablations
    from maskpot.study.finetunes import selected

    cfg = load_study(STUDY, "tiny", {"ablations": {"paper": {"variants": ["mask"], "budgets": [8], "seeds": [0, 1],
                                                             "pretrain_seeds": [0, 1], "pretrain_data": "dft_train"}},
                                     "only": ["dft_water/egnn_mask@paper_n8_s1"]})
    jobs = ablation_jobs(cfg, tmp_path, "paper", tmp_path / "c", tmp_path / "d")
    assert list(pretrain_configs) == ["egnn_mask@paper"]    # not egnn_mask@paper_p1
    assert [j.name for j in selected(cfg, jobs)] == ["dft_water/egnn_mask@paper_n8_s1"]
    typo = dataclasses.replace(cfg, only=["dft_water/egnn_mask@paper_n8_s1", "dft_water/egnn_mask@paper_n8_s1p0"])
    with pytest.raises(ValueError, match=r"--only \['dft_water/egnn_mask@paper_n8_s1p0'\]: no finetune of "
                                         r"ablation\(s\) \['paper'\] is named like that; their names: "
                                         r"dft_water/egnn_scratch_n8_s0, .*dft_water/egnn_mask@paper_n8_s1p1"):
        run_ablations(typo, tmp_path / "run", ["paper"])
    assert not (tmp_path / "run").exists() and list(pretrain_configs) == ["egnn_mask@paper"]   # before any work
