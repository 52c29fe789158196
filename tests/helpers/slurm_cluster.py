"""A real single-host SLURM 22.05 cluster with virtual nodes for tests (recipe of shared/tools/slurm_local.sh).

Debian's slurm/munge packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x` into a
temporary folder (nothing installed, nothing under /etc); munged, slurmctld and one slurmd per virtual node
run on free ports with their state in that folder. `LocalSlurm.start()` raises `SlurmUnavailable` with the
reason when packages cannot be fetched or the daemons do not come up; `stop()` kills them by pid file.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers.net import free_ports

PACKAGES = ("libhwloc15", "liblua5.1-0", "libmunge2", "munge", "slurm-wlm-basic-plugins", "slurm-client",
            "slurmctld", "slurmd")


class SlurmUnavailable(RuntimeError):
    pass


class LocalSlurm:
    def __init__(self, nnodes: int = 2, cpus_per_node: int = 2):
        self.nnodes, self.cpus = nnodes, cpus_per_node
        self.root = Path(tempfile.mkdtemp(prefix="msl-"))  # short: the munge socket path must stay < 108 chars
        self.pkg = self.root / "root"
        self.plugins = self.pkg / "usr/lib/x86_64-linux-gnu/slurm-wlm"
        self.nodes = [f"n{i + 1}" for i in range(nnodes)]

    @property
    def env(self) -> dict[str, str]:
        """Environment for sbatch/srun/squeue (and for jobs, which inherit the submitter's)."""
        lib = f"{self.pkg}/usr/lib/x86_64-linux-gnu:{self.plugins}"
        old = os.environ.get("LD_LIBRARY_PATH")
        return dict(os.environ, PATH=f"{self.pkg}/usr/bin:{os.environ['PATH']}",
                    SLURM_CONF=str(self.root / "etc/slurm.conf"),
                    LD_LIBRARY_PATH=f"{lib}:{old}" if old else lib)

    def _fetch(self) -> None:
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise SlurmUnavailable("apt-get/dpkg-deb not available to fetch Debian's slurm packages")
        debs = self.root / "debs"
        debs.mkdir()
        proc = subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=300)
            proc = subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, capture_output=True, text=True,
                                  timeout=300)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"apt-get download {' '.join(PACKAGES)} failed: {proc.stderr.strip()[-500:]}")
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(self.pkg)], check=True, capture_output=True)

    def _write_conf(self, ctld_port: int, slurmd_port: int, node_ports: list[int]) -> None:
        r = self.root
        nodes = "\n".join(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} "
                          f"RealMemory=4000 State=UNKNOWN" for n, p in zip(self.nodes, node_ports))
        (r / "etc/slurm.conf").write_text(f"""ClusterName=maskpottest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge/run/munge.socket,cred_expire=10
CredType=cred/munge
PluginDir={self.plugins}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, *cmd: str) -> None:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{Path(cmd[0]).name} did not start: {(proc.stderr or proc.stdout).strip()[-500:]}")

    def start(self, timeout_s: float = 60) -> "LocalSlurm":
        r, sbin = self.root, self.pkg / "usr/sbin"
        self._fetch()
        for d in ("etc", "run", "state", "log", "munge/etc", "munge/run", "munge/log", "munge/lib",
                  *(f"spool/{n}" for n in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        for d in ("munge/etc", "munge/log", "munge/lib"):
            (r / d).chmod(0o700)
        key = r / "munge/etc/munge.key"
        self._daemon(str(sbin / "mungekey"), "-c", "-k", str(key))
        key.chmod(0o400)
        self._daemon(str(sbin / "munged"), "--force", "-S", f"{r}/munge/run/munge.socket", f"--key-file={key}",
                     f"--log-file={r}/munge/log/munged.log", f"--pid-file={r}/munge/run/munged.pid",
                     f"--seed-file={r}/munge/lib/munged.seed")
        ctld_port, slurmd_port, *node_ports = free_ports(2 + self.nnodes)
        self._write_conf(ctld_port, slurmd_port, node_ports)
        self._daemon(str(sbin / "slurmctld-wlm"), "-i")
        for n in self.nodes:
            self._daemon(str(sbin / "slurmd-wlm"), "-N", n, "-d", str(sbin / "slurmstepd-wlm"))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = self.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.split()
            if states and set(states) == {"idle"}:
                return self
            time.sleep(0.5)
        raise SlurmUnavailable(f"nodes not idle after {timeout_s} s: sinfo states {states}; logs in {r}/log")

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=120, **kw)

    def wait_for_jobs(self, job_ids: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.run(["squeue", "-h", "-j", ",".join(job_ids)], check=False).stdout.strip():
                return
            time.sleep(1)
        raise TimeoutError(f"jobs {job_ids} still queued/running after {timeout_s} s")

    def job_state(self, job_id: str) -> str:
        """Final state from slurmctld's memory (scontrol keeps finished jobs for MinJobAge = 300 s)."""
        out = self.run(["scontrol", "show", "job", job_id], check=False).stdout
        fields = dict(tok.split("=", 1) for tok in out.split() if "=" in tok)
        return f"{fields.get('JobState', 'UNKNOWN')} exit={fields.get('ExitCode', '?')}"

    def stop(self) -> None:
        """SIGTERM each daemon named in a pid file, wait (5 s at most) until it has exited, remove the state."""
        run = self.root / "run"
        pidfiles = [*run.glob("slurmd-*.pid"), run / "slurmctld.pid", self.root / "munge/run/munged.pid"]
        pids = []
        for f in pidfiles:
            try:
                pid = int(f.read_text().strip())
                os.kill(pid, 15)
                pids.append(pid)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Running and not a zombie (daemons are reparented; their exit may never be reaped here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
