"""The data-parallel gradient reduction overlapped with the backward pass.

Backward writes the gradients from the last layer to the first, so the flat gradient block
(training/grad_buffer.py) fills from its end. The block is cut into buckets, each one piece of
the collective the blocking path sends (Communicator.allreduce_pieces: the ring's pieces, or
MPI's slices of a few MiB; the sharded optimizer: one column range of one rank's part). A
parameter's gradient is complete when the walk of the step's last micro-batch has added it (the
walk reaches a leaf after every use of it: `Tensor.grad_hook`); a bucket whose gradients are all
complete is handed to a helper thread, which reduces it with the same call on the same elements
as the blocking path, so the result has the same bits. Buckets go out in one fixed order (from
the end of the block) on every rank, so the ranks' collectives match.

Gradients that other collectives change after backward (summed over TP under sequence
parallelism, over the ranks of a replicated key/value head, between the pipeline stages that
hold the tied embedding) must be reduced over DP only after those sums, in the same order as
the blocking path: such parameters are `late`, placed at the start of the block (`late_first`),
and reduced by `finish()` after the sums, with whatever bucket holds them.

The helper thread calls MPI on the DP communicator (its own) while the main thread computes and
calls the TP and pipeline communicators: MPI_THREAD_MULTIPLE, which mpi4py asks for. Measured
across network hosts (benchmarks/bench_overlap.py): an MPI_Iallreduce started by the main thread
moves no bytes until the main thread calls MPI again (MPICH has no progress thread), so the
helper thread it is; waiting in a blocking call, that thread spins on a core that backward
needs, so at dp 2 it waits for MPI's pieces (Iallreduce: a sum of two numbers has one value
whatever the algorithm) and the chain's Isend and Irecv by testing them every 50 us, which hid
the most (parallel/comm.py's POLL_SLEEP_S; 0 makes it the blocking call); at dp 3 and more it
makes the blocking path's own Allreduce calls, whose order of the sum Iallreduce need not
keep. The ring's pieces (DP inside a node, `--overlap-grads on`) are blocking Sendrecv steps.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

from mpisplit.runtime.faults.watchdog import waits_for_mpi


@dataclass
class _Bucket:
    flat: Any  # the gradient block it belongs to
    lo: int  # its elements: flat[lo:hi]
    hi: int
    row: int | None = None  # sharded: the DP rank that owns it (flat seen as (dp, m))
    cols: slice | None = None  # sharded: its column range of that row
    pending: int = 0  # parameters not yet complete


def late_first(params: list[Any], late: list[Any]) -> list[Any]:
    """params with those of `late` first (each group in its order): their block places them
    first, where the reduction ends."""
    ids = {id(p) for p in late}
    return [p for p in params if id(p) in ids] + [p for p in params if id(p) not in ids]


def late_params(net: Any, grid: Any) -> list[Any]:
    """The parameters whose gradients are summed over TP, replicas or stages after backward."""
    late = list(getattr(net, "tp_partial_params", []) or [])
    late += list(getattr(net, "kv_replica_params", []) or [])
    wte = getattr(getattr(net, "wte", None), "weight", None)
    if grid.pp > 1 and wte is not None and net.config.tie_embeddings:
        late.append(wte)
    return late


class GradientOverlap:
    """Reduces the gradients of `params` over `dp_comm` while backward runs.

    `sharded` (a ShardedAdamW): the block is reduce-scattered (each rank gets the mean of its
    part), else all-reduced (every rank gets the mean). `start(m)` before the step's first
    backward (m micro-batches: a gradient is complete at its m-th write), `finish()` after the
    last one and the TP / replica / stage sums; then the gradients hold their DP mean, the same
    bits as optim.average_gradients or ShardedAdamW.reduce_scatter_gradients."""

    def __init__(self, params: list[Any], dp_comm: Any, late: list[Any], sharded: Any = None) -> None:
        self.params = [p for p in params if p.size]
        self.comm, self.sharded = dp_comm, sharded
        self.late = {id(p) for p in late}
        self.buffers = _buffers_of(self.params)
        self.order: list[_Bucket] = []  # launch order: from the end of each block
        self.ring = False
        for buf in reversed(self.buffers):
            self.order += self._buckets(buf)
        self.of_param = self._param_buckets()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpisplit-dp-reduce")
        self.active = False
        self.exposed_s = 0.0  # the last finish()'s wait for the helper thread

    def _buckets(self, buf: Any) -> list[_Bucket]:
        n = buf.size
        if self.sharded is None:
            self.ring, pieces = self.comm.allreduce_pieces(buf.flat[:n])
            return [_Bucket(buf.flat, s.start, s.stop) for s in reversed(pieces)]
        part = next(pt for pt in self.sharded.parts if pt.grads is buf)
        cols = self.sharded._pieces(part)
        return [_Bucket(buf.flat, q * part.m + c.start, q * part.m + c.stop, q, c)
                for q in reversed(range(self.comm.size)) for c in reversed(cols)]

    def _param_buckets(self) -> dict[int, list[_Bucket]]:
        """Each parameter's buckets (those its elements fall in), in one pass over each block:
        the buckets of a block tile it without overlap."""
        out: dict[int, list[_Bucket]] = {}
        for buf in self.buffers:
            mine = sorted((b for b in self.order if b.flat is buf.flat), key=lambda b: b.lo)
            i, lo = 0, 0
            for p in buf.params:
                hi = lo + p.size
                while i < len(mine) and mine[i].hi <= lo:
                    i += 1
                j = i
                while j < len(mine) and mine[j].lo < hi:
                    j += 1
                out[id(p)] = mine[i:j] if hi > lo else []
                lo = hi
        return out

    def start(self, micro_batches: int) -> None:
        """Arm the hooks for a step of `micro_batches` backward walks."""
        self.m = micro_batches
        self.writes = {id(p): 0 for p in self.params}
        for b in self.order:
            b.pending = 0
        for p in self.params:
            for b in self.of_param[id(p)]:
                b.pending += 1
            p.grad_hook = self._written
        self.next = 0
        self.futures: list[Future] = []
        self.active = True

    def _written(self, p: Any) -> None:
        if not self.active:
            return
        n = self.writes[id(p)] = self.writes[id(p)] + 1
        if n > self.m:
            raise RuntimeError(f"a gradient of shape {p.shape} was written {n} times in a step of {self.m} "
                               "micro-batches: the overlapped DP reduction cannot tell when it is complete "
                               "(train with --overlap-grads off)")
        if n == self.m and id(p) not in self.late:
            self._complete(p)

    def _complete(self, p: Any) -> None:
        if p.grad is None:
            p.grad_store[...] = 0  # sent, and left out of the update (grad stays None)
        elif p.grad is not p.grad_store:  # replaced outside backward: into the block
            p.grad_store[...] = p.grad
            p.grad = p.grad_store
        for b in self.of_param[id(p)]:
            b.pending -= 1
        while self.next < len(self.order) and self.order[self.next].pending == 0:
            self.futures.append(self.pool.submit(self._reduce, self.order[self.next]))
            self.next += 1

    @waits_for_mpi  # the collective timeout sees a stall in the helper's collectives here
    def _wait(self) -> None:
        for f in self.futures:
            f.result()

    def _reduce(self, b: _Bucket) -> None:
        if b.row is None:
            self.comm.allreduce_piece_(b.flat[b.lo: b.hi], self.ring)
        else:
            self.comm.reduce_row_chain_(b.flat.reshape(self.comm.size, -1), b.row, b.cols)

    def finish(self) -> None:
        """The late gradients and any never written go out; wait; divide by dp."""
        t0 = time.perf_counter()
        for p in self.params:
            if self.writes[id(p)] < self.m or id(p) in self.late:
                self.writes[id(p)] = self.m
                self._complete(p)
        self.active = False
        for p in self.params:
            p.grad_hook = None
        self._wait()
        self.exposed_s = time.perf_counter() - t0
        dp = self.comm.size
        for buf in self.buffers:
            if self.sharded is None:
                buf.flat[: buf.size] *= 1.0 / dp
                self.comm.record("allreduce", buf.size * buf.flat.itemsize)
            else:
                m = buf.flat.size // dp
                buf.flat[self.comm.rank * m: (self.comm.rank + 1) * m] *= 1.0 / dp
                for b in self.order:
                    if b.flat is buf.flat and b.row == 0:
                        self.comm.record("reduce_scatter", dp * (b.hi - b.lo) * buf.flat.itemsize)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _buffers_of(params: list[Any]) -> list[Any]:
    out: list[Any] = []
    for p in params:
        buf = getattr(p, "grad_buffer", None)
        if buf is None or not isinstance(buf.flat, np.ndarray):
            raise ValueError("the overlapped DP reduction needs host gradient blocks (grad_buffer.attach)")
        if all(b is not buf for b in out):
            out.append(buf)
    return out


def threads_supported() -> bool:
    """Whether MPI was initialised for calls from several threads at once."""
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


def overlapped_reduction(choice: str, model: Any, opt: Any, mp: Any, grid: Any) -> GradientOverlap | None:
    """The run's overlapped DP reduction (`--overlap-grads`), or None for the blocking one: at
    dp 1, with `off`, and with `auto` when the DP ranks share one node (shared memory reduces a
    block faster than the helper thread's calls would leave the cores alone). `on` where it
    cannot run is an error, the same on every rank; `auto` then falls back. Collective over DP."""
    if choice == "off" or grid.dp == 1:
        return None
    spans = grid.dp_comm.spans_nodes()
    reason = None
    if mp is not None:
        reason = "--amp: the loss scaler reads the gradients before they are reduced"
    elif not isinstance(opt.params[0].data, np.ndarray):
        reason = "GPU arrays: their reduction goes through the device path"
    elif not threads_supported():
        reason = "an MPI that does not grant MPI_THREAD_MULTIPLE"
    if reason is not None:
        if choice == "on":
            raise ValueError(f"--overlap-grads on cannot run with {reason}")
        return None
    if choice == "auto" and not spans:
        return None
    sharded = opt if hasattr(opt, "reduce_scatter_gradients") else None
    return GradientOverlap(opt.params, grid.dp_comm, late_params(model, grid), sharded)
