"""The collective timeout: heartbeats and a thread that names the ranks a stalled rank waits for.

Heartbeats are small JSON files `rank-NNNNN.json` in a folder every rank sees (train.py uses
`--out/.heartbeat`, where the checkpoints already need a shared filesystem): step reached,
seconds since the last progress, and where the main thread is (file:line, function, and
whether that line is an MPI call). A daemon thread samples the main thread's stack with
`sys._current_frames()`; mpi4py releases the GIL inside blocking MPI calls, so the thread runs
while the main thread waits.
"""

from __future__ import annotations

import json
import linecache
import math
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from mpi4py import MPI

from mpisplit.runtime.errors import wait_for_reader
from mpisplit.runtime.faults.common import (
    EXIT_WATCHDOG,
    format_ranks,
)

# A source line that calls into MPI (mpi4py buffer or pickle methods). When the main thread's
# innermost Python frame sits on such a line, the thread is inside that MPI call.
_MPI_CALL = re.compile(
    r"\.(?:I?(?:Allreduce|Allgatherv?|Alltoallv?|Bcast|Barrier|Reduce_scatter(?:_block)?|Reduce|"
    r"Gatherv?|Scatterv?|Scan|Exscan)|Send|Ssend|Recv|Sendrecv|Probe|Wait(?:all|any)?|"
    r"Split(?:_type)?|Dup|Create|allreduce|allgather|alltoall|bcast|barrier|gather|scatter|"
    r"reduce|send|recv|sendrecv|probe|wait)\s*\("
)


ABORT_GRACE_S = 10.0  # seconds MPI_Abort may take before a stalled rank exits by itself


def _short_path(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("mpisplit", "site-packages"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[i:])
    return "/".join(parts[-2:])


# Functions in which a thread waits for MPI calls that another thread makes (waits_for_mpi).
_MPI_WAITS: set[Any] = set()


def waits_for_mpi(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark `fn`: a thread inside it waits for MPI calls made by a helper thread (the overlapped
    gradient reduction), so the watchdog counts it as inside MPI."""
    _MPI_WAITS.add(fn.__code__)
    return fn


def _where(frame: Any) -> str:
    code, line = frame.f_code, frame.f_lineno
    if line is None:  # between two instructions of no line (CPython 3.11+ may say so): the function's first
        line = code.co_firstlineno
    return f"{_short_path(code.co_filename)}:{line} ({code.co_name})"


def thread_location(ident: int | None) -> tuple[str, bool]:
    """("file:line (function)", in_mpi) of the innermost Python frame of thread `ident` (or of the
    function marked waits_for_mpi that it is inside)."""
    frame = sys._current_frames().get(ident) if ident is not None else None
    if frame is None:
        return "(thread gone)", False
    code, line = frame.f_code, frame.f_lineno
    if line is None:
        line = code.co_firstlineno
    if _MPI_CALL.search(linecache.getline(code.co_filename, line)):
        return _where(frame), True
    outer: Any = frame
    while outer is not None:
        if outer.f_code in _MPI_WAITS:
            return _where(outer), True
        outer = getattr(outer, "f_back", None)
    return _where(frame), False


def _by_host(ranks: list[int], beats: dict[int, dict], me: int) -> str:
    """"0-1 on node-a, 2-3 on node-b": ranks grouped by the host of their heartbeat."""
    hosts: dict[str, list[int]] = {}
    for r in ranks:
        host = socket.gethostname() if r == me else str(beats.get(r, {}).get("host", "?"))
        hosts.setdefault(host, []).append(r)
    return ", ".join(f"{format_ranks(sorted(rs))} on {host}" for host, rs in hosts.items())


class Watchdog:
    """Collective timeout for one rank; see the module docstring.

    `beat(step)` (main thread) marks progress. Every `interval` seconds a daemon thread updates
    this rank's heartbeat file (at once when the step changed, always while stalled, else every
    `refresh` seconds). When the main thread has made no progress for `timeout` seconds and
    sits in an MPI call, the thread reports the missing ranks and calls `abort` (default
    MPI.COMM_WORLD.Abort(EXIT_WATCHDOG)). The lowest waiting rank reports first; the others
    wait `grace` seconds more, so that one message usually suffices.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        rank: int,
        size: int,
        timeout: float,
        run_id: str,
        abort: Callable[[], None] | None = None,
        stream: TextIO | None = None,
    ) -> None:
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(
                f"watchdog timeout must be a positive number of seconds, got {timeout!r}"
            )
        self.folder = Path(folder)
        self.rank, self.size, self.timeout, self.run_id = rank, size, timeout, run_id
        self.interval = min(max(timeout / 10, 0.1), 5.0)
        self.refresh = max(self.interval, min(timeout / 4, 60.0))
        self.grace = max(2.0, 2 * self.interval)
        self._abort = abort or self._abort_job
        self._stream = stream
        self._main = threading.main_thread().ident
        self._step = 0
        self._last_beat = time.monotonic()
        self._written: tuple[int, float] = (
            -1,
            -math.inf,
        )  # (step, monotonic time) of the last write
        self._write_error: str | None = None
        self._stop = threading.Event()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write(stalled=False)
        self._thread = threading.Thread(
            target=self._run, name=f"mpisplit-watchdog-{rank}", daemon=True
        )
        self._thread.start()

    def beat(self, step: int) -> None:
        self._step = step
        self._last_beat = time.monotonic()

    def stop(self, remove: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * self.interval + 1)
        if remove:
            try:
                self._path(self.rank).unlink()
            except OSError:
                pass

    def _path(self, rank: int) -> Path:
        return self.folder / f"rank-{rank:05d}.json"

    def _write(self, stalled: bool) -> None:
        where, in_mpi = thread_location(self._main)
        now, step = time.monotonic(), self._step
        record = {
            "run": self.run_id,
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "step": step,
            "idle": now - self._last_beat,
            "where": where,
            "in_mpi": in_mpi,
            "stalled": stalled,
            "time": time.time(),
        }
        path = self._path(self.rank)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(record), encoding="utf-8")
            os.replace(tmp, path)
            self._write_error = None
        except OSError as exc:  # a full or vanished folder must not stop training
            self._write_error = f"{path}: {exc}"
        self._written = (step, now)

    def _run(self) -> None:
        fired_at: float | None = None
        try:
            while not self._stop.wait(self.interval):
                now = time.monotonic()
                idle = now - self._last_beat
                stalled = idle >= self.timeout / 2
                step_changed = self._step != self._written[0]
                if stalled or now - self._written[1] >= (
                    self.interval if step_changed else self.refresh
                ):
                    self._write(stalled)
                if idle < self.timeout:
                    fired_at = None
                    continue
                where, in_mpi = thread_location(self._main)
                if not in_mpi:
                    continue  # busy outside MPI: the ranks waiting for this one report it
                fired_at = now if fired_at is None else fired_at
                report, lowest_waiting = self.report(idle, where)
                if lowest_waiting or now - fired_at >= self.grace:
                    self._emit(report)
                    self._abort()
                    return
        except Exception as exc:  # noqa: BLE001 - the watchdog must never kill a healthy job
            self._emit(f"[rank {self.rank}] watchdog stopped after an internal error: {exc!r}")

    def _abort_job(self) -> None:
        # MPI_Abort reaches the other ranks through the launcher; when this host has lost its
        # network, that path is gone too and Abort may never return: exit on our own after a while.
        threading.Timer(ABORT_GRACE_S, os._exit, args=(EXIT_WATCHDOG,)).start()
        wait_for_reader(self._stream or sys.stderr)  # the report reaches the launcher first
        MPI.COMM_WORLD.Abort(EXIT_WATCHDOG)

    def _emit(self, text: str) -> None:
        stream = self._stream or sys.stderr
        stream.write(text.rstrip("\n") + "\n")
        stream.flush()

    def read_heartbeats(self) -> dict[int, dict]:
        beats: dict[int, dict] = {}
        for r in range(self.size):
            try:
                record = json.loads(self._path(r).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("run") == self.run_id:
                beats[r] = record
        return beats

    def report(self, idle: float, where: str) -> tuple[str, bool]:
        """(message, whether this rank is the lowest of the ranks seen waiting in MPI)."""
        beats = self.read_heartbeats()
        now = time.time()
        silent_after = max(3 * self.interval, self.timeout / 2)
        waiting, missing = [self.rank], []
        details: list[str] = []
        for r in range(self.size):
            if r == self.rank:
                continue
            b = beats.get(r)
            if b is None:
                missing.append(r)
                details.append(f"    rank {r}: no heartbeat in {self.folder}")
                continue
            head = f"    rank {r} (host {b.get('host')}, pid {b.get('pid')}): after step {b.get('step')}"
            age = now - float(b.get("time", 0.0))
            if age > silent_after:
                missing.append(r)
                details.append(
                    f"{head}, silent for {age:.1f} s (dead, frozen, or folder not shared)"
                )
            elif b.get("in_mpi"):
                waiting.append(r)
            else:
                missing.append(r)
                idle_there = float(b.get("idle", 0.0))
                details.append(
                    f"{head}, outside MPI at {b.get('where')}, no progress for {idle_there:.1f} s"
                )
        lines = [
            (
                f"[rank {self.rank}] collective timeout: no progress for {idle:.1f} s "
                f"(--collective-timeout {self.timeout:g}) after step {self._step}; "
                f"this rank waits in MPI at {where}"
            ),
        ]
        if missing:
            lines.append(f"  missing ranks: {format_ranks(missing)}")
            lines += details
        elif len({(beats[r].get("step"), beats[r].get("where")) for r in waiting if r != self.rank}
                 | {(self._step, where)}) == 1:
            lines.append(f"  no rank is missing: every rank waits in the same MPI call after step {self._step}, so "
                         "their messages stopped arriving: a lost network link or host, or a stuck MPI transport")
        else:
            lines.append("  no rank is missing: every rank waits in MPI, at different steps or calls (mismatched "
                         "collectives?)")
        lines.append(f"  waiting ranks: {_by_host(waiting, beats, self.rank)}")
        if self._write_error:
            lines.append(f"  (could not write this rank's heartbeat: {self._write_error})")
        lines.append("  aborting the job")
        return "\n".join(lines), self.rank == min(waiting)
