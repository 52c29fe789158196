"""Adapting a pretrained export: backbone freezing, per-part learning rates, head re-initialisation,
elements new to the export, early stopping. Tiny real finetunes on the generated TIP3P water shards."""
from __future__ import annotations

import json

import pytest
import torch

from data_shards.config_io import ConfigError
from finetune import adapt as A
from tests.helpers.finetuning import LEARNS, cfg_with, export_fresh_model, exported_params, params_of, where

ARCH = {"hidden": 8, "layers": 1, "cutoff": 3.5}
SHORT = {"data": {"train_frames": 8}, "train": {"val_every": 2}}


def _model_for(init):
    from pretrain.export import load_export

    return load_export(init)[0]


def split_names(model) -> tuple[set[str], set[str]]:
    parts = A.split_parameters(model)
    return {n for n, _ in parts[A.BACKBONE]}, {n for n, _ in parts[A.HEAD]}


@pytest.fixture
def init(tmp_path):
    return export_fresh_model(tmp_path / "pretrained", ARCH)


# --- config ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sections, expected", [
    ({"adapt": {"freeze_backbone_steps": -2}}, ["freeze_backbone_steps", "-1"]),
    ({"adapt": {"freeze_backbone_steps": 5}}, ["freeze_backbone_steps needs `init`"]),
    ({"adapt": {"reinit_heads": True}}, ["reinit_heads needs `init`"]),
    ({"adapt": {"head_lr_mult": 0}}, ["head_lr_mult", "> 0"]),
    ({"adapt": {"backbone_lr_mult": -1.0}}, ["backbone_lr_mult"]),
    ({"adapt": {"freeze_backbone": 5}}, ["freeze_backbone", "freeze_backbone_steps"]),
    ({"train": {"early_stopping_patience": 0}}, ["early_stopping_patience", ">= 1"]),
    ({"train": {"max_steps": 10, "early_stopping_min_steps": 11}}, ["early_stopping_min_steps", "max_steps=10"]),
    ({"train": {"early_stopping_patience": 3, "early_stopping_anneal_steps": -1}},
     ["early_stopping_anneal_steps", ">= 0"]),
    ({"train": {"early_stopping_anneal_steps": 5}}, ["early_stopping_anneal_steps needs", "early_stopping_patience"]),
    ({"tracking": {"parent_run_id": "not-a-run"}}, ["parent_run_id", "32 hex"]),
    ({"tracking": {"registered_model": "  "}}, ["registered_model"]),
    ({"tracking": {"registered_model": "it's"}}, ["registered_model", "quotes"]),
    ({"tracking": {"enabled": False, "registered_model": "m"}}, ["registered_model needs tracking.enabled"]),
])
def test_bad_adaptation_config_fails_naming_the_key(sections, expected):
    with pytest.raises(ConfigError) as err:
        cfg_with(sections)
    for text in expected:
        assert text in str(err.value)


# --- heads and backbone ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, heads", [("egnn", {"energy_head"}), ("gns", {"energy_head", "force_head"}),
                                         ("forcenet", {"energy_head", "force_head"})])
def test_every_model_names_its_heads(name, heads):
    from pretrain.models import build_model

    model = build_model(name, {"cutoff": 3.0})
    backbone, head = split_names(model)
    assert {n.split(".")[0] for n in head} == heads
    assert "species_embedding.weight" in backbone and not backbone & head
    assert backbone | head == {n for n, _ in model.named_parameters()}
    before = params_of(model)
    torch.manual_seed(1)
    assert A.reinit_heads(model) == sum(before[n].numel() for n in head)
    after = params_of(model)
    assert all(torch.equal(before[n], after[n]) for n in backbone)
    assert all(not torch.equal(before[n], after[n]) for n in head if before[n].ndim > 1)


def test_lr_multipliers_give_each_part_its_groups_and_the_schedule_keeps_the_ratio():
    from finetune.loop import make_scheduler
    from pretrain.models import build_model

    cfg = cfg_with({"optim": {"lr": 2e-3, "warmup_steps": 3, "min_lr": 1e-5, "schedule": "cosine"},
                    "adapt": {"backbone_lr_mult": 0.1, "head_lr_mult": 5.0}, "train": {"max_steps": 10}})
    model = build_model("gns", {"cutoff": 3.0})
    groups = A.optimizer_groups(model, cfg.optim, cfg.adapt)
    backbone, head = split_names(model)
    ids = {id(p): n for n, p in model.named_parameters()}
    in_groups = [ids[id(p)] for g in groups for p in g["params"]]
    assert sorted(in_groups) == sorted(ids.values())                 # each parameter exactly once
    for g in groups:
        names = {ids[id(p)] for p in g["params"]}
        assert names <= (head if g["part"] == "head" else backbone)
        assert g["lr"] == pytest.approx(2e-3 * (5.0 if g["part"] == "head" else 0.1))
        assert g["weight_decay"] == (0.0 if all(p.ndim <= 1 for p in g["params"])
                                     or "species_embedding.weight" in names else cfg.optim.weight_decay)
    assert {g["part"] for g in groups} == {"head", "backbone"}

    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr)
    scheduler = make_scheduler(cfg, optimizer)
    seen = set()
    for _ in range(10):
        lrs = {g["part"]: g["lr"] for g in optimizer.param_groups}
        assert lrs["head"] / lrs["backbone"] == pytest.approx(50.0)
        seen.add(round(lrs["head"], 12))
        optimizer.step()
        scheduler.step()
    assert len(seen) >= 5, "the schedule did change the learning rates"


def test_an_early_stop_anneals_the_lr_from_where_it_is_to_min_lr_then_ends():
    from finetune.loop import make_scheduler

    cfg = cfg_with({"optim": {"lr": 1e-3, "warmup_steps": 0, "min_lr": 1e-5, "schedule": "cosine"},
                    "train": {"max_steps": 100, "early_stopping_patience": 1, "early_stopping_anneal_steps": 10}})
    stopper = A.EarlyStopping(1, 0, anneal_steps=10)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    scheduler = make_scheduler(cfg, optimizer, stopper)
    lrs = {}
    for step in range(1, 61):
        optimizer.step()
        scheduler.step()
        lrs[step] = optimizer.param_groups[0]["lr"]
        if step == 40:
            assert lrs[40] == pytest.approx(1e-3 * cfg.optim.lr_multiplier(40, 100))   # the schedule until here
            assert stopper.should_stop(improved=True, step=40) is False and stopper.end_step(100) == 100
            assert stopper.should_stop(improved=False, step=40) is False   # criterion met: anneal, do not stop
            assert stopper.fired_at == 40 and stopper.end_step(100) == 50
    tail = [lrs[s] for s in range(40, 51)]
    assert all(a > b for a, b in zip(tail, tail[1:])), "the tail decays monotonically"
    assert lrs[50] == pytest.approx(1e-5) and lrs[60] == pytest.approx(1e-5)   # min_lr at the end, and after
    assert lrs[45] == pytest.approx(1e-5 + (lrs[40] - 1e-5) * 0.5)            # half-way down the half-cosine
    assert stopper.should_stop(improved=False, step=50) is False               # the tail is never cut short
    late = A.EarlyStopping(1, 0, anneal_steps=10)
    late.should_stop(improved=False, step=95)
    assert late.end_step(100) == 100                                            # the cap still ends training


def test_backbone_is_bit_identical_while_frozen_and_trains_after(water_shards, init, tmp_path,
                                                                  monkeypatch):
    from finetune.loop import run_finetune

    snapshots: dict[int, dict] = {}

    class Recording(A.BackboneFreeze):
        def __init__(self, model, steps):
            super().__init__(model, steps)
            self.model = model

        def before_step(self, step):
            snapshots[step] = params_of(self.model)    # the weights after step - 1
            super().before_step(step)

    monkeypatch.setattr(A, "BackboneFreeze", Recording)
    frozen_for = 3
    results = run_finetune(cfg_with(where(water_shards, tmp_path / "run"), {"init": str(init)}, LEARNS, SHORT,
                                    {"train": {"max_steps": 6}, "adapt": {"freeze_backbone_steps": frozen_for}}))
    start = exported_params(init)
    backbone, head = split_names(_model_for(init))
    for step in range(1, frozen_for + 2):             # after steps 0..3: backbone untouched
        assert all(torch.equal(snapshots[step][n], start[n]) for n in backbone), f"backbone moved by step {step - 1}"
    assert any(not torch.equal(snapshots[2][n], start[n]) for n in head), "the head trained while frozen"
    moved = [n for n in backbone if not torch.equal(snapshots[frozen_for + 2][n], start[n])]
    assert moved, "the backbone did not train after the frozen steps"
    assert results["adapt"]["freeze_backbone_steps"] == frozen_for


def test_backbone_frozen_throughout_is_exported_unchanged(water_shards, init, tmp_path):
    from finetune.loop import run_finetune

    out = tmp_path / "run"
    results = run_finetune(cfg_with(where(water_shards, out), {"init": str(init)}, LEARNS, SHORT,
                                    {"train": {"max_steps": 6}, "adapt": {"freeze_backbone_steps": -1}}))
    assert results["best_step"] > 0, "head-only training improved nothing: the test shows nothing"
    start, final = exported_params(init), exported_params(out / "export")
    backbone, head = split_names(_model_for(init))
    assert all(torch.equal(start[n], final[n]) for n in backbone)
    assert any(not torch.equal(start[n], final[n]) for n in head)


def test_reinit_heads_redraws_the_heads_only(water_shards, init, tmp_path):
    from finetune.inputs import check_inputs
    from finetune.loop import make_model

    start = exported_params(init)
    backbone, head = split_names(_model_for(init))
    for reinit in (False, True):
        cfg = cfg_with(where(water_shards, tmp_path / "run"), {"init": str(init)},
                       {"adapt": {"reinit_heads": reinit}})
        model, _ = make_model(cfg, check_inputs(cfg))
        loaded = params_of(model)
        assert all(torch.equal(loaded[n], start[n]) for n in backbone)
        changed = {n for n in head if not torch.equal(loaded[n], start[n])}
        assert changed == (head if reinit else set())


def _export_without_oxygen(init):
    meta = json.loads((init / "model.json").read_text())
    (init / "model.json").write_text(json.dumps({**meta, "species": [1]}))
    return init


def test_elements_new_to_the_export_are_refused_naming_them(water_shards, init, tmp_path):
    from finetune.loop import run_finetune

    _export_without_oxygen(init)
    out = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        run_finetune(cfg_with(where(water_shards, out), {"init": str(init)}))
    assert "O (Z=8)" in str(err.value) and str(init) in str(err.value)
    assert "adapt.allow_new_species" in str(err.value)
    assert not out.exists(), "refused before anything was written"


def test_allowed_new_elements_get_fresh_embedding_rows(water_shards, init, tmp_path):
    from finetune.inputs import check_inputs
    from finetune.loop import make_model, run_finetune

    _export_without_oxygen(init)
    cfg = cfg_with(where(water_shards, tmp_path / "run"), {"init": str(init)}, SHORT,
                   {"adapt": {"allow_new_species": True}, "train": {"max_steps": 2}})
    inputs = check_inputs(cfg)
    assert inputs.new_species == [8]
    torch.manual_seed(0)
    model, _ = make_model(cfg, inputs)
    start = exported_params(init)["species_embedding.weight"]
    rows = model.species_embedding.weight.detach()
    assert not torch.equal(rows[8], start[8])
    keep = [z for z in range(rows.shape[0]) if z != 8]
    assert torch.equal(rows[keep], start[keep])
    assert 0.2 < rows[8].std().item() < 3.0, "drawn like nn.Embedding's N(0, 1)"

    results = run_finetune(cfg)
    assert results["adapt"]["new_species"] == [8]
    assert json.loads((tmp_path / "run" / "export" / "model.json").read_text())["species"] == [1, 8]


# --- early stopping ----------------------------------------------------------------------------------

def test_early_stopping_ends_training_and_records_where(water_shards, tmp_path):
    from finetune.loop import run_finetune

    out = tmp_path / "run"
    # lr 1e-12 moves no float32 weight: every validation equals step 0's, none is a new best
    frozen = {"optim": {"lr": 1e-12, "min_lr": 0.0, "schedule": "constant", "warmup_steps": 0},
              "train": {"max_steps": 20, "val_every": 2, "early_stopping_patience": 2}}
    results = run_finetune(cfg_with(where(water_shards, out), SHORT, frozen))
    assert [h["step"] for h in results["history"]] == [0, 2, 4]
    assert results["stopped_early"] is True and results["stopped_at_step"] == 4 and results["steps"] == 4
    assert results["max_steps"] == 20 and results["best_step"] == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["stopped_early"] is True and saved["stopped_at_step"] == 4

    late = run_finetune(cfg_with(where(water_shards, tmp_path / "late"), SHORT, frozen,
                                 {"train": {"early_stopping_min_steps": 8}}))   # stale from step 4, armed at 8
    assert [h["step"] for h in late["history"]] == [0, 2, 4, 6, 8] and late["stopped_at_step"] == 8

    full = run_finetune(cfg_with(where(water_shards, tmp_path / "full"), SHORT, frozen,
                                 {"train": {"max_steps": 6, "early_stopping_patience": None}}))
    assert [h["step"] for h in full["history"]] == [0, 2, 4, 6]
    assert full["stopped_early"] is False and full["stopped_at_step"] is None and full["steps"] == 6
    assert full["early_stop_step"] is None and full["anneal_steps"] == 0

    tail = run_finetune(cfg_with(where(water_shards, tmp_path / "tail"), SHORT, frozen,
                                 {"train": {"early_stopping_anneal_steps": 4}}))   # criterion at 4, 4 more steps
    assert [h["step"] for h in tail["history"]] == [0, 2, 4, 6, 8]
    assert tail["stopped_early"] is True and tail["early_stop_step"] == 4 and tail["anneal_steps"] == 4
    assert tail["steps"] == tail["stopped_at_step"] == 8 and tail["max_steps"] == 20
