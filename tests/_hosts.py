"""Separate network hosts on one machine: Linux network namespaces joined by veth pairs to a bridge.

    with NetHosts(2) as hosts:                  # as root
        hosts.mpiexec(4, ["python", "train.py", ...], ppn=2)   # ranks 0-1 on host 1, 2-3 on host 2

Host i is the namespace `mpisplit-h{i}` (its own network stack: loopback and eth0 at
10.77.0.1{i}/24) with its own hostname (a UTS namespace per rank's launch), joined to the
bridge `mpisplit-br` (10.77.0.1, where mpiexec listens). MPICH's launcher starts each host's
proxy through `launch.sh` (tests/_hosts/launch.sh: `ip netns exec` instead of ssh), so the ranks of
different hosts can only reach one another over the veth links: TCP through the bridge, not
shared memory. `shape(rate)` limits every link with a token-bucket filter (`tc ... tbf`; this
kernel has no netem, so no latency can be added). Only the private 10.77.0.0/24 addresses made
here are ever used. One set of hosts exists at a time on a machine: a second `NetHosts` (another
test process, a benchmark) waits for the first to be removed (a lock file, LOCK).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from typing_extensions import Self


BRIDGE, PREFIX, SUBNET = "mpisplit-br", "mpisplit-h", "10.77.0"
LAUNCH = Path(__file__).with_name("_hosts") / "launch.sh"
LOCK = Path("/run/lock/mpisplit-nethosts.lock")
LOCK_WAIT_S = 600


def missing() -> str | None:
    """Why no namespaces can be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "unshare"):
        if not shutil.which(tool):
            return f"{tool} is not installed (iproute2, util-linux)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def address(i: int) -> str:
    return f"{SUBNET}.{10 + i}"


class NetHosts:
    """n network hosts (namespaces) on a bridge; removed on exit."""

    def __init__(self, n: int) -> None:
        if not 1 <= n <= 9:
            raise ValueError(f"1..9 hosts, got {n}")
        self.n = n

    def __enter__(self) -> Self:
        self._lock()
        try:
            self._make()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _make(self) -> None:
        self.remove()  # whatever an interrupted run left
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for i in range(1, self.n + 1):
            ns = f"{PREFIX}{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", f"{PREFIX}v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", f"{PREFIX}v{i}", "master", BRIDGE, "up")
            _ip("-n", ns, "addr", "add", f"{address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def __exit__(self, *exc: object) -> None:
        try:
            self.remove()
        finally:
            os.close(self._lock_fd)  # releases the lock

    def _lock(self) -> None:
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self._lock_fd)
                    raise TimeoutError(f"network hosts still in use by another process after {LOCK_WAIT_S} s ({LOCK})")
                time.sleep(0.5)

    def remove(self) -> None:
        for i in range(1, 10):
            _ip("netns", "del", f"{PREFIX}{i}", check=False)  # takes its end of the veth pair along
            _ip("link", "del", f"{PREFIX}v{i}", check=False)
        _ip("link", "del", BRIDGE, check=False)

    @property
    def hosts(self) -> list[str]:
        return [address(i) for i in range(1, self.n + 1)]

    def shape(self, rate: str | None) -> None:
        """Limit each host's link, both ways, to `rate` (tc syntax: 1gbit, 100mbit); None: no limit."""
        for i in range(1, self.n + 1):
            for where in ([], ["-n", f"{PREFIX}{i}"]):
                dev = "eth0" if where else f"{PREFIX}v{i}"
                subprocess.run(["tc", *where, "qdisc", "del", "dev", dev, "root"], capture_output=True, check=False)
                if rate is not None:
                    subprocess.run(["tc", *where, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                                    "burst", "256kb", "latency", "50ms"], capture_output=True, check=True, timeout=30)

    def link_bytes(self, i: int) -> int:
        """Bytes sent plus received on host i's link (the bridge side of its veth pair)."""
        stats = Path(f"/sys/class/net/{PREFIX}v{i}/statistics")
        return int((stats / "tx_bytes").read_text()) + int((stats / "rx_bytes").read_text())

    # MPICH's network module here is UCX, which tells machines apart by a system identity that the
    # namespaces share: left alone it would join two "hosts" by shared memory (sysv, cma). Between
    # nodes (ranks of one host still use MPICH's own shared memory) it must use TCP, as between
    # real machines; eth0 is each namespace's only link.
    ENV: ClassVar[dict[str, str]] = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "eth0"}

    def mpiexec_args(self, n: int, ppn: int) -> list[str]:
        """mpiexec's options for n ranks, ppn per host (host 1 first), launched into the namespaces."""
        if n > ppn * self.n:
            raise ValueError(f"{n} ranks do not fit {self.n} hosts x {ppn}")
        return ["-launcher", "ssh", "-launcher-exec", str(LAUNCH), "-iface", BRIDGE,
                "-hosts", ",".join(self.hosts), "-ppn", str(ppn), "-n", str(n)]

    def host_of(self, name: str) -> int:
        """The host number of a hostname that a rank reports (its namespace's)."""
        return int(name.removeprefix(PREFIX))
