"""A serving job that loses a rank (a host, its link) ends, instead of hanging, within the
collective timeout (`mpisplit serve --collective-timeout`, seconds; 0: off).

Inside an engine step every rank is in the layers' collectives: the training watchdog
(runtime/faults/watchdog.py) samples each rank's main thread and ends the job when it has sat in
one MPI call for the timeout since the step began, naming the ranks it waits for (from the
heartbeat files, in a folder that all ranks should see: `--heartbeat-dir`; by default one under
this host's temporary folder, so each host's report names its own ranks only).

Between steps the ranks make no collective that could stall, so rank 0 asks for a sign of life
when it has sent nothing for a third of the timeout: an IDLE broadcast that every other rank
answers with a message to rank 0. Rank 0 ends the job when an answer is missing after the
timeout, naming the silent ranks and their hosts; a rank that has heard nothing from rank 0 for
the timeout ends it too. Ending it is MPI_Abort (the launcher stops every rank it can reach) and,
when the network to the launcher is gone as well, the process's own exit a little later.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from mpi4py import MPI

from mpisplit.runtime.faults.common import EXIT_WATCHDOG
from mpisplit.runtime.faults.watchdog import ABORT_GRACE_S, Watchdog

_PONG_TAG = 71


class Liveness:
    """The collective timeout of one serving job, over the control channel's communicator."""

    def __init__(self, comm: Any, timeout: float, folder: str | os.PathLike | None = None) -> None:
        self.comm, self.timeout = comm, float(timeout)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.hosts = comm.allgather(socket.gethostname())
        self.steps = 0
        self.last_contact = time.monotonic()
        self.watchdog = None
        self.folder: Path | None = None  # made here (removed at the end when empty)
        if not (self.timeout >= 0 and self.timeout != float("inf")):
            raise ValueError(f"--collective-timeout must be a number of seconds >= 0, got {timeout!r}")
        if self.timeout > 0 and self.size > 1:
            run_id = comm.bcast(secrets.token_hex(8) if self.rank == 0 else None, root=0)
            where = Path(folder) if folder is not None else Path(tempfile.gettempdir()) / f"mpisplit-serve-{run_id}"
            self.folder = None if folder is not None else where
            self.watchdog = Watchdog(where, rank=self.rank, size=self.size, timeout=self.timeout, run_id=run_id)

    @property
    def active(self) -> bool:
        return self.watchdog is not None

    def beat(self) -> None:
        """A step begins or ends (every rank)."""
        self.last_contact = time.monotonic()
        if self.watchdog is not None:
            self.steps += 1
            self.watchdog.beat(self.steps)

    def ping_due(self) -> bool:
        """Rank 0: nothing sent for a third of the timeout."""
        return self.active and time.monotonic() - self.last_contact >= self.timeout / 3

    def check(self, send_idle: Any) -> None:
        """Rank 0, idle: broadcast IDLE (`send_idle()`), then wait for every rank's answer."""
        send_idle()
        answers = [np.zeros(1, dtype=np.int64) for _ in range(self.size - 1)]
        requests = [self.comm.Irecv(a, source=r, tag=_PONG_TAG) for r, a in enumerate(answers, start=1)]
        deadline = time.monotonic() + self.timeout
        while not all(req.Test() for req in requests):
            if time.monotonic() > deadline:
                silent = [r for r, req in enumerate(requests, start=1) if not req.Test()]
                self.lost(f"rank 0 on {self.hosts[0]}: no answer for {self.timeout:g} s from "
                          + ", ".join(f"rank {r} on {self.hosts[r]}" for r in silent)
                          + " (lost host or link?); ending the job")
            time.sleep(0.01)
        self.beat()

    def answer(self) -> None:
        """Ranks > 0, on IDLE."""
        self.comm.Send(np.ones(1, dtype=np.int64), dest=0, tag=_PONG_TAG)
        self.last_contact = time.monotonic()

    def deadline(self) -> float | None:
        """Ranks > 0: when to give up waiting for rank 0's next word (monotonic), or None."""
        return time.monotonic() + self.timeout if self.active else None

    def silent_leader(self) -> None:
        self.lost(f"rank {self.rank} on {self.hosts[self.rank]}: nothing from rank 0 on {self.hosts[0]} for "
                  f"{self.timeout:g} s (lost host or link?); ending the job")

    def lost(self, message: str) -> None:
        print(f"mpisplit serve: collective timeout: {message}", file=sys.stderr, flush=True)
        threading.Timer(ABORT_GRACE_S, os._exit, args=(EXIT_WATCHDOG,)).start()
        MPI.COMM_WORLD.Abort(EXIT_WATCHDOG)
        os._exit(EXIT_WATCHDOG)

    def stop(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            if self.folder is not None:
                try:
                    self.folder.rmdir()  # the last rank to stop removes it
                except OSError:
                    pass
