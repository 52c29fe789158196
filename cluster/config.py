"""Cluster submission config: `slurm:`, `ray:` and `launch:` sections of one YAML file.

Stdlib + pyyaml only (cluster imports no other maskpot package), so the small dict → dataclass
helper lives here rather than in data_shards.config_io.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

TIME_FORMATS = "MINUTES, HH:MM:SS, D-HH:MM:SS or D-HH"
_TIME_PATTERNS = (
    re.compile(r"^\d+$"),                                   # minutes
    re.compile(r"^\d+:[0-5]\d$"),                           # MM:SS
    re.compile(r"^\d+:[0-5]\d:[0-5]\d$"),                   # HH:MM:SS
    re.compile(r"^\d+-\d+(:[0-5]\d(:[0-5]\d)?)?$"),         # D-HH, D-HH:MM, D-HH:MM:SS
)
_MEM_PATTERN = re.compile(r"^\d+[KMGT]?$")


class ClusterConfigError(ValueError):
    """A cluster YAML that cannot be used: the message names the file and the key."""


def _check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class SlurmConfig:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    ntasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem: str | None = None                 # e.g. 64G, 0 (= all of the node)
    time: str = "01:00:00"
    constraint: str | None = None
    exclusive: bool = False
    signal_before_walltime: int | None = 300   # seconds; USR1 to the batch shell, None: no signal
    requeue: bool = False
    cpu_only: bool = False                 # the partition has no GPUs: gpus_per_node must be 0
    cpus_per_node: int | None = None       # if known: nodes × tasks × cpus_per_task must fit
    job_name_prefix: str = "maskpot"
    extra_sbatch: list[str] = field(default_factory=list)   # verbatim lines, "#SBATCH " added if missing
    setup: list[str] = field(default_factory=list)          # verbatim shell lines (module load, exports)

    def __post_init__(self) -> None:
        for name in ("nodes", "ntasks_per_node", "cpus_per_task"):
            _check_positive(f"slurm.{name}", getattr(self, name))
        _check_positive("slurm.cpus_per_node", self.cpus_per_node, allow_none=True)
        if isinstance(self.gpus_per_node, bool) or not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 0:
            raise ValueError(f"slurm.gpus_per_node must be an integer >= 0, got {self.gpus_per_node!r}")
        self.time = str(self.time)
        if not any(p.match(self.time) for p in _TIME_PATTERNS):
            raise ValueError(f"slurm.time {self.time!r} is not a SLURM time; use one of {TIME_FORMATS}")
        if self.mem is not None:
            self.mem = str(self.mem)
            if not _MEM_PATTERN.match(self.mem):
                raise ValueError(f"slurm.mem {self.mem!r}: use a number with an optional K/M/G/T suffix, e.g. 64G")
        if self.cpu_only and self.gpus_per_node > 0:
            raise ValueError(f"slurm.gpus_per_node={self.gpus_per_node} but slurm.cpu_only is true "
                             f"(partition {self.partition!r} has no GPUs): set gpus_per_node: 0 or cpu_only: false")
        if self.gpus_per_node > 0 and self.ntasks_per_node > self.gpus_per_node:
            raise ValueError(f"slurm.ntasks_per_node={self.ntasks_per_node} ranks cannot fit on "
                             f"gpus_per_node={self.gpus_per_node} GPUs: one rank per GPU at most")
        if self.cpus_per_node is not None and self.ntasks_per_node * self.cpus_per_task > self.cpus_per_node:
            raise ValueError(f"slurm.ntasks_per_node × cpus_per_task = {self.ntasks_per_node} × {self.cpus_per_task} "
                             f"does not fit in cpus_per_node={self.cpus_per_node}")
        if self.signal_before_walltime is not None:
            _check_positive("slurm.signal_before_walltime", self.signal_before_walltime)
        if not re.match(r"^[A-Za-z0-9_.-]+$", self.job_name_prefix):
            raise ValueError(f"slurm.job_name_prefix {self.job_name_prefix!r}: letters, digits, _ . - only")
        for name in ("extra_sbatch", "setup"):
            lines = getattr(self, name)
            if not isinstance(lines, list) or not all(isinstance(s, str) and "\n" not in s for s in lines):
                raise ValueError(f"slurm.{name} must be a list of single-line strings")

    @property
    def total_tasks(self) -> int:
        return self.nodes * self.ntasks_per_node


@dataclass
class RayClusterConfig:
    head_port: int = 6379
    num_cpus: int | None = None            # per node; None: the task's cpus_per_task
    object_store_memory: int | None = None  # bytes per node; None: Ray's default
    temp_dir: str | None = None            # short path (unix socket names are limited to ~107 chars)
    wait_nodes_s: int = 300                # give up if not every node joined by then
    # extra `ray start` arguments of the worker nodes only, e.g. distinct ports and --temp-dir when several
    # SLURM nodes share one host (the tests' virtual nodes): --node-manager-port, --object-manager-port,
    # --min-worker-port/--max-worker-port, --dashboard-agent-listen-port, --metrics-export-port
    worker_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.worker_args, list) or not all(isinstance(a, str) for a in self.worker_args):
            raise ValueError(f"ray.worker_args must be a list of strings, got {self.worker_args!r}")
        port = self.head_port
        if isinstance(port, bool) or not isinstance(port, int) or not 1024 <= port <= 65535:
            raise ValueError(f"ray.head_port must be an integer in 1024..65535, got {self.head_port!r}")
        _check_positive("ray.num_cpus", self.num_cpus, allow_none=True)
        _check_positive("ray.object_store_memory", self.object_store_memory, allow_none=True)
        _check_positive("ray.wait_nodes_s", self.wait_nodes_s)


@dataclass
class LaunchConfig:
    run_dir: str = "runs/cluster"          # sbatch scripts, logs and jobs.json go here
    python: str = "python"                 # the interpreter of the environment with maskpot installed
    workdir: str | None = None             # cd here first (the repo, for relative config paths);
                                           # None: run_dir's cwd at submit
    preflight: bool = True                 # check inputs at submit time and imports on every node before the work
    pretrain_config: str | None = None
    pretrain_overrides: list[str] = field(default_factory=list)
    finetune_config: str | None = None
    finetune_overrides: list[str] = field(default_factory=list)
    finetune_init: str | None = None       # pretrain export folder passed as --init
    shards_inputs: list[str] = field(default_factory=list)   # INPUT arguments of `shards build`
    shards_out: str | None = None
    shard_size: int = 1000

    def __post_init__(self) -> None:
        if not self.run_dir or not self.python:
            raise ValueError("launch.run_dir and launch.python must be non-empty")
        _check_positive("launch.shard_size", self.shard_size)
        for name in ("pretrain_overrides", "finetune_overrides", "shards_inputs"):
            items = getattr(self, name)
            if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
                raise ValueError(f"launch.{name} must be a list of strings")
        bad = [o for o in self.pretrain_overrides + self.finetune_overrides if "=" not in o]
        if bad:
            raise ValueError(f"launch overrides must be KEY=VALUE, got {bad}")


@dataclass
class StageResources:
    """What one stage's job asks for; unset keys come from the stage's default (see `stage_slurm`)."""
    partition: str | None = None
    nodes: int | None = None
    ntasks_per_node: int | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str | None = None
    exclusive: bool | None = None
    constraint: str | None = None

    def __post_init__(self) -> None:
        if self.exclusive is not None and not isinstance(self.exclusive, bool):
            raise ValueError(f"exclusive must be true or false, got {self.exclusive!r}")


@dataclass
class StagesConfig:
    """Per-stage resources. Defaults: shards on CPUs only (no GPUs, not exclusive, slurm.nodes nodes, one
    task each); finetune on one GPU (if slurm has GPUs), one task, one node, not exclusive; pretrain: `slurm`."""
    shards: StageResources = field(default_factory=StageResources)
    pretrain: StageResources = field(default_factory=StageResources)
    finetune: StageResources = field(default_factory=StageResources)


@dataclass
class ClusterConfig:
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    ray: RayClusterConfig = field(default_factory=RayClusterConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)


def stage_defaults(s: SlurmConfig, stage: str) -> dict:
    """What a stage asks for unless `stages.<stage>` says otherwise."""
    if stage == "shards":   # Ray on CPUs: a GPU node held exclusively for it would sit idle
        return {"gpus_per_node": 0, "ntasks_per_node": 1, "exclusive": False, "mem": None}
    if stage == "finetune":  # one process on one GPU: never a whole node
        return {"nodes": 1, "ntasks_per_node": 1, "gpus_per_node": min(1, s.gpus_per_node), "exclusive": False,
                "mem": None}
    return {}


def stage_slurm(cfg: ClusterConfig, stage: str) -> SlurmConfig:
    """The effective SLURM settings of one stage's job: `slurm`, the stage's defaults, `stages.<stage>`."""
    chosen = {k: v for k, v in dataclasses.asdict(getattr(cfg.stages, stage)).items() if v is not None}
    try:
        return dataclasses.replace(cfg.slurm, **{**stage_defaults(cfg.slurm, stage), **chosen})
    except ValueError as e:
        raise ValueError(f"stages.{stage}: {e}") from e


def from_dict(cls, data, where: str = ""):
    """Build dataclass `cls` from a dict; nested dataclass fields recurse; unknown keys are an error."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where or 'top level'}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        ftype = fields[name].type
        nested = _DATACLASSES.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        kwargs[name] = from_dict(nested, value, f"{where}.{name}".lstrip(".")) if nested else value
    return cls(**kwargs)


_DATACLASSES = {c.__name__: c for c in (SlurmConfig, RayClusterConfig, LaunchConfig, StagesConfig, StageResources)}


def load_cluster_config(path) -> ClusterConfig:
    """Read a cluster YAML; any problem raises ClusterConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cluster config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
        cfg = from_dict(ClusterConfig, data)
        for stage in ("shards", "pretrain", "finetune"):
            stage_slurm(cfg, stage)  # each stage's effective settings are valid too
        return cfg
    except (ValueError, TypeError, yaml.YAMLError) as e:
        raise ClusterConfigError(f"{path}: {e}") from e
