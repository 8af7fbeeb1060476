"""Rank 0 tells every rank what the next engine iteration is: a fixed header, then a payload.

    header: int64 [op, payload bytes]    (buffer broadcast)
    payload: uint8 [payload bytes]       (buffer broadcast of UTF-8 JSON; only when non-empty)

Waiting is cheap on every rank. Rank 0 sends only when there is work, and waits for requests
on a Python queue. The other ranks wait in a non-blocking broadcast that they test with
growing sleeps in between (a blocking MPICH broadcast would spin a core at 100 % for as long
as the server is idle): about 50 tests a second once idle for a while, instant under load.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from mpi4py import MPI

IDLE, STEP, SHUTDOWN = 0, 1, 2
OP_NAMES = {IDLE: "idle", STEP: "step", SHUTDOWN: "shutdown"}

SPIN_S = 2e-4  # test without sleeping this long after a message (the next one is likely close)
MAX_SLEEP_S = 0.02


def wait_cheaply(request: MPI.Request, deadline: float | None = None) -> bool:
    """Complete `request`, sleeping between tests once it has been pending for SPIN_S; False
    (still pending) once time.monotonic() passes `deadline`."""
    start = time.perf_counter()
    sleep = 5e-5
    while not request.Test():
        if deadline is not None and time.monotonic() > deadline:
            return False
        if time.perf_counter() - start > SPIN_S:
            time.sleep(sleep)
            sleep = min(sleep * 2, MAX_SLEEP_S)
    return True


class ControlChannel:
    """Header and payload broadcasts from rank 0 over its own duplicate of `comm`."""

    def __init__(self, comm: Any) -> None:
        mpi = getattr(comm, "mpi", comm)
        self.comm = mpi.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._header = np.zeros(2, dtype=np.int64)

    def send(self, op: int, payload: dict | None = None) -> None:
        """Rank 0: broadcast op and payload (JSON-serialisable metadata)."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 sends on the control channel")
        if op not in OP_NAMES:
            raise ValueError(f"unknown control op {op}")
        data = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        if self.size == 1:
            return
        self._header[:] = (op, len(data))
        self.comm.Ibcast(self._header, root=0).Wait()
        if data:
            self.comm.Ibcast(np.frombuffer(data, dtype=np.uint8).copy(), root=0).Wait()

    def recv(self, deadline: float | None = None) -> tuple[int, dict | None] | None:
        """Ranks > 0: the next (op, payload), waiting without keeping a core busy; None when no
        header came by `deadline` (time.monotonic(); the job is then to be ended)."""
        if self.rank == 0:
            raise RuntimeError("rank 0 does not receive on the control channel")
        if not wait_cheaply(self.comm.Ibcast(self._header, root=0), deadline):
            return None
        op, nbytes = int(self._header[0]), int(self._header[1])
        if op not in OP_NAMES or nbytes < 0:
            raise RuntimeError(f"corrupt control header {self._header.tolist()}")
        if nbytes == 0:
            return op, None
        buf = np.empty(nbytes, dtype=np.uint8)
        wait_cheaply(self.comm.Ibcast(buf, root=0))
        return op, json.loads(buf.tobytes().decode())

    def free(self) -> None:
        self.comm.Free()
