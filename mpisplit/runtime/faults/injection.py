"""A testing aid: MPISPLIT_FAULT injects failures at chosen ranks and steps (see `parse_faults`)."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mpisplit.runtime.faults.common import (
    FAULT_ENV,
)

FAULT_KINDS = ("raise", "hang", "sleep", "kill", "signal", "nan", "inf")
_SIGNAL_NAMES = ("TERM", "INT", "USR1", "USR2", "HUP")
# nan/inf: grad or loss. raise: before the step (default), or inside one serving request's
# work at that engine step: "sample" (choosing its token, on the ranks named), "text" (rank 0's
# detokenizing and stop matching).
TARGETS = ("grad", "loss", "sample", "text")


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
        raise@step=3,target=sample   a server's sampling raises at engine step 3 (every rank)
        raise@rank=0,step=3,target=text  rank 0's text work for a request raises at engine step 3

    Keys: rank (>= 0), step (>= 1), seconds (sleep), sig (TERM INT USR1 USR2 HUP), target (grad,
    loss, sample or text), error (runtime or value). A missing rank or step means every rank or every step.
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
                allowed = TARGETS if key == "target" else ("runtime", "value")
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

    def _raise(self, step: int, where: str) -> None:
        for f in self._due(step, ("raise",)):
            if f.target == where:
                error = ValueError if f.error == "value" else RuntimeError
                raise error(f"injected fault ({FAULT_ENV}): rank {self.rank} raises in {where} at step {step}")

    def in_sampling(self, step: int) -> None:
        """raise with target=sample: inside a serving request's sampling at engine step `step`."""
        self._raise(step, "sample")

    def in_text(self, step: int) -> None:
        """raise with target=text: inside rank 0's text work for a request at engine step `step`."""
        self._raise(step, "text")

    def before_step(self, step: int) -> None:
        for f in self._due(step, ("sleep", "signal", "raise", "hang", "kill")):
            if f.kind == "raise" and f.target in ("sample", "text"):
                continue
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
