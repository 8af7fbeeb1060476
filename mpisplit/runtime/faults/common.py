"""Exit statuses, the fault variable's name, stop-signal names and rank lists, shared by the
failure-handling pieces."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
