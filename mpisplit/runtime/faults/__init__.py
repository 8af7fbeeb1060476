"""Failure handling for MPI jobs: no hangs, no lost work. Each piece is usable alone.

signals.py      StopRequest: stop signals only set a flag, acted upon at a step boundary
guard.py        JobGuard: one small agreement per step (stop, save, non-finite), failure consensus
watchdog.py     the collective timeout: heartbeats, and a thread that names the missing ranks
consistency.py  configuration, code and data compared across ranks before training
injection.py    MPISPLIT_FAULT: injected failures for tests
"""

from mpisplit.runtime.faults.common import (
    DEFAULT_SIGNALS,
    EXIT_NONFINITE,
    EXIT_WATCHDOG,
    FAULT_ENV,
    format_ranks,
)
from mpisplit.runtime.faults.consistency import (
    ConsistencyError,
    check_consistent,
    code_digests,
    file_digests,
    text_digest,
)
from mpisplit.runtime.faults.guard import JobGuard, StepDecision
from mpisplit.runtime.faults.injection import FAULT_KINDS, Fault, FaultInjector, parse_faults
from mpisplit.runtime.faults.signals import StopRequest
from mpisplit.runtime.faults.watchdog import Watchdog, thread_location

__all__ = [
    "DEFAULT_SIGNALS",
    "EXIT_NONFINITE",
    "EXIT_WATCHDOG",
    "FAULT_ENV",
    "FAULT_KINDS",
    "ConsistencyError",
    "Fault",
    "FaultInjector",
    "JobGuard",
    "StepDecision",
    "StopRequest",
    "Watchdog",
    "check_consistent",
    "code_digests",
    "file_digests",
    "format_ranks",
    "parse_faults",
    "text_digest",
    "thread_location",
]
