"""Session-wide test settings (CPU DeepSpeed, loopback Ray, quiet MLflow) and every fixture shared by more
than one test module. Session fixtures here are built once per run (`pytest --setup-plan` shows it)."""
import os
from pathlib import Path

import pytest
import yaml

# Set before any test imports deepspeed / ray / mlflow.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402 - after the environment above

from tests.helpers.finetuning import build_tip3p_shards  # noqa: E402
from tests.helpers.mlflow_server import start_mlflow_server, stop_mlflow_server  # noqa: E402
from tests.helpers.net import free_port  # noqa: E402
from tests.helpers.paths import SHARED_DATA  # noqa: E402
from tests.helpers.pretrain_processes import build_tiny_shards  # noqa: E402

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real DFT sets); tests that need it skip with the reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared DFT data not found at {SHARED_DATA} (set MASKPOT_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture
def one_torch_thread():
    """Tiny models: with 2 OpenMP threads on 2 busy cores they ran 6x slower than with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank process group in this process (DeepSpeed engines need one); torn down after the module."""
    import deepspeed.comm
    import torch.distributed as dist

    from pretrain.engine import init_distributed

    saved = {k: os.environ.get(k) for k in RANK_VARIABLES}
    for k in saved:
        os.environ.pop(k, None)
    assert init_distributed() == (0, 1)
    yield
    # through deepspeed.comm, which also drops DeepSpeed's cached groups: another module can init again
    deepspeed.comm.destroy_process_group()
    assert not dist.is_initialized()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """16 train frames in 4 shards, 8 val frames in 2 shards: every rank of 2 gets whole shards."""
    return build_tiny_shards(tmp_path_factory.mktemp("pretrain_shards"))


@pytest.fixture(scope="session")
def water_shards(tmp_path_factory) -> Path:
    """40 flexible-TIP3P frames of 8 H2O (OpenMM): 24 train / 8 val / 8 test, 8 frames per shard."""
    return build_tip3p_shards(tmp_path_factory.mktemp("ft_water"), (0.6, 0.2, 0.2))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port for the whole session; yields its URI."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_mlflow_server(proc)


@pytest.fixture
def pretrain_configs(monkeypatch) -> dict:
    """Pretrainings are not run: each one's config is recorded (by run folder name) and an export written;
    nor is the study's TIP3P corpus generated (its shard folder is named as if it were)."""
    import maskpot.study.pretraining
    import pretrain.cli

    configs = {}

    def fake_pretrain(args):
        config = yaml.safe_load(Path(args.config).read_text())
        out = Path(config["train"]["out_dir"])
        configs[out.name] = config
        (out / "export").mkdir(parents=True)
        (out / "export" / "model.json").write_text("{}")
        return 0

    monkeypatch.setattr(pretrain.cli, "run", fake_pretrain)
    monkeypatch.setattr(maskpot.study.pretraining, "stage_corpus", lambda cfg, out: Path(out) / "shards" / "corpus")
    return configs
