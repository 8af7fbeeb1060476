"""JobGuard: stop requests, per-step agreement, failure consensus and the watchdog of one job.

At each step, one Allreduce(MAX) of three numbers on a communicator of its own (so the
library's per-step collective counters stay exact): the signal any rank received, whether any
rank saw a non-finite loss or gradient norm, and rank 0's seconds since the last save (one
clock for every rank). Every rank gets the same `StepDecision`: all stop, save or halt
together. `failed_everywhere()` tells an error raised on every rank (exit cleanly) from one
raised on a single rank (abort, or the others wait forever).
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

from mpisplit.runtime.faults.common import (
    DEFAULT_SIGNALS,
    _mpi,
)
from mpisplit.runtime.faults.signals import StopRequest
from mpisplit.runtime.faults.watchdog import Watchdog


@dataclass(frozen=True)
class StepDecision:
    """What every rank does after a step, identical on all ranks."""

    signum: int  # a signal some rank received (0: none): save at this step and stop
    nonfinite: bool  # some rank saw a non-finite loss or gradient norm: stop without saving
    save_due: bool  # the save interval has elapsed on rank 0's clock

    @property
    def stop(self) -> bool:
        return self.signum != 0

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


class JobGuard:
    """Stop requests, per-step agreement, failure consensus and the watchdog of one job.

    Collective over `comm` (it duplicates it twice: one communicator for the step agreement,
    one for `failed_everywhere`). Installs the signal handlers of `signals` (empty: none).
    `save_every_seconds` > 0 makes `agree()` report `save_due` once that many seconds passed
    on rank 0's clock since the last `saved()`. `pending_signal`: a signal the program caught
    before this guard existed (it counts as received).
    """

    def __init__(
        self,
        comm: Any,
        *,
        save_every_seconds: float = 0.0,
        signals: Sequence[str] = DEFAULT_SIGNALS,
        pending_signal: int = 0,
    ) -> None:
        mpi = _mpi(comm)
        self.rank, self.size = mpi.Get_rank(), mpi.Get_size()
        self.control = mpi.Dup()
        self.failure = mpi.Dup()
        self.save_every_seconds = save_every_seconds
        self.stop_request = StopRequest(signals) if signals else None
        if self.stop_request is not None and pending_signal:
            self.stop_request.signum = pending_signal  # received before the handlers were installed
        self.watchdog: Watchdog | None = None
        self._last_save = time.monotonic()
        self._closed = False

    @property
    def signum(self) -> int:
        return self.stop_request.signum if self.stop_request is not None else 0

    def agree(self, step: int, *, finite: bool = True) -> StepDecision:
        """One Allreduce(MAX) of [signal, non-finite flag, rank 0's seconds since the last save]
        on the control communicator (nothing on one rank). Collective; also a watchdog beat."""
        since_save = time.monotonic() - self._last_save if self.rank == 0 else 0.0
        vals = np.array([float(self.signum), 0.0 if finite else 1.0, since_save], dtype=np.float64)
        if self.size > 1:
            self.control.Allreduce(MPI.IN_PLACE, vals, op=MPI.MAX)
        self.beat(step)
        due = self.save_every_seconds > 0 and vals[2] >= self.save_every_seconds
        return StepDecision(signum=int(vals[0]), nonfinite=bool(vals[1]), save_due=bool(due))

    def saved(self) -> None:
        """A checkpoint was just written: restart the save interval."""
        self._last_save = time.monotonic()

    def start_watchdog(self, folder: str | os.PathLike, timeout: float, step: int = 0) -> None:
        """Start the collective timeout (timeout <= 0: off). Collective (agrees on a run id)."""
        if timeout <= 0:
            return
        run_id = self.control.bcast(secrets.token_hex(8) if self.rank == 0 else None, root=0)
        self.watchdog = Watchdog(
            folder, rank=self.rank, size=self.size, timeout=timeout, run_id=run_id
        )
        self.beat(step)

    def beat(self, step: int) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(step)

    def failed_everywhere(self, timeout: float = 5.0) -> bool:
        """Whether every rank calls this within `timeout` seconds (an Ibarrier polled with a
        deadline on a communicator used for nothing else). Call it when handling an error:
        True means every rank raised it (report and exit); False means some rank is elsewhere,
        probably blocked in a collective, and this rank must abort the job."""
        if self.size == 1:
            return True
        request = self.failure.Ibarrier()
        deadline = time.monotonic() + timeout
        while not request.Test():
            if time.monotonic() > deadline:
                return False  # the request stays pending: the caller aborts
            time.sleep(0.005)
        return True

    def close(self, free: bool = True) -> None:
        """Stop the watchdog, restore the signal handlers, free the communicators (collective
        when `free`)."""
        if self._closed:
            return
        self._closed = True
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.stop_request is not None:
            self.stop_request.restore()
        if free:
            self.control.Free()
            self.failure.Free()
