"""The stand-in's settings and bookkeeping: devices, memory, streams and the stream-order check.

Settings come from the environment when cupy is imported and can be changed by a test:
  CUPY_STANDIN_DEVICES      visible devices (default 8)
  CUPY_STANDIN_MEMORY       bytes of "GPU memory" per process (default 16 GiB)
  CUPY_STANDIN_CUDA_AWARE   what MPI reports as its CUDA support: 1 (default) or 0

Streams. Work "runs" at once (NumPy), but each stream numbers what was issued on it and knows
up to which number the host has synchronised it. A buffer (one allocation, shared by its
views) remembers the stream and number of the work that last wrote it; allocating counts as a
write (a pool may hand out memory that queued work still uses). A pointer leaving for MPI, or
for NCCL on another stream, before that work is synchronised is a StreamOrderError, raised at
the call and kept in `violations` (an exception caught by library code is still reported).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

STANDIN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StreamOrderError(AssertionError):
    """A buffer left for MPI or NCCL before the stream work that wrote it was synchronised."""


@dataclass
class Settings:
    devices: int = int(os.environ.get("CUPY_STANDIN_DEVICES", "8"))
    memory: int = int(os.environ.get("CUPY_STANDIN_MEMORY", str(16 << 30)))
    cuda_aware: bool = os.environ.get("CUPY_STANDIN_CUDA_AWARE", "1").strip() not in ("0", "no", "false")
    device: int = 0  # the current device of this process
    used: int = 0  # bytes of live device allocations
    allow_sync: bool = True  # cupyx.allow_synchronize(False) turns host synchronisation into an error
    host_copies: int = 0  # device-to-host copies so far (get, asnumpy, float, ...)
    violations: list[str] = field(default_factory=list)


settings = Settings()


def caller() -> str:
    """file:line (function) of the innermost frame outside the stand-in."""
    f: Any = sys._getframe(1)
    while f is not None and f.f_code.co_filename.startswith(STANDIN_DIR):
        f = f.f_back
    if f is None:
        return "?"
    return f"{f.f_code.co_filename}:{f.f_lineno} ({f.f_code.co_name})"


def _report_at_exit() -> None:
    if settings.violations:
        sys.stderr.write(f"stand-in cupy: {len(settings.violations)} stream-order violation(s); the first: "
                         f"{settings.violations[0]}\n")
        sys.stderr.flush()
        os._exit(70)


atexit.register(_report_at_exit)


def violation(message: str) -> StreamOrderError:
    settings.violations.append(message)
    return StreamOrderError(message)


_deferred: list[str] = []


def defer(message: str) -> None:
    """A violation found where nothing can raise (a finaliser): raised by the next check."""
    if message in settings.violations:
        return
    settings.violations.append(message)
    _deferred.append(message)
    print(f"stand-in cupy: {message}", file=sys.stderr, flush=True)


def raise_deferred() -> None:
    if _deferred:
        message = _deferred.pop(0)
        raise StreamOrderError(message)


# ---- streams --------------------------------------------------------------------------------


class StreamState:
    """Issue and completion counters of one stream."""

    _next_ptr = 0x1000
    live: ClassVar[weakref.WeakValueDictionary[int, StreamState]] = weakref.WeakValueDictionary()

    def __init__(self, null: bool = False) -> None:
        self.issued = 0
        self.done = 0
        if null:
            self.ptr = 0
        else:
            StreamState._next_ptr += 0x10
            self.ptr = StreamState._next_ptr
        StreamState.live[self.ptr] = self

    def issue(self) -> int:
        self.issued += 1
        return self.issued

    def complete(self, upto: int | None = None) -> None:
        self.done = max(self.done, self.issued if upto is None else upto)

    def __repr__(self) -> str:
        return "the null stream" if self.ptr == 0 else f"stream 0x{self.ptr:x}"


NULL = StreamState(null=True)
_local = threading.local()


def current() -> StreamState:
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else NULL


def push(s: StreamState) -> None:
    if getattr(_local, "stack", None) is None:
        _local.stack = []
    _local.stack.append(s)


def pop() -> None:
    _local.stack.pop()


class DeviceSynchronized(RuntimeError):
    """The host waited for the device inside cupyx.allow_synchronize(False)."""


def host_waits(what: str) -> None:
    if not settings.allow_sync:
        raise DeviceSynchronized(f"{what} at {caller()} synchronises the host with the device")


def synchronize_all() -> None:
    host_waits("a device synchronisation")
    for s in list(StreamState.live.values()):
        s.complete()
    NULL.complete()


# ---- buffers --------------------------------------------------------------------------------


class Buffer:
    """One device allocation (its root NumPy array) and the work that last wrote it."""

    live: ClassVar[weakref.WeakSet[Buffer]] = weakref.WeakSet()

    def __init__(self, root: Any) -> None:
        from cupy.cuda.memory import OutOfMemoryError

        n = int(root.nbytes)
        if settings.used + n > settings.memory:
            raise OutOfMemoryError(n, settings.memory - settings.used)
        settings.used += n
        weakref.finalize(self, _release, n)
        self.root = root
        self.start = int(root.__array_interface__["data"][0])
        self.end = self.start + n
        self.stream = NULL
        self.seq = 0
        self.site = "?"
        Buffer.live.add(self)
        self.written()

    def written(self, stream: StreamState | None = None) -> None:
        self.stream = current() if stream is None else stream
        self.seq = self.stream.issue()
        self.site = caller()

    def ready_for(self, what: str, stream: StreamState | None = None, later: bool = False) -> None:
        """Raise unless the last write is synchronised (or queued on `stream`, if given);
        `later`: record it, to be raised by the next stand-in call (where the caller swallows)."""
        if not later:
            raise_deferred()
        if stream is self.stream or self.stream.done >= self.seq:
            return
        message = (f"{what} at {caller()}: the buffer was last written by work #{self.seq} on "
                   f"{self.stream} (at {self.site}), which the host has not synchronised")
        if later:
            defer(message)
            return
        raise violation(message)


def _release(n: int) -> None:
    settings.used -= n


def buffer_at(ptr: int) -> Buffer:
    for b in list(Buffer.live):
        if b.start <= ptr < b.end or (b.start == b.end == ptr):
            return b
    raise ValueError(f"no live device buffer holds address 0x{ptr:x}")
