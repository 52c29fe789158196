"""The `maskpot` command as a user runs it: subprocesses, real Ray, DeepSpeed on 2 ranks, MLflow sqlite."""
import json
import os
import subprocess
import sys

import pytest

from data_shards.config_io import from_dict
from finetune.config import FinetuneConfig
from maskpot import demo
from maskpot.demo import SCALES
from pretrain.config import PretrainConfig
from tests.helpers.paths import REPO


def maskpot(*args, cwd=None, timeout=600):
    env = dict(os.environ, TQDM_DISABLE="1", DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", "maskpot.cli", *map(str, args)], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_command_and_units():
    out = maskpot("--help")
    assert out.returncode == 0
    for command in ("generate", "shards", "pretrain", "finetune", "demo"):
        assert command in out.stdout
    demo = maskpot("demo", "--help").stdout
    assert "--dft-water" in demo and "--scale" in demo


@pytest.mark.parametrize("args,needle", [
    (("pretrain", "--config", "no/such/file.yaml"), "config file not found: no/such/file.yaml"),
    (("finetune", "--config", "no/such/file.yaml"), "config file not found"),
    (("shards", "build", "no/such/input.extxyz", "--out", "x"), "no/such/input.extxyz"),
    (("demo", "--dft-water", "/no/such/dir", "--out", "{tmp}", "--scale", "tiny"), "/no/such/dir"),
])
def test_user_errors_are_one_line_not_tracebacks(tmp_path, args, needle):
    args = [a.replace("{tmp}", str(tmp_path / "demo")) for a in args]
    out = maskpot(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_config_key_is_rejected_with_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs" / "pretrain" / "tiny.yaml").read_text().replace("max_steps:", "max_stepz:"))
    out = maskpot("pretrain", "--config", bad)
    assert out.returncode == 2 and "max_stepz" in out.stderr and "max_steps" in out.stderr


@pytest.mark.slow
def test_demo_tiny_runs_the_whole_chain(tmp_path):
    from pretrain.export import FORMAT_VERSION

    out_dir = tmp_path / "demo"
    out = maskpot("demo", "--scale", "tiny", "--out", out_dir, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "| scratch " in out.stdout and "| pretrained " in out.stdout and "mlflow ui" in out.stdout
    results = json.loads((out_dir / "demo_results_tip3p.json").read_text())
    labelled = json.loads((out_dir / "shards" / "labelled_tip3p" / "manifest.json").read_text())
    for name in ("scratch", "pretrained"):
        test = results[name]["test"]
        # scored on the whole test split, and the printed table carries the recorded figures
        assert test["structures"] == labelled["splits"]["test"]["samples"] > 0
        assert test["energy_rmse_mev_per_atom"] > 0 and test["force_rmse_mev_per_a"] > 0
        row = next(line for line in out.stdout.splitlines() if line.startswith(f"| {name} "))
        energy, force = (float(cell) for cell in row.strip("|").split("|")[3:5])
        assert energy == pytest.approx(test["energy_rmse_mev_per_atom"], abs=0.005)
        assert force == pytest.approx(test["force_rmse_mev_per_a"], abs=0.05)
    manifest = json.loads((out_dir / "shards" / "corpus" / "manifest.json").read_text())
    tars = sorted(p.name for p in (out_dir / "shards" / "corpus").glob("shard-*.tar"))
    assert tars == sorted(s["name"] for s in manifest["shards"]) and len(tars) >= 2
    export = json.loads((out_dir / "pretrain" / "export" / "model.json").read_text())
    assert export["format_version"] == FORMAT_VERSION and "cutoff" not in export
    assert export["lineage"]["pretrain_objective"] == "mask"
    # the pretrained run really started from the export: its lineage names it
    lineage = json.loads((out_dir / "finetune_tip3p_pretrained" / "export" / "model.json").read_text())["lineage"]
    assert lineage.get("init_sha256")
    assert (out_dir / "mlflow.db").is_file()
    # a second invocation reuses every finished stage
    again = maskpot("demo", "--scale", "tiny", "--out", out_dir, cwd=tmp_path)
    assert again.returncode == 0 and "1/4" not in again.stdout and "| pretrained " in again.stdout


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_demo_configs_are_the_shipped_ones_with_the_scale_merged_in(scale, tmp_path):
    """configs/demo/*.yaml (package data) + the scale = valid Pretrain/FinetuneConfig mappings."""
    s = SCALES[scale]
    pre = from_dict(PretrainConfig, demo.pretrain_config(s, tmp_path / "corpus", tmp_path / "pretrain"))
    assert pre.objective.kind == "mask" and pre.train.max_steps == s.pretrain_steps and pre.model.params == s.model
    fine = from_dict(FinetuneConfig, demo.finetune_config(s, tmp_path / "labelled", tmp_path / "export",
                                                          tmp_path / "ft", "sqlite:///x.db", "tip3p-pretrained"))
    assert fine.data.train_frames == s.label_budget and fine.init == str(tmp_path / "export")
    assert fine.tracking.experiment == "maskpot-demo" and fine.train.val_every == s.val_every
