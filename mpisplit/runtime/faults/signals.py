"""Stop requests: SIGTERM, SIGINT and SIGUSR1 handlers that only record the signal.

A batch system sends SIGUSR1 or SIGTERM when time is nearly up; a second SIGINT raises
KeyboardInterrupt (abort now)."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Any

from mpisplit.runtime.faults.common import (
    DEFAULT_SIGNALS,
)


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
