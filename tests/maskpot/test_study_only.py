"""`maskpot study --only` on the main grid: the plan names exactly the finetunes the stages build, a glob that
names none of them fails before any work, and only the pretrainings (and the TIP3P corpus) that a selected
finetune reads are run."""
from pathlib import Path

import pytest

from data_shards.config_io import merge
from maskpot.study import finetunes, grid, stages
from maskpot.study.config import load_study
from tests.helpers.paths import REPO

STUDY = REPO / "configs" / "study" / "water.yaml"
EVERYTHING = {"scaling": {"sizes": [8, 16]}, "diversity": {"frames": 16}, "two_stage": {"enabled": True},
              "tip3p": {"enabled": True}, "ethanol": {"enabled": True}, "seeds": [0, 1], "pretrain_seeds": [0, 1]}


def tiny(overrides: dict | None = None):
    return load_study(STUDY, "tiny", merge(EVERYTHING, overrides or {}))


def test_the_plan_names_exactly_the_finetunes_every_stage_builds(tmp_path, monkeypatch, pretrain_configs):
    """planned_runs (what --only is checked against and --plan counts) against the jobs the stages build,
    stage by stage, with every stage of the tiny grid switched on and two seeds of each kind."""
    cfg = tiny()
    built: dict[str, list[str]] = {}
    monkeypatch.setattr(grid, "stage_generated",
                        lambda cfg, out, name, mapping, sizes: {n: out / "shards" / f"{name}{n}" for n in sizes})
    monkeypatch.setattr(grid, "run_finetunes",
                        lambda cfg, jobs, what: built.update({what.removesuffix(" finetunes"): [j.name for j in jobs]}))
    exports = {key: tmp_path / "export" for key in stages.headline_pretrainings(cfg)}
    dft = tmp_path / "dft"
    built["headline"] = [j.name for j in stages.water_jobs(cfg, tmp_path, "dft_water", dft, cfg.variants,
                                                            cfg.dft_water.budgets, exports,
                                                            cfg.headline_pretrain_seeds())]
    built["tip3p"] = [j.name for j in stages.water_jobs(cfg, tmp_path, "tip3p", dft, cfg.tip3p.variants,
                                                         [cfg.tip3p.budget], exports)]
    grid.run_experiments(cfg, tmp_path, finetunes.Timings(tmp_path / "timings.json"), dft)
    (tmp_path / "shards" / "ethanol").mkdir(parents=True)
    (tmp_path / "shards" / "ethanol" / "manifest.json").write_text("{}")   # sharded already: not read here
    built["ethanol"] = [j.name for j in stages.ethanol_jobs(cfg, tmp_path)]

    planned = dict(grid.planned_runs(cfg))
    assert list(planned) == ["headline", "tip3p", "two_stage", "scaling", "diversity", "ethanol"]
    assert {k: sorted(v) for k, v in planned.items()} == {k: sorted(v) for k, v in built.items()}
    assert "dft_water/egnn_mask@corpus16_n8_s1p1" in planned["scaling"]   # both seeds, both pretraining seeds


def test_a_glob_that_names_no_finetune_of_the_grid_is_refused_and_the_plan_counts_the_selected():
    cfg = tiny({"only": ["dft_water/egnn_mask_n8_s1p1", "dft_water/egnn_mask@corpus8_n8_s0p0"]})
    with pytest.raises(ValueError, match=r"--only \['dft_water/egnn_mask@corpus8_n8_s0p0'\]: no finetune of this "
                                         r"study is named like that \(pretraining seed 0 has no p suffix\); its "
                                         r"names: .*dft_water/egnn_mask@corpus8_n8_s0p1"):
        grid.check_only(cfg)
    cfg = tiny({"only": ["dft_water/egnn_mask_n8_s1p1", "dft_water/egnn_scratch_*"]})
    grid.check_only(cfg)
    plan = grid.describe_plan(cfg, Path("runs/x"))
    assert "→ 6 finetunes, 3 selected by --only" in plan   # (scratch + mask × 2 pretraining seeds) × 2 seeds
    # the experiments' scratch baseline is selected again (it runs once), their new runs counted once
    assert "→ 8 new finetunes, 2 selected by --only" in plan.split("scaling:")[1].splitlines()[0]
    assert plan.endswith("; --only selects 3")


def test_only_the_pretrainings_a_selected_finetune_reads_run_and_the_corpus_only_for_them(
        tmp_path, monkeypatch, pretrain_configs):
    """A scratch-only selection generates no TIP3P corpus (3 minutes at the small scale) and pretrains
    nothing; selecting one run of pretraining seed 1 runs that pretraining alone, after the corpus."""
    made, finetuned = [], []

    def stage_corpus(cfg, out):
        made.append(out)
        return out / "shards" / "corpus"

    monkeypatch.setattr(stages, "stage_corpus", stage_corpus)
    monkeypatch.setattr(stages, "stage_dft_shards", lambda cfg, out: out / "shards" / "dft_water")
    monkeypatch.setattr(stages, "run_finetunes",
                        lambda cfg, jobs, what: finetuned.extend(j.name for j in finetunes.selected(cfg, jobs)))
    base = {"scaling": {"sizes": []}, "diversity": {"frames": 0}, "two_stage": {"enabled": False},
            "tip3p": {"enabled": False}, "ethanol": {"enabled": False}}
    stages.run_study(tiny({**base, "only": ["dft_water/egnn_scratch_*"]}), tmp_path / "a")
    assert made == [] and pretrain_configs == {} and finetuned == ["dft_water/egnn_scratch_n8_s0",
                                                                   "dft_water/egnn_scratch_n8_s1"]
    finetuned.clear()
    stages.run_study(tiny({**base, "only": ["dft_water/egnn_mask_n8_s1p1"]}), tmp_path / "b")
    assert made == [tmp_path / "b"] and list(pretrain_configs) == ["egnn_mask_p1"]
    assert pretrain_configs["egnn_mask_p1"]["data"]["manifest_dir"] == str(tmp_path / "b" / "shards" / "corpus")
    assert finetuned == ["dft_water/egnn_mask_n8_s1p1"]
    stages.run_study(tiny({**base, "only": ["dft_water/egnn_mask_n8_s0p1"]}), tmp_path / "b")
    assert made == [tmp_path / "b"]   # the export exists: no corpus is needed again
