"""StageLink: activations and their gradients between neighbouring pipeline stages.

Every transfer is a buffer message (Isend/Irecv, no pickling; NCCL send/recv for device arrays
on an NCCL path) of a shape both sides know.
Activations travel forward with ACTIVATION_TAG, gradients backward with GRADIENT_TAG, so a
message can never be taken for the other kind. Each call posts all of its receives and sends
together and waits on all of them: two neighbours that both send first cannot block each other.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
from mpi4py import MPI

from mpisplit.runtime.backend import get_array_module, is_cupy_array, to_numpy

ACTIVATION_TAG = 101
GRADIENT_TAG = 102


class StageLink:
    """Messages over `pp_comm` (a Communicator whose rank is the stage) to stage +-1.

    `synchronous=True` sends with Issend (a send completes only once matched), which turns any
    ordering mistake into a deadlock even for messages small enough to go eagerly: for tests.
    """

    def __init__(self, pp_comm: Any, *, synchronous: bool = False) -> None:
        self.comm = pp_comm
        self.stage, self.stages = pp_comm.rank, pp_comm.size
        self.synchronous = synchronous
        self.reset_stats()

    def stats(self) -> dict[str, dict[str, int]]:
        """{"send": {"calls", "bytes"}, "recv": {"calls", "bytes"}} of the messages of this rank."""
        return copy.deepcopy(self._stats)

    def reset_stats(self) -> None:
        self._stats = {kind: {"calls": 0, "bytes": 0} for kind in ("send", "recv")}
        self.wait_seconds = 0.0  # time spent waiting for neighbours (the bubble, plus transfers)

    @property
    def prev(self) -> int | None:
        return self.stage - 1 if self.stage > 0 else None

    @property
    def next(self) -> int | None:
        return self.stage + 1 if self.stage < self.stages - 1 else None

    def exchange(self, sends: list[tuple[Any, int, int]], recvs: list[tuple[tuple, Any, int, int, Any]]) -> list[Any]:
        """Post every receive (shape, dtype, source, tag, like) and send (array, dest, tag), wait on
        all; returns the received arrays in order, on the device of `like`.

        Device arrays take the pp communicator's path: CUDA-aware MPI gets device buffers once
        the stream is synchronised, NCCL gets one group of sends and receives on the current
        stream (no tags: NCCL matches each pair of ranks in order), staging goes through the host."""
        on_device = any(is_cupy_array(a) for a, _, _ in sends) or any(is_cupy_array(r[4]) for r in recvs)
        path = self.comm.device_path if on_device else "host"
        t0 = time.perf_counter()
        if path in ("mpi", "nccl"):
            out = self._exchange_device(sends, recvs, path)
        else:
            out = self._exchange_host(sends, recvs)
        self.wait_seconds += time.perf_counter() - t0
        for a, _, _ in sends:
            self._stats["send"]["calls"] += 1
            self._stats["send"]["bytes"] += a.nbytes
        for buf in out:
            self._stats["recv"]["calls"] += 1
            self._stats["recv"]["bytes"] += buf.nbytes
        return out

    def _exchange_host(self, sends: list, recvs: list) -> list[Any]:
        mpi = self.comm.mpi
        out = [np.empty(shape, dtype=dtype) for shape, dtype, _, _, _ in recvs]
        requests = [mpi.Irecv(buf, source=src, tag=tag) for buf, (_, _, src, tag, _) in zip(out, recvs)]
        post = mpi.Issend if self.synchronous else mpi.Isend
        hosts = [np.ascontiguousarray(to_numpy(a)) for a, _, _ in sends]  # CuPy arrays: via the host
        requests += [post(h, dest=dest, tag=tag) for h, (_, dest, tag) in zip(hosts, sends)]
        MPI.Request.Waitall(requests)
        return [get_array_module(like).asarray(buf) if is_cupy_array(like) else buf
                for buf, (*_, like) in zip(out, recvs)]

    def _exchange_device(self, sends: list, recvs: list, path: str) -> list[Any]:
        xp = get_array_module(*[a for a, _, _ in sends], *[r[4] for r in recvs])
        out = [xp.empty(shape, dtype=dtype) for shape, dtype, _, _, _ in recvs]
        arrays = [xp.ascontiguousarray(a) for a, _, _ in sends]
        if path == "nccl":
            self.comm._path().exchange([(a, dest) for a, (_, dest, _) in zip(arrays, sends)],
                                       [(buf, src) for buf, (_, _, src, _, _) in zip(out, recvs)])
            return out
        xp.cuda.get_current_stream().synchronize()  # MPI cannot see the stream: its work first
        mpi = self.comm.mpi
        requests = [mpi.Irecv(buf, source=src, tag=tag) for buf, (_, _, src, tag, _) in zip(out, recvs)]
        post = mpi.Issend if self.synchronous else mpi.Isend
        requests += [post(a, dest=dest, tag=tag) for a, (_, dest, tag) in zip(arrays, sends)]
        MPI.Request.Waitall(requests)
        return out

    # One wrapper per step of the schedule; each does nothing towards a missing neighbour.

    def recv_forward(self, shape: tuple, dtype: Any, like: Any = None) -> Any:
        """The input activation of this stage (None on the first)."""
        if self.prev is None:
            return None
        return self.exchange([], [(shape, dtype, self.prev, ACTIVATION_TAG, like)])[0]

    def send_forward(self, y: Any) -> None:
        if self.next is not None:
            self.exchange([(y, self.next, ACTIVATION_TAG)], [])

    def recv_backward(self, shape: tuple, dtype: Any, like: Any = None) -> Any:
        """The gradient of this stage's output (None on the last)."""
        if self.next is None:
            return None
        return self.exchange([], [(shape, dtype, self.next, GRADIENT_TAG, like)])[0]

    def send_backward(self, dx: Any) -> None:
        if self.prev is not None:
            self.exchange([(dx, self.prev, GRADIENT_TAG)], [])

    def send_forward_recv_backward(self, y: Any, shape: tuple, dtype: Any) -> Any:
        """Send this output on, receive its gradient (steady state); None on the last stage."""
        if self.next is None:
            return None
        return self.exchange([(y, self.next, ACTIVATION_TAG)], [(shape, dtype, self.next, GRADIENT_TAG, y)])[0]

    def send_backward_recv_forward(self, dx: Any, shape: tuple, dtype: Any, like: Any = None) -> Any:
        """Send an input gradient back, receive the next input (steady state); None on the first."""
        if self.prev is None:
            return None
        return self.exchange([(dx, self.prev, GRADIENT_TAG)], [(shape, dtype, self.prev, ACTIVATION_TAG, like)])[0]
