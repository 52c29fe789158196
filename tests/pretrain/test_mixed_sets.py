"""Positions-only and mixed corpora, several shard sets streamed at once with per-set weights (exact resume),
and two-stage pretraining from an export (`--init`); bad inputs are one line and exit 2 before any work."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest

from data_shards.build import build_shards
from data_shards.config_io import load_config
from pretrain.checkpoint import TrainState
from pretrain.config import PretrainConfig
from pretrain.mixture import MixedBatches
from tests.helpers.shards import water_grid_frames

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "pretrain" / "tiny.yaml"


def shards(root: Path, name: str, labelled: int, unlabelled: int, seed: int, **kwargs) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    inputs = []
    for kind, n in (("lab", labelled), ("pos", unlabelled)):
        if n:
            path = root / f"{name}_{kind}.xyz"
            frames = water_grid_frames(n, seed + (kind == "pos"), kind == "lab", kwargs.pop("oxygen_only", False))
            ase.io.write(path, frames, format="extxyz")
            inputs.append(str(path))
    out = root / name
    build_shards(inputs, out, shard_size=4, split_fractions=(0.75, 0.25, 0.0), use_ray=False, progress=False,
                 require_labels=False, **kwargs)
    return out


class FakeLockstep:
    def __init__(self, name: str, epoch: int = 0, consumed: int = 0):
        self.name, self.epoch, self.consumed = name, epoch, consumed

    def next(self):
        self.consumed += 1
        return (self.name, self.consumed)

    def position(self):
        return self.epoch, self.consumed

    def close(self):
        pass


def test_mixed_batches_follow_the_weights_and_resume_exactly():
    mixed = MixedBatches([FakeLockstep("a"), FakeLockstep("b")], [3.0, 1.0], seed=4)
    drawn = [mixed.next() for _ in range(400)]
    share = sum(1 for name, _ in drawn if name == "a") / len(drawn)
    assert 0.68 < share < 0.82                               # weight 3:1 → 0.75
    again = MixedBatches([FakeLockstep("a"), FakeLockstep("b")], [3.0, 1.0], seed=4)
    first = [again.next() for _ in range(150)]
    state = TrainState(epoch=again.position()[0], batches_in_epoch=again.position()[1], sets=again.sets_state())
    resumed = MixedBatches([FakeLockstep("a", *state.sets[0]), FakeLockstep("b", *state.sets[1])], [3.0, 1.0],
                           seed=4, draws=state.batches_in_epoch)
    assert first + [resumed.next() for _ in range(250)] == drawn
    other = MixedBatches([FakeLockstep("a"), FakeLockstep("b")], [3.0, 1.0], seed=5)
    assert [other.next() for _ in range(50)] != drawn[:50]


def deepmd_positions_only(root: Path, n: int, seed: int) -> Path:
    """A DeePMD system with coordinates and boxes only (no energy.npy / force.npy)."""
    frames = water_grid_frames(n, seed, labelled=False)
    (root / "set.000").mkdir(parents=True)
    (root / "type_map.raw").write_text("O\nH\n")
    (root / "type.raw").write_text("\n".join("0" if z == 8 else "1" for z in frames[0].numbers) + "\n")
    np.save(root / "set.000" / "coord.npy", np.stack([a.get_positions().reshape(-1) for a in frames]))
    np.save(root / "set.000" / "box.npy", np.stack([a.cell.array.reshape(-1) for a in frames]))
    return root


def test_positions_only_and_mixed_corpora_are_valid_pretext_samples(tmp_path):
    pos_only = shards(tmp_path, "pos", 0, 12, seed=1)
    mixed = shards(tmp_path, "mixed", 8, 8, seed=3)
    system = deepmd_positions_only(tmp_path / "dp", 6, seed=5)
    deepmd = tmp_path / "dp_shards"
    build_shards([str(system)], deepmd, shard_size=4, split_fractions=(0.5, 0.5, 0.0), use_ray=False, progress=False,
                 require_labels=False)
    from data_shards.manifest import load_manifest
    from data_shards.stream import ShardStream
    from pretrain.loop import make_transform

    for path, samples in ((pos_only, 12), (mixed, 16), (deepmd, 6)):
        manifest = load_manifest(path)
        assert not manifest["labelled"] and manifest["totals"]["quarantined"] == 0
        assert sum(manifest["splits"][s]["samples"] for s in ("train", "val", "test")) == samples
    cfg = load_config(PretrainConfig, TINY, {"data": {"manifest_dir": str(pos_only)}})
    stream = ShardStream(pos_only, "train", 2, 3.5, transform=make_transform(cfg, 0))
    batch = next(iter(stream))
    assert int(batch.mask_flag.sum()) > 0                    # masked atoms flagged without any label


def test_bad_set_entries_name_the_setting():
    with pytest.raises(ValueError, match=r"data.sets\[1\] must be"):
        load_config(PretrainConfig, TINY, {"data": {"sets": [{"manifest_dir": "a"}, {"path": "b"}]}})
    with pytest.raises(ValueError, match=r"data.sets\[0\].weight must be a finite number > 0"):
        load_config(PretrainConfig, TINY, {"data": {"sets": [{"manifest_dir": "a", "weight": 0}]}})
    cfg = load_config(PretrainConfig, TINY, {"data": {"manifest_dir": "", "sets": [{"manifest_dir": "a"}]}})
    assert cfg.data.manifest_dir == "a"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maskpot.cli", "pretrain", "--config", str(TINY), *args],
                          check=False, capture_output=True, text=True, cwd=REPO)


def sets_override(*pairs) -> str:
    return "data.sets=" + json.dumps([{"manifest_dir": str(p), "weight": w} for p, w in pairs])


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mixed_sets")
    return shards(root, "labelled", 16, 0, seed=11), shards(root, "positions", 0, 16, seed=12)


def test_bad_inputs_exit_2_naming_the_setting(two_sets, tmp_path):
    labelled, positions = two_sets
    other_cutoff = shards(tmp_path, "cut", 0, 8, seed=13, stats_cutoff=4.0)
    no_h = shards(tmp_path, "noh", 0, 8, seed=14, oxygen_only=True)
    out = f"train.out_dir={tmp_path / 'run'}"
    cases = [
        (cli("--override", sets_override((labelled, 1), (other_cutoff, 1)), out), "stats_cutoff"),
        (cli("--override", sets_override((labelled, 1), (no_h, 1)), out), "lists no H"),
        (cli("--override", sets_override((labelled, 1), (positions, 1)), "objective.kind=supervised", out),
         "data.sets: objective.kind 'supervised'"),
    ]
    from pretrain.export import save_export
    from pretrain.models import build_model

    model = build_model("egnn", {"hidden": 8, "layers": 1, "cutoff": 3.5})
    save_export(model, tmp_path / "other", {"model": "egnn", "params": {"hidden": 8, "layers": 1, "cutoff": 3.5},
                                            "species": [1, 8],
                                            "normalisation": {"energy_scale": 1.0, "e0": {}}, "lineage": {}})
    cases.append((cli("--init", str(tmp_path / "other"), "--override", f"data.manifest_dir={labelled}", out),
                  "train.init"))
    for proc, expected in cases:
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and expected in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def run(out: Path, *overrides: str, init: str | None = None) -> int:
    import argparse

    from pretrain.cli import add_command

    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers())
    args = parser.parse_args(["pretrain", "--config", str(TINY), "--nproc", "2", *(["--init", init] if init else []),
                              "--override", f"train.out_dir={out}", "optim.decay_steps=10", *overrides])
    return args.func(args)


def losses(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


@pytest.mark.slow
def test_two_sets_resume_exactly_and_a_second_stage_records_both(two_sets, tmp_path):
    from pretrain.export import load_export

    labelled, positions = two_sets
    mix = sets_override((labelled, 1.0), (positions, 2.0))
    assert run(tmp_path / "full", mix, "train.max_steps=10") == 0
    full = losses(tmp_path / "full")
    assert sorted(full) == list(range(1, 11)) and all(math.isfinite(v) for v in full.values())
    assert run(tmp_path / "split", mix, "train.max_steps=6") == 0
    assert run(tmp_path / "split", mix, "train.max_steps=10") == 0       # resumes at step 6, per-set positions
    assert losses(tmp_path / "split") == full
    _, meta = load_export(tmp_path / "full" / "export")
    assert [s["weight"] for s in meta["lineage"]["data_sets"]] == [1.0, 2.0]
    # stage 2: the positions-only set, another objective and schedule, from stage 1's export
    assert run(tmp_path / "stage2", f"data.manifest_dir={positions}", "objective.kind=denoise", "optim.lr=5e-4",
               "train.max_steps=4", init=str(tmp_path / "full" / "export")) == 0
    _, meta2 = load_export(tmp_path / "stage2" / "export")
    assert meta2["lineage"]["pretrain_objective"] == "denoise"
    assert meta2["lineage"]["init_lineage"]["pretrain_objective"] == "mask"
    assert meta2["lineage"]["init_lineage"]["steps"] == meta["lineage"]["steps"]
    first = json.loads((tmp_path / "stage2" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
