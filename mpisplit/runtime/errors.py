"""Errors across ranks: fail on every rank together, or abort the job; never hang.

`agree(comm)` wraps code whose failure may differ between ranks (reading a file, checking a
shard): after the body every rank learns whether any rank raised, and then all raise the same
exception. `install_abort_on_exception()` is the opt-in last resort for uncaught exceptions.
"""

from __future__ import annotations

import fcntl
import os
import stat
import sys
import termios
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from mpi4py import MPI

# Exception types that cross ranks as themselves; any other becomes RuntimeError (a subclass
# becomes its nearest listed base, e.g. PermissionError -> OSError).
PORTABLE_EXCEPTIONS: dict[str, type[Exception]] = {
    t.__name__: t
    for t in (ValueError, TypeError, FileNotFoundError, OSError, KeyError, RuntimeError)
}


def _mpi_comm(comm: Any) -> Any:
    return getattr(comm, "mpi", comm)


def _portable_name(exc: BaseException) -> str:
    for t in type(exc).__mro__:
        if t.__name__ in PORTABLE_EXCEPTIONS and PORTABLE_EXCEPTIONS[t.__name__] is t:
            return t.__name__
    return "RuntimeError"


def _message(exc: BaseException) -> str:
    # KeyError's str() is the repr of its key; keep it (it names the key).
    return str(exc) or type(exc).__name__


@contextmanager
def agree(comm: Any) -> Iterator[None]:
    """Run the body; if it raised on any rank, raise on every rank. Collective over `comm`.

    The raised exception has the first failing rank's type (see PORTABLE_EXCEPTIONS) and the
    message "rank {r}: {message}", plus ", and N other ranks" when several failed. On the
    failing rank it is chained to the original. Its attribute `plain` is the message without
    the rank prefix when every rank raised the same, else None. `comm` is a Communicator or
    mpi4py comm; with one rank nothing is communicated.
    """
    mpi = _mpi_comm(comm)
    error: Exception | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - every failure must be agreed upon
        error = exc
    local = None if error is None else (_portable_name(error), _message(error))
    # Small metadata: lowercase (pickling) allgather.
    reports = [local] if mpi.Get_size() == 1 else mpi.allgather(local)
    failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
    if not failed:
        return
    first_rank, (name, message) = failed[0]
    text = f"rank {first_rank}: {message}"
    others = len(failed) - 1
    if others:
        text += f", and {others} other rank{'s' if others > 1 else ''}"
    agreed = PORTABLE_EXCEPTIONS[name](text)
    # The same error on every rank: command-line tools print `plain` without rank numbers.
    same_everywhere = len(failed) == len(reports) and all(rep == failed[0][1] for _, rep in failed)
    agreed.plain = message if same_everywhere else None  # type: ignore[attr-defined]
    raise agreed from error


def install_abort_on_exception(comm: Any = None) -> Callable[..., Any]:
    """Opt in: an uncaught exception prints its traceback once, prefixed "[rank r]", then
    calls MPI.COMM_WORLD.Abort(1), so the other ranks are killed instead of waiting forever in
    a collective. `comm` only chooses the rank shown (default the world rank). Returns the
    previous sys.excepthook.
    """
    rank = (MPI.COMM_WORLD if comm is None else _mpi_comm(comm)).Get_rank()
    previous = sys.excepthook
    state = {"handled": False}

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if state["handled"]:  # a failure while aborting: do not print again
            return
        state["handled"] = True
        lines = "".join(traceback.format_exception(exc_type, exc, tb)).splitlines()
        sys.stderr.write("".join(f"[rank {rank}] {line}\n" for line in lines))
        sys.stderr.flush()
        sys.stdout.flush()
        wait_for_reader(sys.stderr)
        MPI.COMM_WORLD.Abort(1)

    sys.excepthook = hook
    return previous


def wait_for_reader(stream: Any, limit: float = 2.0) -> None:
    """When `stream` is a pipe (as under mpiexec, whose proxy forwards what a rank writes), wait
    up to `limit` s until the reader has taken everything written to it. MPI_Abort kills the
    job at once, and a traceback still in the pipe would be lost with it."""
    try:
        fd = stream.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
        deadline = time.monotonic() + limit
        buf = bytearray(4)
        while time.monotonic() < deadline:
            fcntl.ioctl(fd, termios.FIONREAD, buf)
            if int.from_bytes(buf, sys.byteorder) == 0:
                break
            time.sleep(0.01)
        time.sleep(0.1)  # the reader's forwarding of what it took
    except (OSError, ValueError, AttributeError):
        return


def run_cli(main: Callable[[], int], errors: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError)) -> None:
    """Run a command-line entry point: a user error raised on every rank alike (agreed
    collectively) becomes one "error: ..." line from rank 0 and exit status 2, no traceback.
    An error whose class sets `per_rank = True` (ranks that disagree with each other) is printed
    by every rank, "[rank r] error: ...", since each rank's log may be read alone."""
    try:
        sys.exit(main())
    except errors as exc:
        rank = MPI.COMM_WORLD.Get_rank()
        if getattr(exc, "per_rank", False):
            print(f"[rank {rank}] error: {exc}", file=sys.stderr, flush=True)
        elif rank == 0:
            print(f"error: {getattr(exc, 'plain', None) or exc}", file=sys.stderr, flush=True)
        sys.exit(2)
