"""Each stage's job asks for what it uses: shards on CPUs (no GPU, not exclusive), finetune on one GPU of a
shared node, pretrain as `slurm:` says; every job that asks for --signal traps USR1 before its first srun."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.config import ClusterConfigError, load_cluster_config, stage_slurm
from cluster.sbatch import render

REPO = Path(__file__).resolve().parents[2]
GPU_SLURM = {"partition": "gpu", "nodes": 2, "ntasks_per_node": 4, "gpus_per_node": 4, "cpus_per_task": 8,
             "mem": "0", "exclusive": True, "signal_before_walltime": 120, "requeue": True}
LAUNCH = {"pretrain_config": "p.yaml", "finetune_config": "f.yaml", "shards_inputs": ["data"], "shards_out": "out"}


def load(tmp_path: Path, **sections):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"slurm": GPU_SLURM, "launch": LAUNCH, **sections}))
    return load_cluster_config(path)


def sbatch_lines(text: str) -> set[str]:
    return {line for line in text.splitlines() if line.startswith("#SBATCH")}


def test_default_stage_resources_fit_each_stage(tmp_path):
    cfg = load(tmp_path)
    shards, finetune, pretrain = (sbatch_lines(render(cfg, s)) for s in ("shards", "finetune", "pretrain"))
    assert not any("--gpus" in x or "--gres" in x for x in shards)
    assert "#SBATCH --exclusive" not in shards and "#SBATCH --mem=0" not in shards
    assert "#SBATCH --requeue" not in shards  # the build restarts from scratch: no self-requeue loop
    assert {"#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=1"} <= finetune
    assert "#SBATCH --exclusive" not in finetune and "#SBATCH --mem=0" not in finetune
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
            "#SBATCH --exclusive", "#SBATCH --mem=0", "#SBATCH --requeue"} <= pretrain


def test_stage_sections_override_and_are_validated(tmp_path):
    cfg = load(tmp_path, stages={"shards": {"partition": "cpu", "cpus_per_task": 32, "mem": "64G"},
                                 "finetune": {"time": "02:00:00", "exclusive": True}})
    shards = sbatch_lines(render(cfg, "shards"))
    assert {"#SBATCH --partition=cpu", "#SBATCH --cpus-per-task=32", "#SBATCH --mem=64G"} <= shards
    assert "#SBATCH --time=02:00:00" in sbatch_lines(render(cfg, "finetune"))
    assert stage_slurm(cfg, "finetune").exclusive is True
    with pytest.raises(ClusterConfigError, match=r"stages.finetune: slurm.ntasks_per_node=2 ranks cannot fit"):
        load(tmp_path, stages={"finetune": {"ntasks_per_node": 2}})
    with pytest.raises(ClusterConfigError, match=r"stages.shards: unknown key\(s\) \['gpus'\]"):
        load(tmp_path, stages={"shards": {"gpus": 1}})


@pytest.mark.parametrize("stage", ["shards", "pretrain", "finetune"])
def test_every_job_with_a_signal_survives_its_own_usr1(tmp_path, stage):
    text = render(load(tmp_path), stage)
    lines = text.splitlines()
    assert "#SBATCH --signal=B:USR1@120" in lines
    trap_at = lines.index("trap on_walltime USR1")
    assert trap_at < min(i for i, x in enumerate(lines) if x.lstrip().startswith("srun") or " srun " in x)
    # the trap as rendered, in a real bash: USR1 to the shell is handled, the shell lives on
    start = max(i for i in range(trap_at) if lines[i].startswith("# walltime warning"))
    script = "\n".join(lines[start:trap_at + 1] + ['kill -USR1 $$', 'sleep 0.2', 'echo "still running"'])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0 and "still running" in out.stdout and "walltime in 120 s" in out.stdout, out


def test_shards_without_the_trap_would_die_of_usr1():
    """The failure the trap prevents: bash's default action on USR1 ends the batch shell."""
    out = subprocess.run(["bash", "-c", 'kill -USR1 $$; sleep 0.2; echo "still running"'], capture_output=True,
                         text=True, timeout=30, check=False)
    assert out.returncode != 0 and "still running" not in out.stdout
