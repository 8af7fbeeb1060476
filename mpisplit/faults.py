"""Failure handling for MPI jobs: no hangs, no lost work.

Pieces, each usable alone (train.py uses all of them):

- `StopRequest`: SIGTERM, SIGINT and SIGUSR1 (a batch system's "time is nearly up") handlers
  that only record the signal. A second SIGINT raises KeyboardInterrupt (abort now).
- `JobGuard`: at each step, one Allreduce(MAX) of three numbers on a communicator of its own
  (so the library's per-step collective counters stay exact): the signal any rank received,
  whether any rank saw a non-finite loss or gradient norm, and rank 0's seconds since the last
  save (one clock for every rank). Every rank gets the same `StepDecision`: all stop, save
  or halt together. `failed_everywhere()` tells an error raised on every rank (exit cleanly)
  from one raised on a single rank (abort, or the others wait forever).
- `Watchdog`: the collective timeout. A rank whose main thread has made no progress for
  `timeout` seconds while it waits inside an MPI call reads the other ranks' heartbeats, names
  the ranks that are missing (outside MPI, or silent) and calls MPI_Abort.
- `check_consistent`: before training, every rank compares its configuration, code and data
  with the others' (a hash all-gathered; the details only on a mismatch); a difference raises
  `ConsistencyError` on every rank, naming the ranks and the keys that differ.
- `FaultInjector`: a testing aid. The environment variable MPISPLIT_FAULT injects failures
  at chosen ranks and steps (see `parse_faults`).

Heartbeats are small JSON files `rank-NNNNN.json` in a folder every rank sees (train.py uses
`--out/.heartbeat`, where the checkpoints already need a shared filesystem): step reached,
seconds since the last progress, and where the main thread is (file:line, function, and
whether that line is an MPI call). A daemon thread samples the main thread's stack with
`sys._current_frames()`; mpi4py releases the GIL inside blocking MPI calls, so the thread runs
while the main thread waits.
"""

from __future__ import annotations

import hashlib
import json
import linecache
import math
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from mpi4py import MPI

FAULT_ENV = "MPISPLIT_FAULT"

# Exit statuses of train.py besides 0 (finished or stopped on a signal) and 2 (user error).
EXIT_NONFINITE = 3
EXIT_WATCHDOG = 124  # like timeout(1)

DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


def _mpi(comm: Any) -> Any:
    """The mpi4py communicator behind a Communicator (or the mpi4py comm itself)."""
    return getattr(comm, "mpi", comm)


def format_ranks(ranks: Iterable[int]) -> str:
    """Sorted ranks as ranges: [0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    out: list[str] = []
    items = sorted(set(ranks))
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out)


# ----------------------------------------------------------------------- fault injection

FAULT_KINDS = ("raise", "hang", "sleep", "kill", "signal", "nan", "inf")
_SIGNAL_NAMES = ("TERM", "INT", "USR1", "USR2", "HUP")


@dataclass(frozen=True)
class Fault:
    """One injected failure. `rank`/`step` None: every rank / every step.

    Step k is the k-th optimizer step (the "step" of metrics.jsonl); the fault fires before its
    forward pass (raise, hang, sleep, kill, signal) or right after its backward pass (nan, inf).
    """

    kind: str
    rank: int | None = None
    step: int | None = None
    seconds: float = 0.0  # sleep: how long
    sig: str = "TERM"  # signal: which one the rank sends itself
    target: str = "grad"  # nan/inf: "grad" (one gradient element, before the DP average) or "loss"
    error: str = "runtime"  # raise: RuntimeError ("runtime") or ValueError ("value")

    def applies(self, rank: int, step: int) -> bool:
        return (self.rank is None or self.rank == rank) and (self.step is None or self.step == step)


def _parse_int(key: str, value: str, part: str, minimum: int) -> int:
    try:
        n = int(value)
    except ValueError:
        n = minimum - 1
    if n < minimum:
        raise ValueError(
            f"{FAULT_ENV}: {key} must be an integer >= {minimum}, got {value!r} in {part!r}"
        )
    return n


def parse_faults(spec: str) -> list[Fault]:
    """Parse MPISPLIT_FAULT: faults separated by ';', each `KIND[@key=value,...]`.

        raise@rank=1,step=3        RuntimeError on rank 1 before step 3 (the others are then
                                   inside collectives waiting for it)
        raise@rank=1,step=3,error=value   the same with ValueError (a "user error" type)
        hang@rank=1,step=3         rank 1 sleeps forever before step 3
        sleep@seconds=0.05         every rank sleeps 50 ms before every step (a slow job)
        kill@rank=1,step=5         rank 1 sends itself SIGKILL before step 5
        signal@rank=0,step=4,sig=USR1   rank 0 sends itself SIGUSR1 before step 4
        nan@step=4                 NaN in one gradient element on every rank at step 4
        inf@rank=1,step=2,target=loss   rank 1's loss value becomes inf at step 2

    Keys: rank (>= 0), step (>= 1), seconds (sleep), sig (TERM INT USR1 USR2 HUP), target (grad
    or loss), error (runtime or value). A missing rank or step means every rank or every step.
    ValueError names a bad part.
    """
    faults: list[Fault] = []
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        kind, _, rest = part.partition("@")
        kind = kind.strip().lower()
        if kind not in FAULT_KINDS:
            raise ValueError(
                f"{FAULT_ENV}: unknown fault {kind!r} in {part!r}; kinds: {', '.join(FAULT_KINDS)}"
            )
        fields: dict[str, Any] = {}
        for item in (x.strip() for x in rest.split(",")):
            if not item:
                continue
            key, eq, value = (s.strip() for s in item.partition("="))
            if not eq or key in fields:
                raise ValueError(
                    f"{FAULT_ENV}: expected distinct key=value items, got {item!r} in {part!r}"
                )
            if key == "rank":
                fields[key] = _parse_int(key, value, part, 0)
            elif key == "step":
                fields[key] = _parse_int(key, value, part, 1)
            elif key == "seconds":
                try:
                    seconds = float(value)
                except ValueError:
                    seconds = -1.0
                if not (seconds >= 0 and math.isfinite(seconds)):
                    raise ValueError(
                        f"{FAULT_ENV}: seconds must be a number >= 0, got {value!r} in {part!r}"
                    )
                fields[key] = seconds
            elif key == "sig":
                name = value.upper().removeprefix("SIG")
                if name not in _SIGNAL_NAMES:
                    raise ValueError(
                        f"{FAULT_ENV}: sig must be one of {_SIGNAL_NAMES}, got {value!r} in {part!r}"
                    )
                fields[key] = name
            elif key in ("target", "error"):
                allowed = ("grad", "loss") if key == "target" else ("runtime", "value")
                if value not in allowed:
                    raise ValueError(
                        f"{FAULT_ENV}: {key} must be one of {allowed}, got {value!r} in {part!r}"
                    )
                fields[key] = value
            else:
                raise ValueError(
                    f"{FAULT_ENV}: unknown key {key!r} in {part!r}; keys: rank, step, seconds, sig, target, error"
                )
        if kind == "sleep" and not fields.get("seconds"):
            raise ValueError(f"{FAULT_ENV}: sleep needs seconds > 0, got {part!r}")
        faults.append(Fault(kind, **fields))
    return faults


def _hang() -> None:
    # The watchdog names this function in its report: the rank is alive but not in MPI.
    while True:
        time.sleep(1.0)


class FaultInjector:
    """Fires the faults of MPISPLIT_FAULT (or `faults`) that apply to `rank`. A testing aid:
    without the variable every method returns at once."""

    def __init__(self, faults: Sequence[Fault], rank: int) -> None:
        self.rank = rank
        self.faults = [f for f in faults if f.rank is None or f.rank == rank]

    @classmethod
    def from_env(cls, rank: int, environ: Mapping[str, str] | None = None) -> FaultInjector:
        spec = (os.environ if environ is None else environ).get(FAULT_ENV, "")
        return cls(parse_faults(spec), rank)

    def __bool__(self) -> bool:
        return bool(self.faults)

    def _due(self, step: int, kinds: tuple[str, ...]) -> list[Fault]:
        return [f for f in self.faults if f.kind in kinds and f.applies(self.rank, step)]

    def before_step(self, step: int) -> None:
        for f in self._due(step, ("sleep", "signal", "raise", "hang", "kill")):
            if f.kind == "sleep":
                time.sleep(f.seconds)
            elif f.kind == "signal":
                os.kill(os.getpid(), getattr(signal, "SIG" + f.sig))
            elif f.kind == "raise":
                error = ValueError if f.error == "value" else RuntimeError
                raise error(
                    f"injected fault ({FAULT_ENV}): rank {self.rank} raises before step {step}"
                )
            elif f.kind == "hang":
                _hang()
            elif f.kind == "kill":
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)

    def poison_grads(self, step: int, params: Iterable[Any]) -> None:
        """nan/inf with target=grad: the first element of the first gradient becomes it."""
        params = list(params)
        for f in self._due(step, ("nan", "inf")):
            if f.target == "grad":
                for p in params:
                    if p.grad is not None:
                        p.grad[(0,) * p.grad.ndim] = math.nan if f.kind == "nan" else math.inf
                        break

    def poison_loss(self, step: int, loss: float) -> float:
        for f in self._due(step, ("nan", "inf")):
            if f.target == "loss":
                loss = math.nan if f.kind == "nan" else math.inf
        return loss


# ------------------------------------------------------------------------ stop requests


class StopRequest:
    """Handlers for `signals` that record the first signal received (`signum`, 0: none).

    The program polls `signum` where stopping is safe. A second SIGINT raises KeyboardInterrupt
    at once. Install from the main thread; `restore()` puts the previous handlers back.
    """

    def __init__(self, signals: Sequence[str] = DEFAULT_SIGNALS) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}
        for name in signals:
            sig = getattr(signal, name, None)
            if sig is None:  # e.g. SIGUSR1 on Windows
                continue
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        if not self.signum:
            self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ----------------------------------------------------------------------------- watchdog

# A source line that calls into MPI (mpi4py buffer or pickle methods). When the main thread's
# innermost Python frame sits on such a line, the thread is inside that MPI call.
_MPI_CALL = re.compile(
    r"\.(?:I?(?:Allreduce|Allgatherv?|Alltoallv?|Bcast|Barrier|Reduce_scatter(?:_block)?|Reduce|"
    r"Gatherv?|Scatterv?|Scan|Exscan)|Send|Ssend|Recv|Sendrecv|Probe|Wait(?:all|any)?|"
    r"Split(?:_type)?|Dup|Create|allreduce|allgather|alltoall|bcast|barrier|gather|scatter|"
    r"reduce|send|recv|sendrecv|probe|wait)\s*\("
)


def _short_path(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("mpisplit", "site-packages"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[i:])
    return "/".join(parts[-2:])


def thread_location(ident: int | None) -> tuple[str, bool]:
    """("file:line (function)", in_mpi) of the innermost Python frame of thread `ident`."""
    frame = sys._current_frames().get(ident) if ident is not None else None
    if frame is None:
        return "(thread gone)", False
    code = frame.f_code
    in_mpi = bool(_MPI_CALL.search(linecache.getline(code.co_filename, frame.f_lineno)))
    return f"{_short_path(code.co_filename)}:{frame.f_lineno} ({code.co_name})", in_mpi


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
        self._abort = abort or (lambda: MPI.COMM_WORLD.Abort(EXIT_WATCHDOG))
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
        now = time.monotonic()
        record = {
            "run": self.run_id,
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "step": self._step,
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
        self._written = (record["step"], now)

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
        else:
            lines.append("  no rank is missing: every rank waits in MPI (mismatched collectives?)")
        lines.append(f"  waiting ranks: {format_ranks(waiting)}")
        if self._write_error:
            lines.append(f"  (could not write this rank's heartbeat: {self._write_error})")
        lines.append("  aborting the job")
        return "\n".join(lines), self.rank == min(waiting)


# ---------------------------------------------------------------------------- the guard


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


# --------------------------------------------------------------------------- consistency


class ConsistencyError(ValueError):
    """Ranks of one job disagree on configuration, code or data."""


def file_digests(
    paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None
) -> dict[str, str]:
    """{name: sha256 hex} of files; names relative to `root` (default: the file name)."""
    out: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        name = p.relative_to(root).as_posix() if root is not None else p.name
        out[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def code_digests(extra: Iterable[str | os.PathLike] = ()) -> dict[str, str]:
    """sha256 of every source file of the mpisplit package ("mpisplit/...py") and of `extra`
    files (by file name, e.g. the training script)."""
    pkg = Path(__file__).resolve().parent
    out = file_digests(sorted(pkg.rglob("*.py")), root=pkg.parent)
    out.update(file_digests(extra))
    return out


def text_digest(text: str | bytes) -> str:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


def _shown(value: Any) -> str:
    text = (
        value[:12]
        if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)
        else repr(value)
    )
    return text if len(text) <= 60 else text[:57] + "..."


_MISSING = "<absent>"


def check_consistent(comm: Any, **parts: Any) -> None:
    """Raise ConsistencyError on every rank unless every part is equal on all ranks. Collective.

    A part is a dict (compared key by key: the message names each key that differs and its
    value per group of ranks) or any JSON-serialisable value. One 64-byte all-gather when all
    agree; the parts themselves are gathered only to explain a mismatch.
    """
    mpi = _mpi(comm)
    blob = json.dumps(parts, sort_keys=True, default=repr)
    digest = hashlib.sha256(blob.encode()).hexdigest()
    if mpi.Get_size() == 1 or len(set(mpi.allgather(digest))) == 1:
        return
    everyone = mpi.allgather(json.loads(blob))
    problems: list[str] = []
    for name in parts:
        values = [e.get(name) for e in everyone]
        if isinstance(values[0], dict):
            keys = sorted({k for v in values if isinstance(v, dict) for k in v}, key=str)
            items = [
                (
                    f"{name} {k}",
                    [v.get(k, _MISSING) if isinstance(v, dict) else _MISSING for v in values],
                )
                for k in keys
            ]
        else:
            items = [(name, values)]
        for label, per_rank in items:
            groups: dict[str, list[int]] = {}
            for r, v in enumerate(per_rank):
                groups.setdefault(json.dumps(v, sort_keys=True), []).append(r)
            if len(groups) > 1:
                shown = "; ".join(
                    f"{_shown(json.loads(k))} on rank{'s' if len(rs) > 1 else ''} {format_ranks(rs)}"
                    for k, rs in groups.items()
                )
                problems.append(f"{label}: {shown}")
    raise ConsistencyError(
        "ranks of this job disagree (every rank must run the same configuration, code and data): "
        + " | ".join(problems)
    )
