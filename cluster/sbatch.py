"""Pure functions: ClusterConfig → sbatch script text, one per pipeline stage.

Stages run by module path (`python -m pretrain`, `python -m finetune`, `python -m data_shards shards
build`), so nothing here imports the packages it launches. Paths are written as given: `cluster.submit`
makes them absolute before rendering.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass

from cluster.config import ClusterConfig, stage_slurm

STAGES = ("shards", "pretrain", "finetune")
CHECKPOINTS_ON_USR1 = ("pretrain", "finetune")  # stages whose step checkpoints and exits 0 on SIGUSR1
PREFLIGHT_IMPORTS = {  # pretrain runs the distributed `python -m pretrain.preflight` instead
    "shards": ("data_shards.build", "ray"),
    "finetune": ("finetune.loop", "mlflow", "torch"),
}


@dataclass(frozen=True)
class StageScript:
    stage: str
    text: str
    after: str | None  # stage whose success this one waits for (sbatch --dependency=afterok:<its id>)


def _q(value: str) -> str:
    return shlex.quote(str(value))


def log_pattern(cfg: ClusterConfig) -> str:
    return f"{cfg.launch.run_dir}/logs/%x-%j.out"


def job_name(cfg: ClusterConfig, stage: str) -> str:
    return f"{cfg.slurm.job_name_prefix}-{stage}"


def _header(cfg: ClusterConfig, stage: str, purpose: str) -> list[str]:
    s = stage_slurm(cfg, stage)
    lines = ["#!/bin/bash", f"# maskpot {stage}: {purpose}",
             "# Rendered by `maskpot submit`; edit the cluster YAML, not this file.",
             f"#SBATCH --job-name={job_name(cfg, stage)}", f"#SBATCH --nodes={s.nodes}",
             f"#SBATCH --ntasks-per-node={s.ntasks_per_node}"]
    if s.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={s.gpus_per_node}")
    lines.append(f"#SBATCH --cpus-per-task={s.cpus_per_task}")
    for flag, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos),
                        ("constraint", s.constraint), ("mem", s.mem)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    lines.append(f"#SBATCH --time={s.time}")
    if s.exclusive:
        lines.append("#SBATCH --exclusive")
    if s.signal_before_walltime is not None:
        lines.append(f"#SBATCH --signal=B:USR1@{s.signal_before_walltime}")
    if s.requeue and stage in CHECKPOINTS_ON_USR1:
        lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]  # a requeued run appends to its log
    lines.append(f"#SBATCH --output={log_pattern(cfg)}")
    lines += [x if x.lstrip().startswith("#SBATCH") else f"#SBATCH {x.strip()}" for x in s.extra_sbatch]
    return lines


def _prologue(cfg: ClusterConfig, stage: str) -> list[str]:
    lines = ["set -euo pipefail"] + _walltime_trap(cfg, stage)
    if cfg.launch.workdir:
        lines.append(f"cd {_q(cfg.launch.workdir)}")
    if cfg.slurm.setup:
        lines += ["", "# setup (slurm.setup)"] + list(cfg.slurm.setup)
    lines += ["", f"PYTHON={_q(cfg.launch.python)}",
              'export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}',
              'echo "job $SLURM_JOB_ID on $SLURM_JOB_NODELIST ($SLURM_NNODES nodes), started $(date -Is)"']
    if cfg.launch.preflight and stage != "pretrain":  # pretrain runs the distributed preflight instead
        modules = " ".join(PREFLIGHT_IMPORTS[stage])
        lines += ["", "# preflight: the environment imports on every node before any real work starts",
                  'srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 '
                  f'"$PYTHON" -c \'import importlib, socket, sys; [importlib.import_module(m) for m in sys.argv[1:]]; '
                  f'print("preflight ok on", socket.gethostname())\' {modules}']
    return lines


def _walltime_trap(cfg: ClusterConfig, stage: str) -> list[str]:
    """Set first, before any srun: USR1's default action would kill the batch shell (and the job with it).

    Stages that checkpoint on SIGUSR1 get it forwarded to their step (srun passes it to every task); the
    job requeues itself once the step has exited 0. The shards build is not checkpointed: it is told and
    carries on until the walltime.
    """
    seconds = cfg.slurm.signal_before_walltime
    if seconds is None:
        return []
    if stage not in CHECKPOINTS_ON_USR1:
        return ["", "# walltime warning (USR1 to this shell): logged; without this trap USR1 would kill the job",
                f"on_walltime() {{ echo \"walltime in {seconds} s ($(date -Is)): the {stage} job is not "
                'checkpointed, it runs on until the walltime"; }', "trap on_walltime USR1"]
    return ["", "# walltime warning (USR1 to this shell): forwarded to the step, which checkpoints and exits 0",
            "WALLTIME=0 STEP=",
            f"on_walltime() {{ echo \"walltime in {seconds} s ($(date -Is)): checkpointing\"; "
            'WALLTIME=1; if [ -n "$STEP" ]; then kill -USR1 "$STEP" 2>/dev/null || true; fi; }',
            "trap on_walltime USR1"]


def _run_step(cfg: ClusterConfig, stage: str, command: str) -> list[str]:
    """Run `command` in the background so the USR1 walltime warning can be handled while it runs; a
    checkpointing stage that stopped on the warning requeues the job (slurm.requeue) to continue."""
    s = cfg.slurm
    lines = ["", f"{command} &", "STEP=$!",
             "# wait returns early (status > 128) when a trapped signal arrives: keep waiting for the step",
             'while true; do wait "$STEP" && rc=0 || rc=$?; kill -0 "$STEP" 2>/dev/null || break; done',
             'echo "finished with status $rc at $(date -Is)"']
    if s.signal_before_walltime is not None and stage in CHECKPOINTS_ON_USR1:
        after = ('echo "requeueing job $SLURM_JOB_ID: it continues from its checkpoint"; '
                 'scontrol requeue "$SLURM_JOB_ID"'
                 if s.requeue else 'echo "checkpoint written; no requeue configured (slurm.requeue)"')
        lines.append(f'if [ "$WALLTIME" = 1 ] && [ "$rc" = 0 ]; then {after}; fi')
    return lines + ["exit $rc", ""]


def _override_args(overrides: list[str]) -> str:
    return (" --override " + " ".join(_q(o) for o in overrides)) if overrides else ""


def _require(value, name: str, stage: str):
    if not value:
        raise ValueError(f"stage {stage!r} needs launch.{name} in the cluster config")
    return value


def render_pretrain(cfg: ClusterConfig) -> str:
    config = _require(cfg.launch.pretrain_config, "pretrain_config", "pretrain")
    lines = _header(cfg, "pretrain", "DeepSpeed masked pretraining, one task (rank) per GPU")
    lines += _prologue(cfg, "pretrain")
    if stage_slurm(cfg, "pretrain").gpus_per_node:
        lines += ["", "# NCCL over InfiniBand: set the interface names of your fabric (slurm.setup), e.g.",
                  "#   export NCCL_SOCKET_IFNAME=ib0  NCCL_IB_HCA=mlx5  NCCL_DEBUG=WARN"]
    lines += ["", "# cluster.launch maps SLURM_PROCID/NTASKS/LOCALID → RANK/WORLD_SIZE/LOCAL_RANK, MASTER_ADDR =",
              "# first host of the nodelist, MASTER_PORT from the job id. A requeued job resumes from its checkpoints."]
    overrides = _override_args(cfg.launch.pretrain_overrides)
    if cfg.launch.preflight:
        lines += ["", "# preflight on every rank: rendezvous, all-reduce, forward/backward on real batches, atoms/s",
                  f'srun --kill-on-bad-exit=1 "$PYTHON" -m cluster.launch "$PYTHON" -m pretrain.preflight '
                  f'--config {_q(config)}{overrides}']
    cmd = (f'srun --kill-on-bad-exit=1 "$PYTHON" -m cluster.launch "$PYTHON" -m pretrain '
           f'--config {_q(config)}{overrides}')
    return "\n".join(lines + _run_step(cfg, "pretrain", cmd))


def render_finetune(cfg: ClusterConfig) -> str:
    config = _require(cfg.launch.finetune_config, "finetune_config", "finetune")
    lines = _header(cfg, "finetune", "energy + force finetuning (one process); checkpoints on USR1, resumes")
    lines += _prologue(cfg, "finetune")
    cmd = f'srun --nodes=1 --ntasks=1 "$PYTHON" -m finetune --config {_q(config)}'
    if cfg.launch.finetune_init:
        cmd += f" --init {_q(cfg.launch.finetune_init)}"
    return "\n".join(lines + _run_step(cfg, "finetune", cmd + " --resume auto"
                                        + _override_args(cfg.launch.finetune_overrides)))


def render_shards(cfg: ClusterConfig) -> str:
    inputs = _require(cfg.launch.shards_inputs, "shards_inputs", "shards")
    out = _require(cfg.launch.shards_out, "shards_out", "shards")
    r = cfg.ray
    lines = _header(cfg, "shards", "Ray-on-SLURM conversion to WebDataset shards (one Ray node per SLURM node)")
    lines += _prologue(cfg, "shards")
    start_opts = [f"--num-cpus={r.num_cpus}" if r.num_cpus else '--num-cpus="$SLURM_CPUS_PER_TASK"']
    if r.object_store_memory:
        start_opts.append(f"--object-store-memory={r.object_store_memory}")
    if r.temp_dir:
        start_opts.append(f"--temp-dir={_q(r.temp_dir)}")
    opts = " ".join(start_opts)
    worker_opts = " ".join([o for o in start_opts if not (o.startswith("--temp-dir=") and any(
        a.startswith("--temp-dir") for a in r.worker_args))] + [_q(a) for a in r.worker_args])
    lines += [
        "", "# Ray head on the first node, one worker on each other node; `--block` keeps each srun step alive.",
        'mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        'HEAD=${NODES[0]}',
        'HEAD_IP=$(srun --nodes=1 --ntasks=1 -w "$HEAD" hostname --ip-address | awk \'{print $1}\')',
        f'RAY_ADDRESS_ARG="$HEAD_IP:{r.head_port}"',
        'STEPS=()',
        'stop_ray() { for p in "${STEPS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }',
        "trap stop_ray EXIT",
        f'srun --nodes=1 --ntasks=1 -w "$HEAD" "$PYTHON" -m ray.scripts.scripts start --head '
        f'--node-ip-address="$HEAD_IP" --port={r.head_port} {opts} --block &',
        'STEPS+=($!)',
        'if [ "$SLURM_NNODES" -gt 1 ]; then',
        '  sleep 5',
        '  srun --nodes=$((SLURM_NNODES - 1)) --ntasks=$((SLURM_NNODES - 1)) --ntasks-per-node=1 --exclude="$HEAD" \\',
        f'    "$PYTHON" -m ray.scripts.scripts start --address="$RAY_ADDRESS_ARG" {worker_opts} --block &',
        '  STEPS+=($!)',
        'fi',
        "", f"# wait (at most ray.wait_nodes_s = {r.wait_nodes_s} s) until every node has joined",
        "NODES_UP=0",
        f"for _ in $(seq 1 {max(1, r.wait_nodes_s // 5)}); do",
        '  NODES_UP=$("$PYTHON" -c \'import ray, sys; ray.init(address=sys.argv[1], logging_level="ERROR"); '
        'print(sum(n["Alive"] for n in ray.nodes()))\' "$RAY_ADDRESS_ARG" 2>/dev/null | tail -n 1) || NODES_UP=0',
        '  [ "${NODES_UP:-0}" -ge "$SLURM_NNODES" ] && break',
        "  sleep 5",
        "done",
        'if [ "${NODES_UP:-0}" -lt "$SLURM_NNODES" ]; then',
        '  echo "only ${NODES_UP:-0} of $SLURM_NNODES Ray nodes joined: giving up" >&2; exit 1',
        "fi",
        'echo "Ray cluster up: $NODES_UP nodes at $RAY_ADDRESS_ARG"',
        "", '"$PYTHON" -m data_shards shards build ' + " ".join(_q(i) for i in inputs)
        + f" --out {_q(out)} --shard-size {cfg.launch.shard_size}" + ' --ray-address "$RAY_ADDRESS_ARG"',
        'echo "finished at $(date -Is)"', "",
    ]
    return "\n".join(lines)


RENDERERS = {"shards": render_shards, "pretrain": render_pretrain, "finetune": render_finetune}


def render(cfg: ClusterConfig, stage: str) -> str:
    if stage not in RENDERERS:
        raise ValueError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")
    return RENDERERS[stage](cfg)


def pipeline_stages(cfg: ClusterConfig) -> list[str]:
    """The stages the config describes, in order: shards (if shards_inputs), pretrain, finetune."""
    present = {"shards": bool(cfg.launch.shards_inputs), "pretrain": bool(cfg.launch.pretrain_config),
               "finetune": bool(cfg.launch.finetune_config)}
    stages = [s for s in STAGES if present[s]]
    if not stages:
        raise ValueError("the cluster config names no stage: set launch.shards_inputs, launch.pretrain_config "
                         "and/or launch.finetune_config")
    return stages


def render_pipeline(cfg: ClusterConfig) -> list[StageScript]:
    """Scripts of the configured stages, each to be submitted with --dependency=afterok on the previous one."""
    stages = pipeline_stages(cfg)
    return [StageScript(s, render(cfg, s), stages[i - 1] if i else None) for i, s in enumerate(stages)]
