"""A real single-host Slurm cluster for the tests: munged, slurmctld and slurmd on this machine.

    python tests/_slurm.py start DIR     # install (apt, as root) when missing, write DIR/slurm.conf, start
    python tests/_slurm.py stop DIR      # stop the daemons started from DIR

or, in a test, `with SlurmCluster(dir) as cluster:` (cluster.env: the environment whose
SLURM_CONF points at DIR/slurm.conf, for sbatch, squeue, scontrol, sacct and scancel).

Debian's `slurm-wlm` and `munge` (Slurm 22.05) are installed with apt when `sbatch` is missing
and this runs as root. The configuration is written for this machine: one node (this host's
name) with more CPUs than it has (SlurmdParameters=config_overrides: ranks oversubscribe the
cores, as everywhere in the tests), process tracking by /proc (no cgroups), MPI ranks started
by srun through PMI-2, finished jobs kept 10 minutes for scontrol, and every job's end written to
a job-completion file that `sacct --completion` reads (no accounting database). Ports, state,
spool and logs live under DIR, so a cluster of the tests never touches /etc/slurm.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self


PACKAGES = ("slurm-wlm", "munge")
MUNGE_KEY = Path("/etc/munge/munge.key")


def missing() -> str | None:
    """Why no Slurm cluster can be started here, or None."""
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed (slurm-wlm, munge) and cannot be installed here (needs root and apt-get)"
    return None


def install() -> None:
    """apt-get install slurm-wlm munge, when sbatch is missing (root only)."""
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], env=env, check=True,
                   capture_output=True, timeout=900)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) // 1024


def write_config(root: Path, cpus: int = 8) -> Path:
    host = socket.gethostname()
    ctld, slurmd = _free_ports(2)
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=mpisplit",
        # MPICH names a job's shared-memory segments after its job step; a step killed before
        # it removed them leaves /dev/shm/mpich_shm_* behind, which a later cluster's job with
        # the same id would attach to (its ranks then read each other's stale messages and fail
        # in MPI_Init). Job ids that no earlier cluster used avoid that.
        f"FirstJobId={10 + int(time.time()) % 10_000_000}",
        f"SlurmctldHost={host}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={ctld}",
        f"SlurmdPort={slurmd}",
        "AuthType=auth/munge",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SlurmdParameters=config_overrides",
        "MpiDefault=pmi2",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={root / 'jobcomp.txt'}",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "ReturnToService=2",
        "MinJobAge=600",
        "KillWait=30",
        "InactiveLimit=0",
        "SchedulerParameters=defer_batch=0",
        (f"NodeName={host} CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 "
         f"RealMemory={_memory_mb() // 2} State=UNKNOWN"),
        "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    return conf


class SlurmCluster:
    """munged (when not running), slurmctld and slurmd of `root`/slurm.conf; stopped on exit."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.started: list[subprocess.Popen] = []

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        install()
        self.root.mkdir(parents=True, exist_ok=True)
        write_config(self.root)
        self._munge()
        for daemon in ("slurmctld", "slurmd"):
            with open(self.root / f"{daemon}.stderr", "wb") as err:  # the child keeps its own copy
                self.started.append(subprocess.Popen([daemon, "-D", "-f", str(self.conf)], env=self.env,
                                                     stdout=subprocess.DEVNULL, stderr=err, start_new_session=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            for p in self.started:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}: {self.logs()}")
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm node did not come up within {timeout:.0f} s (sinfo: {state!r}): {self.logs()}")

    def _munge(self) -> None:
        self.munged_pid = None
        if subprocess.run(["munge", "-n"], capture_output=True, check=False).returncode == 0:
            return  # munged runs already (and is left running)
        if not MUNGE_KEY.exists():
            subprocess.run(["mungekey", "--create", "--force"], check=True, capture_output=True)
            shutil.chown(MUNGE_KEY, "munge", "munge")
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, capture_output=True)
        pid_file = Path("/run/munge/munged.pid")
        self.munged_pid = int(pid_file.read_text()) if pid_file.exists() else None

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.stderr", "slurmd.stderr"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self) -> None:
        for p in self.started:
            if p.poll() is None:
                p.terminate()
        for p in self.started:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.started = []
        if getattr(self, "munged_pid", None):
            try:
                os.kill(self.munged_pid, 15)  # the munged this cluster started
            except ProcessLookupError:
                pass
            self.munged_pid = None


if __name__ == "__main__":
    what, where = sys.argv[1], Path(sys.argv[2])
    cluster = SlurmCluster(where)
    if what == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
        for p in cluster.started:  # leave them running: stop with `kill` of the pids below
            print(f"# {p.args[0]} pid {p.pid}")
    else:
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            path = where / pid_file
            if path.exists():
                try:
                    os.kill(int(path.read_text()), 15)
                except (ValueError, ProcessLookupError):
                    pass
