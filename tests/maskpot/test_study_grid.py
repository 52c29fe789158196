"""The extended study (issue 13): two read-outs per finetune and their resume, pretraining seeds, the
scaling / diversity / two-stage grid, the plan's order, and the report's spread rule and tables."""
import json
import math
import re
from pathlib import Path

import pytest

from data_shards.config_io import ConfigError, merge, parse_dotted_overrides
from maskpot.study import finetunes, grid
from maskpot.study import report as study_report
from maskpot.study import report_grid as G
from maskpot.study.config import load_study
from maskpot.study.grid import describe_plan, run_experiments, two_stage_jobs
from maskpot.study.stages import water_jobs
from tests.helpers.paths import REPO

STUDY = REPO / "configs" / "study" / "water.yaml"
# the tiny scale runs without the experiment arms (its end-to-end test stays short); these switch them on
GRID = {"scaling": {"sizes": [8, 16]}, "diversity": {"frames": 16}, "two_stage": {"enabled": True}}


def tiny_grid(overrides: dict | None = None):
    return load_study(STUDY, "tiny", merge(GRID, overrides or {}))


@pytest.mark.parametrize("overrides,needle", [
    ({"diversity": {"frames": 12}}, "must be one of scaling.sizes [8, 16]"),
    ({"scaling": {"sizes": [10]}}, "multiples of frames_per_trajectory (4), got 10"),
    ({"scaling": {"variants": ["scratch"]}}, "not pretext objectives"),
    ({"finetune": {"converge_steps": 3}}, "converge_steps must be 0 (off) or >= finetune.steps (6)"),
    ({"scaling": {"conditions": {"density_g_cm3": [-1.0, 1.0]}}}, "density"),
    ({"two_stage": {"budgets": [300]}}, "two_stage.budgets"),
    ({"pretrain_seeds": [1, 1]}, "distinct"),
    ({"scaling": {"models": {"schnet": {"hidden": 8}}}}, "scaling.models: unknown ['schnet']; registered: ["),
])
def test_bad_grid_settings_fail_when_the_config_is_read(overrides, needle):
    with pytest.raises(ConfigError) as err:
        tiny_grid(overrides)
    assert needle in str(err.value)


def test_small_scale_has_the_issue_13_grid():
    cfg = load_study(STUDY, "small")
    assert cfg.dft_water.budgets == [10, 30, 240] and len(cfg.seeds) >= 2 and len(cfg.headline_pretrain_seeds()) >= 2
    assert cfg.scaling.sizes == [1000, 4000, 16000] and set(cfg.scaling.variants) == {"mask", "denoise"}
    assert "gns" in cfg.scaling.models and cfg.diversity.frames in cfg.scaling.sizes and cfg.two_stage.enabled
    assert cfg.finetune.converge_steps > cfg.finetune.steps


def test_a_null_model_drops_one_the_scale_merges_in():
    """`--override scaling.models.gns=null`: the small scale's scaling curve without its GNS arm (a merge alone
    cannot remove a key, and `--only` skips the GNS pretrainings but not their place in the plan)."""
    cfg = load_study(STUDY, "small", parse_dotted_overrides(["scaling.models.gns=null"]))
    assert list(cfg.scaling.models) == ["egnn"]
    assert "scaling: ['egnn'] × ['mask', 'denoise']" in describe_plan(cfg, Path("runs/x"))


def test_plan_runs_the_headline_rows_first_and_states_the_cap():
    plan = describe_plan(load_study(STUDY, "small"), Path("runs/x"))
    order = [plan.index(k) for k in ("HEADLINE dft_water", "tip3p:", "two-stage:", "scaling:", "diversity at",
                                     "ethanol:")]
    assert order == sorted(order), plan
    assert "cap 6000 steps" in plan and "pretraining seeds [0, 1]" in plan
    # 3 variants × 3 budgets × 2 finetune seeds, the 2 pretrained ones × 2 pretraining seeds: (1 + 2·2)·3·2
    assert "→ 30 finetunes" in plan


def test_pretraining_seeds_name_their_runs_and_exports(tmp_path):
    cfg = load_study(STUDY, "tiny", {"pretrain_seeds": [0, 3]})
    exports = {("egnn", "mask", 0): tmp_path / "a", ("egnn", "mask", 3): tmp_path / "b"}
    jobs = {Path(j.run_dir).name: j for j in water_jobs(cfg, tmp_path, "dft_water", tmp_path, ["scratch", "mask"],
                                                        [8], exports, cfg.headline_pretrain_seeds())}
    assert set(jobs) == {"egnn_scratch_n8_s0", "egnn_mask_n8_s0", "egnn_mask_n8_s0p3"}
    assert jobs["egnn_mask_n8_s0p3"].config["init"] == str(tmp_path / "b")
    assert jobs["egnn_mask_n8_s0p3"].config["tracking"]["tags"]["study.pretrain_seed"] == 3
    assert jobs["egnn_mask_n8_s0"].converge_steps == 12 and jobs["egnn_mask_n8_s0"].patience == 2


def test_two_stage_continues_the_corpus_export_on_the_dft_positions(tmp_path, pretrain_configs):
    cfg = tiny_grid()
    jobs = {Path(j.run_dir).name: j for j in two_stage_jobs(cfg, tmp_path, tmp_path / "dft")}
    second, paper = pretrain_configs["egnn_mask@twostage"], pretrain_configs["egnn_mask@dft_positions"]
    assert second["train"]["init"] == str(tmp_path / "pretrain" / "egnn_mask" / "export")
    assert second["train"]["max_steps"] == cfg.two_stage.steps and second["optim"]["lr"] == cfg.two_stage.lr
    assert "init" not in paper["train"] and paper["train"]["max_steps"] == cfg.pretrain.steps
    assert second["data"]["manifest_dir"] == str(tmp_path / "dft")
    assert second["objective"]["water_grouping"] == "nearest_oxygen"
    assert set(jobs) == {"egnn_scratch_n8_s0", "egnn_mask_n8_s0", "egnn_mask@twostage_n8_s0",
                         "egnn_mask@dft_positions_n8_s0"}


def test_tiny_runs_no_experiment_arm_and_the_plan_counts_them_when_on():
    off = describe_plan(load_study(STUDY, "tiny"), Path("runs/x"))
    assert not any(k in off for k in ("two-stage:", "scaling:", "diversity at")), off
    on = describe_plan(tiny_grid({"tip3p": {"enabled": True}, "ethanol": {"enabled": True}}), Path("runs/x"))
    order = [on.index(k) for k in ("HEADLINE dft_water", "tip3p:", "two-stage:", "scaling:", "diversity at 16",
                                   "ethanol:")]
    assert order == sorted(order), on
    assert "budgets [8] → 2 new finetunes" in on and "→ 1 new finetunes" in on


def test_experiments_pretrain_each_corpus_once_and_finetune_every_arm(tmp_path, monkeypatch, pretrain_configs):
    """The tiny grid's experiments, run in order without training: corpora are not generated, pretrainings
    write an export (pretrain_configs), finetunes are recorded."""
    generated, finetuned = [], {}

    def stage_generated(cfg, out, name, mapping, sizes):
        generated.append((name, sizes, mapping["molecules"]))
        return {n: out / "shards" / f"{name}{n}" for n in sizes}

    def run_finetunes(cfg, jobs, what):
        finetuned[what] = sorted(Path(j.run_dir).name for j in jobs)

    monkeypatch.setattr(grid, "stage_generated", stage_generated)
    monkeypatch.setattr(grid, "run_finetunes", run_finetunes)
    cfg = tiny_grid()
    timings = finetunes.Timings(tmp_path / "timings.json")
    run_experiments(cfg, tmp_path, timings, tmp_path / "dft")
    assert list(finetuned) == ["two_stage finetunes", "scaling finetunes", "diversity finetunes"]
    assert finetuned["two_stage finetunes"] == ["egnn_mask@dft_positions_n8_s0", "egnn_mask@twostage_n8_s0",
                                                "egnn_mask_n8_s0", "egnn_scratch_n8_s0"]
    assert finetuned["scaling finetunes"] == ["egnn_mask@corpus16_n8_s0", "egnn_mask@corpus8_n8_s0",
                                              "egnn_scratch_n8_s0"]
    assert finetuned["diversity finetunes"] == ["egnn_mask@corpus16_n8_s0", "egnn_mask@single16_n8_s0",
                                                "egnn_scratch_n8_s0"]
    # one sampled-conditions corpus serves the curve and the diversity pair; the single condition is its own
    assert generated == [("corpus", [8, 16], [16, 24]), ("corpus", [8, 16], [16, 24]), ("single", [16], [16, 16])]
    assert sorted(pretrain_configs) == ["egnn_mask", "egnn_mask@corpus16", "egnn_mask@corpus8",
                                        "egnn_mask@dft_positions", "egnn_mask@single16", "egnn_mask@twostage"]
    for tag in ("corpus8", "corpus16", "single16"):
        config = pretrain_configs[f"egnn_mask@{tag}"]
        assert config["data"]["manifest_dir"] == str(tmp_path / "shards" / tag)
        assert config["train"]["max_steps"] == cfg.pretrain.steps   # fixed pretraining compute for every size
    assert set(timings.data) == {f"{n}_{s}" for n in ("two_stage", "scaling", "diversity")
                                 for s in ("pretrain", "finetune")}


def test_only_skips_the_experiment_pretrainings_no_selected_finetune_reads(tmp_path, monkeypatch, pretrain_configs):
    """`--only` on the scaling curve of two models: one model and one size are pretrained, not all six (a GNS
    scaling arm nobody selected once cost an hour of pretraining); the selected finetunes and the scratch
    baseline are still handed to the runner."""
    finetuned = {}
    monkeypatch.setattr(grid, "stage_generated",
                        lambda cfg, out, name, mapping, sizes: {n: out / "shards" / f"{name}{n}" for n in sizes})
    monkeypatch.setattr(grid, "run_finetunes",
                        lambda cfg, jobs, what: finetuned.update({what: finetunes.selected(cfg, jobs)}))
    cfg = load_study(STUDY, "tiny", {
        "scaling": {"sizes": [8, 16], "models": {"egnn": {"hidden": 8, "layers": 1}, "gns": {"latent": 8, "steps": 1}}},
        "only": ["dft_water/egnn_mask@corpus16_n8_s0", "dft_water/gns_scratch_n8_s0"]})
    run_experiments(cfg, tmp_path, finetunes.Timings(tmp_path / "timings.json"), tmp_path / "dft")
    assert sorted(pretrain_configs) == ["egnn_mask@corpus16"]
    assert sorted(j.name for j in finetuned["scaling finetunes"]) == ["dft_water/egnn_mask@corpus16_n8_s0",
                                                                      "dft_water/gns_scratch_n8_s0"]


def test_the_scaling_curve_is_pretrained_with_every_pretraining_seed(tmp_path, monkeypatch, pretrain_configs):
    """Error bars on the curve: each corpus size is pretrained with each pretraining seed (the study's own seed
    keeps the plain name, so finished exports are reused) and finetuned from it as ..._sSEEDpPSEED."""
    finetuned = {}
    monkeypatch.setattr(grid, "stage_generated",
                        lambda cfg, out, name, mapping, sizes: {n: out / "shards" / f"{name}{n}" for n in sizes})
    monkeypatch.setattr(grid, "run_finetunes", lambda cfg, jobs, what: finetuned.update({what: jobs}))
    cfg = load_study(STUDY, "tiny", {"scaling": {"sizes": [8, 16]}, "pretrain_seeds": [0, 1]})
    run_experiments(cfg, tmp_path, finetunes.Timings(tmp_path / "timings.json"), tmp_path / "dft")
    assert sorted(pretrain_configs) == ["egnn_mask@corpus16", "egnn_mask@corpus16_p1", "egnn_mask@corpus8",
                                        "egnn_mask@corpus8_p1"]
    assert {k: c["train"]["seed"] for k, c in pretrain_configs.items()} == {
        "egnn_mask@corpus16": 0, "egnn_mask@corpus16_p1": 1, "egnn_mask@corpus8": 0, "egnn_mask@corpus8_p1": 1}
    jobs = {Path(j.run_dir).name: j for j in finetuned["scaling finetunes"]}
    assert sorted(jobs) == ["egnn_mask@corpus16_n8_s0", "egnn_mask@corpus16_n8_s0p1", "egnn_mask@corpus8_n8_s0",
                            "egnn_mask@corpus8_n8_s0p1", "egnn_scratch_n8_s0"]
    assert jobs["egnn_mask@corpus8_n8_s0p1"].config["init"] == str(tmp_path / "pretrain" / "egnn_mask@corpus8_p1"
                                                                   / "export")
    assert "→ 4 new finetunes" in describe_plan(cfg, tmp_path).split("scaling:")[1].splitlines()[0]


def _finished_readout(out: Path, steps: int) -> dict:
    """What a fake run_finetune writes and returns: test F 50 at convergence, 80 at the fixed budget."""
    result = {"test": {"force_rmse_mev_per_a": 50.0 if out.name == "converged" else 80.0},
              "steps": steps, "stopped_early": out.name == "converged", "history": []}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result))
    return result


def test_both_readouts_are_merged_and_an_interrupted_convergence_run_resumes(tmp_path, monkeypatch):
    import finetune.loop

    calls = []

    def fake_finetune(cfg, pending_stop=None):
        out = Path(cfg.train.out_dir)
        calls.append((out.name, cfg.train.max_steps, cfg.train.early_stopping_patience))
        if len(calls) == 2 and not getattr(fake_finetune, "resumed", False):
            raise KeyboardInterrupt   # killed during the at-convergence run
        return _finished_readout(out, cfg.train.max_steps)

    monkeypatch.setattr(finetune.loop, "run_finetune", fake_finetune)
    cfg = load_study(STUDY, "tiny", {"finetune": {"jobs": 1}})
    job = water_jobs(cfg, tmp_path, "dft_water", tmp_path / "dft", ["scratch"], [8], {})[0]
    with pytest.raises(KeyboardInterrupt):
        finetunes.run_finetunes(cfg, [job])
    assert not job.finished() and (Path(job.run_dir) / "results.json").is_file()
    fake_finetune.resumed = True
    finetunes.run_finetunes(cfg, [job])
    assert calls == [(Path(job.run_dir).name, 6, None), ("converged", 12, 2), ("converged", 12, 2)]
    results = json.loads((Path(job.run_dir) / "results.json").read_text())
    assert results["test"]["force_rmse_mev_per_a"] == 80.0
    assert results["converged"]["test"]["force_rmse_mev_per_a"] == 50.0 and results["converged"]["stopped_early"]
    assert job.finished()
    finetunes.run_finetunes(cfg, [job])
    assert len(calls) == 3, "a finished run is never redone"


def test_the_convergence_readout_does_not_stop_early_before_patience_min_steps_and_anneals(tmp_path):
    small = load_study(STUDY, "small")
    job = water_jobs(small, tmp_path, "dft_water", tmp_path / "dft", ["scratch"], [30], {})[0]
    train = job.converged_config()["train"]
    assert (train["max_steps"], train["early_stopping_patience"], train["early_stopping_min_steps"]) == (6000, 10, 3000)
    assert train["early_stopping_anneal_steps"] == 1000   # an early stop anneals the LR before it ends the run
    assert "early_stopping_min_steps" not in job.config["train"]   # the fixed budget never stops early
    assert "early_stopping_anneal_steps" not in job.config["train"]
    with pytest.raises(ConfigError, match="patience_min_steps must be in"):
        load_study(STUDY, "tiny", {"finetune": {"patience_min_steps": 13}})
    with pytest.raises(ConfigError, match="patience_min_steps must be in"):
        load_study(STUDY, "tiny", {"finetune": {"patience_min_steps": -1, "converge_steps": 0}})
    # the fixed-budget read-out alone (REPORT's 600-step commands): the scale's patience_min_steps is unused
    assert load_study(STUDY, "small", {"finetune": {"converge_steps": 0}}).finetune.patience_min_steps == 3000
    with pytest.raises(ConfigError, match="anneal_steps must be >= 0"):
        load_study(STUDY, "tiny", {"finetune": {"anneal_steps": -1}})


def test_a_signalled_convergence_readout_is_not_recorded_and_resumes(tmp_path, monkeypatch):
    """SIGTERM (SLURM preemption, a killed study) makes run_finetune return {"preempted": ...} after writing a
    checkpoint: that is not a read-out. It was once merged into results.json as a converged read-out of None
    figures, and the study then counted the run as finished and never resumed it."""
    import finetune.loop

    calls = []

    def fake_finetune(cfg, pending_stop=None):
        out = Path(cfg.train.out_dir)
        calls.append(out.name)
        if out.name == "converged" and calls.count("converged") == 1:
            return {"preempted": "SIGTERM", "step": 13, "checkpoint": str(out / "checkpoint")}
        return _finished_readout(out, cfg.train.max_steps)

    monkeypatch.setattr(finetune.loop, "run_finetune", fake_finetune)
    cfg = load_study(STUDY, "tiny", {"finetune": {"jobs": 1}})
    job = water_jobs(cfg, tmp_path, "dft_water", tmp_path / "dft", ["scratch"], [8], {})[0]
    with pytest.raises(SystemExit, match=r"1 finetune\(s\) interrupted \(dft_water/egnn_scratch_n8_s0: stopped by "
                                         r"SIGTERM at step 13.*rerun the same command"):
        finetunes.run_finetunes(cfg, [job])
    assert "converged" not in json.loads((Path(job.run_dir) / "results.json").read_text())
    assert not job.finished()
    finetunes.run_finetunes(cfg, [job])
    assert calls == [Path(job.run_dir).name, "converged", "converged"] and job.finished()
    assert json.loads((Path(job.run_dir) / "results.json").read_text())["converged"]["test"] == {
        "force_rmse_mev_per_a": 50.0}


def test_an_unfinished_convergence_readout_counts_as_missing(tmp_path):
    """An interrupted study leaves the at-convergence keys of results.json as None: the fixed-budget read-out
    is reported, the converged one is missing (NaN, no curve), and the report still renders."""
    _run(tmp_path, "egnn_scratch_n30_s0", 100.0, 60.0, 6000)
    _run(tmp_path, "egnn_mask_n30_s0", 90.0)
    path = tmp_path / "finetune" / "dft_water" / "egnn_mask_n30_s0" / "results.json"
    r = json.loads(path.read_text())
    path.write_text(json.dumps({**r, "converged": {k: None for k in finetunes.CONVERGED_KEYS}}))
    mask = next(r for r in study_report.collect(tmp_path) if r["variant"] == "mask")
    assert mask["force"] == 90.0 and math.isnan(mask["force_conv"]) and mask["history_conv"] == []
    assert "| egnn | 30 | mask | 1 | 90.0 ± 0.0 | — |" in study_report.write_report(tmp_path)


def test_spread_rule():
    assert G.spread_mark([10, 12], [20, 22]) == "larger than the spread"
    assert G.spread_mark([10, 14], [15, 19]) == "within the spread"
    assert G.spread_mark([10], [20, 22]) == "n/a (runs: 1 vs 2)"
    assert G.compare([10, 12], [20, 24]).startswith("-50.0% (larger")


def _run(root, name, force, conv=None, steps=None):
    d = root / "finetune" / "dft_water" / name
    d.mkdir(parents=True)
    r = {"test": {"force_rmse_mev_per_a": force, "energy_rmse_mev_per_atom": 1.0}, "history": []}
    if conv is not None:
        r["converged"] = {"test": {"force_rmse_mev_per_a": conv, "energy_rmse_mev_per_atom": 1.0}, "steps": steps,
                          "stopped_early": True,
                          "history": [{"step": s, "force_rmse_mev_per_a": conv * (1 + 10 / (1 + s))} for s in (0, 50)]}
    d.joinpath("results.json").write_text(json.dumps(r))


def test_an_ablation_row_pools_and_counts_its_pretrainings(tmp_path):
    for s in (0, 1):
        _run(tmp_path, f"egnn_scratch_n30_s{s}", 100.0)
        _run(tmp_path, f"egnn_mask@paper_n30_s{s}", 80.0)
        _run(tmp_path, f"egnn_mask@paper_n30_s{s}p1", 90.0)   # pretraining seed 1
    rows = study_report.summarize_ablations(study_report.collect(tmp_path))
    assert [(r["pretrainings"], r["force_mean"]) for r in rows] == [(2, 85.0)]
    assert rows[0]["force_change_vs_baseline_pct"] == pytest.approx(-15.0)
    assert "| paper | egnn | 30 | mask | 0,1 × 2 pretrainings | 1.00 ± 0.00 | 85.0 ± 5.8 |" in \
        study_report.ablations_markdown(rows, {}, [])


def test_report_has_the_convergence_table_the_scaling_curve_and_the_comparisons(tmp_path):
    for s, f in ((0, 100.0), (1, 104.0)):
        _run(tmp_path, f"egnn_scratch_n30_s{s}", f + 10, f, 300)
        _run(tmp_path, f"egnn_mask_n30_s{s}", f, f - 20, 200)              # pretraining seed 0
        _run(tmp_path, f"egnn_mask_n30_s{s}p1", f + 2, f - 18, 220)        # pretraining seed 1
        for n, drop in ((8, 5), (16, 10)):
            _run(tmp_path, f"egnn_mask@corpus{n}_n30_s{s}", f, f - drop, 100)
        _run(tmp_path, f"egnn_mask@single16_n30_s{s}", f, f - 7, 100)
        _run(tmp_path, f"egnn_mask@corpus8_n10_s{s}", f, f - 3, 100)       # one corpus size at 10 frames
        _run(tmp_path, f"egnn_mask@twostage_n30_s{s}", f, f - 40, 100)
        _run(tmp_path, f"egnn_mask@dft_positions_n30_s{s}", f, f - 25, 100)
    (tmp_path / "timings.json").write_text(json.dumps({"corpus": 36.0, "pretrain": {"wall_s": 7200, "cpu_s": 14400}}))
    records = study_report.collect(tmp_path)
    assert {r["pseed"] for r in records if r["variant"] == "mask"} == {None, 1}
    rows = {(r["variant"]): r for r in study_report.summarize(records)["dft_water"]["rows"]}
    assert rows["mask"]["seeds"] == 4 and rows["mask"]["force_conv_mean"] == pytest.approx(83.0)
    assert rows["mask"]["conv_vs_scratch"].endswith("(larger than the spread)")
    text = study_report.write_report(tmp_path)
    assert "| egnn | 30 | mask | 4 | 103.0 ± 2.6 | 83.0 ± 2.6 | 210 | 4 |" in text
    assert "| egnn | mask | 30 | 16 | 2 | 102.0 ± 2.8 | 92.0 ± 2.8 |" in text
    assert "the curve falls monotonically with corpus size (97.0, 92.0 meV/Å); each step: 8 → 16 frames: " \
           "-5.2% (within the spread)." in text    # 97.0 ± 2.8 → 92.0 ± 2.8: 5.0 < 5.7
    assert "egnn mask, 10 frames: one corpus size so far (8 frames, 99.0 meV/Å), no curve." in text
    assert (tmp_path / "report" / "scaling.png").stat().st_size > 5000
    assert "two-stage vs paper recipe (DFT positions) (converged): -19.5% (larger than the spread)" in text
    assert "sampled conditions and models vs one condition (converged): -3.2% (within the spread)" in text
    assert "(two_stage_egnn_n30.png)" in text and (tmp_path / "report" / "two_stage_egnn_n30.png").stat().st_size > 5000
    assert "| pretrain | 2.000 | 4.000 |" in text and "| corpus | 0.010 | nan |" in text
    ablations = (tmp_path / "report" / "ablations.md").read_text()   # the paper recipe is also an ablation
    assert "dft_positions" in ablations, ablations
    assert not re.search(r"twostage|corpus\d|single\d", ablations), "experiment runs are not ablations"
    assert math.isnan(G.mean_std([])[0])


@pytest.mark.slow
def test_generated_corpus_is_made_once_and_sharded_by_prefix(tmp_path):
    """The scaling curve's corpora, for real at tiny size (OpenMM, Ray): the largest is generated, each size
    N shards its first N frames; asking again generates and shards nothing."""
    cfg = tiny_grid()
    shards = grid.stage_generated(cfg, tmp_path, "corpus", cfg.scaling.conditions, [8, 16])
    assert set(shards) == {8, 16}
    read = {n: json.loads((p / "manifest.json").read_text())["totals"]["frames_read"] for n, p in shards.items()}
    assert read == {8: 8, 16: 16}
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert grid.stage_generated(cfg, tmp_path, "corpus", cfg.scaling.conditions, [8, 16]) == shards
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}


def test_two_study_processes_on_one_folder_keep_each_others_stage_timings(tmp_path):
    """Each Timings re-reads timings.json before it writes: a second study process on the same folder (e.g. a
    denoising arm started beside a masking arm) once dropped the stages the first one recorded."""
    path = tmp_path / "timings.json"
    first, second = finetunes.Timings(path), finetunes.Timings(path)   # both read the file before either writes
    first.stage("scaling_pretrain", lambda: None)
    second.stage("headline_finetune", lambda: None)
    first.stage("scaling_pretrain", lambda: None)
    on_disk = json.loads(path.read_text())
    assert set(on_disk) == {"scaling_pretrain", "headline_finetune"}
    assert all(set(v) == {"wall_s", "cpu_s"} and v["wall_s"] >= 0.0 for v in on_disk.values())
