"""Communicator: the collectives of the library on NumPy/CuPy arrays, with call and byte counters.

Every collective is a capitalised (buffer) mpi4py call on C-contiguous arrays. Every rank must
call with the same shape and dtype (MPI semantics; not checked, it would cost a collective).
A communicator of one rank returns at once and counts nothing.

NumPy arrays go to MPI as they are, except a host all-reduce of 1 MiB or more and the rows
collectives of the sharded optimizer: those are rings of Sendrecv steps in place, faster than
MPI's collectives on one node and summing in a fixed order of the ranks. CuPy arrays go through the communicator's device path
(mpisplit.parallel.device_paths: CUDA-aware MPI, pinned host staging or NCCL; staging unless
`set_device_path` or `mpisplit.parallel.gpu.use_gpu` chose another). The path only moves flat
contiguous buffers; layout (axis moves, contiguity) and counting happen here, the same for
every path.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from mpi4py import MPI

from mpisplit.runtime.backend import get_array_module, is_cupy_array

if TYPE_CHECKING:
    from typing_extensions import Self

# MPI counts are C ints: a message of more elements is sent in slices of at most this many.
MAX_COUNT = 2**31 - 1
# A host all-reduce larger than this goes as several of this size: MPI implementations stage
# a large one through temporary buffers of its full size (fresh pages, faulted in on every
# call), so one 128 MiB all-reduce of a gradient block ran 2-3x slower than the same bytes in
# pieces of a few MiB (benchmarks/RESULTS.md, "CPU speed, third pass").
HOST_ALLREDUCE_CHUNK_BYTES = 4 << 20
# A host all-reduce of at least this many bytes runs as a ring of Sendrecv steps in place (a
# reduce-scatter then an all-gather, messages of HOST_ALLREDUCE_CHUNK_BYTES): 0.34 of MPICH's
# shared-memory Allreduce for a 204 MiB gradient block at 2 ranks (RESULTS.md, "DP all-reduce
# as a ring"). Smaller ones keep MPI's Allreduce, whose few-step algorithms win on latency.
HOST_RING_ALLREDUCE_MIN_BYTES = 1 << 20
# ... on a communicator whose ranks share one node. One that spans nodes keeps MPI's Allreduce,
# whose algorithms know the nodes: measured across network namespaces (RESULTS.md, "Separate
# network hosts"), 4 ranks on 2 hosts over a 1 Gbit/s link: 0.68x the ring's time at 64 MiB (the
# flat ring sends 1.5x the bytes over each link); one rank per host: the same time.
# MPISPLIT_ALLREDUCE=ring or =mpi forces either everywhere (auto: this choice).
ALLREDUCE_CHOICES = ("auto", "ring", "mpi")

KINDS = ("allreduce", "allgather", "reduce_scatter", "bcast")

_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
_COMBINE = {"sum": np.add, "max": np.maximum, "min": np.minimum}  # the host ring's combine step
_RING_TAG = 31  # the rows collectives' Sendrecv (on the library's own Dup of the communicator)
# How the overlap's helper thread (training/overlap.py) waits for a piece of MPI's all-reduce:
# > 0: an Iallreduce tested every POLL_SLEEP_S seconds; 0: the blocking Allreduce.
POLL_SLEEP_S = 5e-5


def _wait(request: Any) -> None:
    """Complete `request`, testing it every POLL_SLEEP_S (each test moves MPI's progress on)."""
    while not request.Test():
        time.sleep(POLL_SLEEP_S)


def _slices(n: int, step: int) -> list[slice]:
    # [0, n) in pieces of at most `step`; one empty slice for n == 0 so that every rank still
    # enters the collective once.
    return [slice(lo, min(n, lo + step)) for lo in range(0, max(n, 1), step)]


class Communicator:
    """Wraps (a Dup of) an mpi4py intracommunicator.

    `mpi_comm` may be an mpi4py communicator or another Communicator. `max_count` is the most
    elements one MPI call carries (smaller values exist for tests of the slicing).
    """

    def __init__(self, mpi_comm: Any, *, max_count: int = MAX_COUNT) -> None:
        if isinstance(mpi_comm, Communicator):
            mpi_comm = mpi_comm.mpi
        if not isinstance(mpi_comm, MPI.Intracomm):
            raise TypeError(
                f"expected an mpi4py Intracomm or a Communicator, got {type(mpi_comm).__name__}"
            )
        if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
            raise ValueError(f"max_count must be a positive integer, got {max_count!r}")
        self._init(mpi_comm.Dup(), max_count)

    def _init(self, owned: MPI.Intracomm, max_count: int) -> None:
        self.mpi: MPI.Intracomm = owned
        self.rank: int = owned.Get_rank()
        self.size: int = owned.Get_size()
        self.max_count = max_count
        self._device_path: Any = None  # created on the first CuPy collective (staged) or set
        self._scratch: dict[str, np.ndarray] = {}  # host ring buffers, by dtype
        self._ring: bool | None = None  # large host all-reduces as the ring (decided on the first)
        self._stats: dict[str, dict[str, int]] = {}
        self.reset_stats()

    @classmethod
    def _adopt(cls, owned: MPI.Intracomm, max_count: int = MAX_COUNT) -> Communicator:
        """Wrap a communicator this library just created (e.g. by Split) without a Dup."""
        self = cls.__new__(cls)
        self._init(owned, max_count)
        return self

    # ---- bookkeeping -------------------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, int]]:
        """{kind: {"calls": n, "bytes": b}} for allreduce, allgather, reduce_scatter, bcast.

        bytes = nbytes of the full array involved: allreduce and bcast the array, allgather the
        result, reduce_scatter the input. Only collectives that ran (size > 1) count.
        """
        return copy.deepcopy(self._stats)

    def reset_stats(self) -> None:
        self._stats = {kind: {"calls": 0, "bytes": 0} for kind in KINDS}

    def _count(self, kind: str, nbytes: int) -> None:
        self._stats[kind]["calls"] += 1
        self._stats[kind]["bytes"] += int(nbytes)

    def free(self) -> None:
        """Free the duplicated MPI communicator (collective); further calls are errors."""
        if self._device_path is not None:
            self._device_path.close()
            self._device_path = None
        if self.mpi != MPI.COMM_NULL:
            self.mpi.Free()

    # ---- device arrays -----------------------------------------------------------------------

    @property
    def device_path(self) -> str:
        """How CuPy arrays travel: "staged" (default), "mpi" or "nccl"."""
        return "staged" if self._device_path is None else self._device_path.name

    def set_device_path(self, path: Any) -> None:
        """Use `path` (a mpisplit.parallel.device_paths path object) for CuPy arrays from now on."""
        if self._device_path is not None and self._device_path is not path:
            self._device_path.close()
        self._device_path = path

    def _path(self) -> Any:
        if self._device_path is None:
            from mpisplit.parallel.device_paths import StagedPath

            self._device_path = StagedPath()
        return self._device_path

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, size={self.size})"

    # ---- validation (local, so every rank raises alike before any collective) ---------------

    @staticmethod
    def _check_array(x: Any, what: str, kinds: str = "fiu") -> None:
        # Reductions take float and integer dtypes; pure data movement also takes bool.
        if not (isinstance(x, np.ndarray) or is_cupy_array(x)):
            raise TypeError(f"{what} expects a NumPy or CuPy array, got {type(x).__name__}")
        if x.dtype.kind not in kinds:
            allowed = "float, integer" + (" and bool" if "b" in kinds else "")
            raise TypeError(
                f"{what} supports {allowed} arrays, got dtype {x.dtype} (shape {tuple(x.shape)})"
            )

    @staticmethod
    def _check_op(op: str) -> MPI.Op:
        try:
            return _OPS[op]
        except (KeyError, TypeError):
            raise ValueError(f"unknown reduction op {op!r}; expected one of {list(_OPS)}") from None

    @staticmethod
    def _check_axis(x: Any, axis: Any, what: str) -> int:
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"{what} axis must be an int, got {axis!r}")
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"{what} axis {axis} out of range for shape {tuple(x.shape)}")
        return int(axis) % x.ndim

    # ---- raw collectives on flat buffers (host, or device for CUDA-aware MPI), sliced to
    # ---- max_count ---------------------------------------------------------------------------

    def _allreduce_flat(self, send: Any, recv: np.ndarray, op: str) -> None:
        # send is a flat array or MPI.IN_PLACE (then recv holds the input).
        host = isinstance(recv, np.ndarray)
        if host and self.size > 1 and recv.nbytes >= HOST_RING_ALLREDUCE_MIN_BYTES and self._ring_allreduces():
            if send is not MPI.IN_PLACE:
                recv[...] = send
            self._ring_allreduce(recv, op)
            return
        step = self.max_count
        if host:
            step = min(step, max(1, HOST_ALLREDUCE_CHUNK_BYTES // recv.itemsize))
        mpi_op = _OPS[op]
        for s in _slices(recv.size, step):
            self.mpi.Allreduce(send if send is MPI.IN_PLACE else send[s], recv[s], op=mpi_op)

    def _ring_allreduces(self) -> bool:
        """Whether large host all-reduces run as the ring here (see ALLREDUCE_CHOICES). The first
        call is collective (all ranks reach it together, in the same all-reduce)."""
        if self._ring is None:
            choice = os.environ.get("MPISPLIT_ALLREDUCE", "auto").strip().lower() or "auto"
            if choice not in ALLREDUCE_CHOICES:
                raise ValueError(f"MPISPLIT_ALLREDUCE must be one of {', '.join(ALLREDUCE_CHOICES)}, got {choice!r}")
            self._ring = choice == "ring" or (choice == "auto" and not self.spans_nodes())
        return self._ring

    def spans_nodes(self) -> bool:
        """Whether this communicator's ranks sit on more than one node (MPI's shared-memory
        split). Collective."""
        node = self.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            return node.Get_size() < self.size
        finally:
            node.Free()

    def _ring_allreduce(self, flat: np.ndarray, op: str) -> None:
        """flat = op over the ranks, in place: each piece of size x HOST_ALLREDUCE_CHUNK_BYTES
        cut into size segments, reduce-scattered (`_ring_reduce_segments`), then all-gathered
        (`_ring_gather_segments`), so every rank holds the same bits. The two phases run one
        after the other over all the pieces: a piece's all-gather right after its
        reduce-scatter ran 2.5x slower here."""
        p = self.size
        per = max(1, min(HOST_ALLREDUCE_CHUNK_BYTES // flat.itemsize, self.max_count))
        pieces = [flat[s] for s in _slices(flat.size, p * per)]
        segments = [[c[q * c.size // p: (q + 1) * c.size // p] for q in range(p)] for c in pieces]
        for segs in segments:
            self._ring_reduce_segments(segs, op)
        for segs in segments:
            self._ring_gather_segments(segs)

    # ---- a host all-reduce or reduce-scatter in pieces, one call per piece (training/overlap.py
    # sends each piece as soon as backward has written it, from a helper thread) -----------------

    def allreduce_pieces(self, flat: np.ndarray) -> tuple[bool, list[slice]]:
        """(ring, pieces): the pieces in which allreduce_(flat) reduces the flat host array
        `flat`, and whether as the ring. allreduce_piece_ of every piece, in any order, gives
        the bits of allreduce_(flat): the same calls on the same elements. Collective on the
        communicator's first large all-reduce (the ring's choice)."""
        if self.size == 1:
            return False, []
        if flat.nbytes >= HOST_RING_ALLREDUCE_MIN_BYTES and self._ring_allreduces():
            per = max(1, min(HOST_ALLREDUCE_CHUNK_BYTES // flat.itemsize, self.max_count))
            return True, _slices(flat.size, self.size * per)
        return False, _slices(flat.size, min(self.max_count, max(1, HOST_ALLREDUCE_CHUNK_BYTES // flat.itemsize)))

    def allreduce_piece_(self, piece: np.ndarray, ring: bool, op: str = "sum") -> None:
        """One piece of allreduce_pieces, in place; not counted (the caller counts the whole).
        MPI's piece over two ranks as Iallreduce, waited for by testing it every POLL_SLEEP_S
        (a helper thread blocked inside MPI spins on a core that backward needs; a sum of two
        numbers is the same in any order); over more ranks the blocking Allreduce, whose
        algorithm (and so order of the sum) is the blocking path's."""
        if ring:
            self._ring_allreduce(piece, op)
        elif POLL_SLEEP_S <= 0 or self.size > 2:
            self.mpi.Allreduce(MPI.IN_PLACE, piece, op=_OPS[op])
        else:
            _wait(self.mpi.Iallreduce(MPI.IN_PLACE, piece, op=_OPS[op]))

    def reduce_row_chain_(self, x: np.ndarray, q: int, cols: slice, op: str = "sum") -> None:
        """x[q, cols] on rank q = op over the ranks of x[q, cols]; x is left as it is elsewhere.
        Combined along the chain q + 1, q + 2, ..., q (each rank its own row q and what came from
        its left): the order in which reduce_scatter_rows_ combines row q, so the same bits, and
        row q is done as soon as every rank's row q is (the other rows may still be in backward).
        Not counted (the caller counts)."""
        p, r = self.size, self.rank
        k = (r - q - 1) % p  # place in the chain: rank q + 1 starts, rank q ends
        mine = x[q, cols]
        if k == 0:
            self._p2p(self.mpi.Isend, mine, (r + 1) % p)
            return
        got = self._ring_scratch(mine.size, mine.dtype)[: mine.size]
        self._p2p(self.mpi.Irecv, got, (r - 1) % p)
        out = mine if k == p - 1 else got
        _COMBINE[op](mine, got, out=out)
        if k < p - 1:
            self._p2p(self.mpi.Isend, out, (r + 1) % p)

    @staticmethod
    def _p2p(start: Callable[..., Any], buf: np.ndarray, peer: int) -> None:
        """A point-to-point message of the chain, waited for as POLL_SLEEP_S says."""
        request = start(buf, peer, _RING_TAG)
        if POLL_SLEEP_S > 0:
            _wait(request)
        else:
            request.Wait()

    def record(self, kind: str, nbytes: int) -> None:
        """Count a collective that ran in pieces (allreduce_piece_, reduce_row_chain_) once."""
        if self.size > 1:
            self._count(kind, nbytes)

    def _bcast_flat(self, buf: np.ndarray, root: int) -> None:
        for s in _slices(buf.size, self.max_count):
            self.mpi.Bcast(buf[s], root=root)

    def _allgather_flat(self, send: Any, recv: Any, sync: Callable[[], None] | None = None) -> None:
        # send (n,), recv (size, n): recv[r] = send of rank r. `sync` (device buffers): completes
        # the stream's queued work before MPI touches memory, here before each sliced call, since
        # each slice's fresh buffer may reuse memory that the previous slice's copy still reads.
        n = send.size
        if n <= self.max_count:
            self.mpi.Allgather(send, recv)
            return
        xp = get_array_module(recv)
        for s in _slices(n, self.max_count):
            part = xp.empty((self.size, s.stop - s.start), dtype=recv.dtype)
            if sync is not None:
                sync()
            self.mpi.Allgather(send[s], part)
            recv[:, s] = part

    def _reduce_scatter_flat(self, send: Any, recv: Any, op: MPI.Op, sync: Callable[[], None] | None = None) -> None:
        # send (size, m), recv (m,): recv = op over ranks of send[this rank]. `sync` as above: the
        # contiguous copy of each slice is queued work that MPI must not read before it is done.
        m = recv.size
        if m <= self.max_count:
            self.mpi.Reduce_scatter_block(send, recv, op=op)
            return
        xp = get_array_module(recv)
        for s in _slices(m, self.max_count):
            part = xp.ascontiguousarray(send[:, s])
            if sync is not None:
                sync()
            self.mpi.Reduce_scatter_block(part, recv[s], op=op)

    # ---- public collectives ------------------------------------------------------------------

    def allreduce(self, x: Any, op: str = "sum") -> Any:
        """A new array: op over all ranks of x (elementwise)."""
        self._check_array(x, "allreduce")
        self._check_op(op)
        if self.size == 1:
            return x.copy()
        if isinstance(x, np.ndarray):
            h = np.ascontiguousarray(x)
            out = np.empty_like(h)
            self._allreduce_flat(h.reshape(-1), out.reshape(-1), op)
        else:
            h = get_array_module(x).ascontiguousarray(x)
            out = get_array_module(x).empty_like(h)
            self._path().allreduce(self, h.reshape(-1), out.reshape(-1), op)
        self._count("allreduce", x.nbytes)
        return out

    def allreduce_(self, x: Any, op: str = "sum") -> Any:
        """In place: x = op over all ranks of x. Returns x."""
        self._check_array(x, "allreduce_")
        self._check_op(op)
        if isinstance(x, np.ndarray) and not x.flags.writeable:
            raise ValueError(f"allreduce_ needs a writeable array (shape {x.shape})")
        if self.size == 1:
            return x
        if isinstance(x, np.ndarray):
            h = np.ascontiguousarray(x)
            self._allreduce_flat(MPI.IN_PLACE, h.reshape(-1), op)
        else:
            h = x if x.flags.c_contiguous else get_array_module(x).ascontiguousarray(x)
            flat = h.reshape(-1)
            self._path().allreduce(self, flat, flat, op)
        if h is not x:  # x was not contiguous: h is a copy
            x[...] = h
        self._count("allreduce", x.nbytes)
        return x

    def allgather(self, x: Any, axis: int = -1) -> Any:
        """A new C-contiguous array: the ranks' x concatenated along `axis` in rank order."""
        self._check_array(x, "allgather", "fiub")
        ax = self._check_axis(x, axis, "allgather")
        if self.size == 1:
            return x.copy()
        xp = get_array_module(x)
        h = xp.ascontiguousarray(x)
        gathered = xp.empty((self.size, *h.shape), dtype=h.dtype)
        if xp is np:
            self._allgather_flat(h.reshape(-1), gathered.reshape(self.size, -1))
        else:
            self._path().allgather(self, h.reshape(-1), gathered.reshape(self.size, -1))
        out_shape = list(h.shape)
        out_shape[ax] *= self.size
        if ax == 0:
            out = gathered.reshape(out_shape)  # (size, n0, ...) -> (size*n0, ...): a view
        else:
            # (size, ..., n_ax, ...) -> (..., size, n_ax, ...) -> (..., size*n_ax, ...)
            out = xp.ascontiguousarray(xp.moveaxis(gathered, 0, ax)).reshape(out_shape)
        self._count("allgather", out.nbytes)
        return out

    def reduce_scatter(self, x: Any, axis: int = 0, op: str = "sum") -> Any:
        """A new array: this rank's block (along `axis`, rank order) of op over the ranks' x.

        x.shape[axis] must be divisible by the communicator size.
        """
        self._check_array(x, "reduce_scatter")
        ax = self._check_axis(x, axis, "reduce_scatter")
        mpi_op = self._check_op(op)
        if x.shape[ax] % self.size != 0:
            raise ValueError(
                f"reduce_scatter: axis {axis} of shape {tuple(x.shape)} has length "
                f"{x.shape[ax]}, not divisible by communicator size {self.size}"
            )
        if self.size == 1:
            return x.copy()
        xp = get_array_module(x)
        # (n_ax, ...) with the axis in front
        h = xp.ascontiguousarray(x if ax == 0 else xp.moveaxis(x, ax, 0))
        block_shape = (h.shape[0] // self.size, *h.shape[1:])
        block = xp.empty(block_shape, dtype=h.dtype)
        if xp is np:
            self._reduce_scatter_flat(h.reshape(self.size, -1), block.reshape(-1), mpi_op)
        else:
            self._path().reduce_scatter(self, h.reshape(self.size, -1), block.reshape(-1), op)
        if ax != 0:
            block = xp.ascontiguousarray(xp.moveaxis(block, 0, ax))
        self._count("reduce_scatter", x.nbytes)
        return block

    # ---- in place on the rows of a (size, m) block: one column range per call -------------
    # Rank q owns row q (a contiguous part of a flat block); a large block goes as several calls
    # on column ranges of every row, like a host all-reduce in pieces.

    def _check_rows(self, x: Any, cols: Any, what: str) -> int:
        self._check_array(x, what)
        if x.ndim != 2 or x.shape[0] != self.size or not x.flags.c_contiguous:
            raise ValueError(f"{what} needs a C-contiguous ({self.size}, m) array, got shape {tuple(x.shape)}")
        if not isinstance(cols, slice) or cols.step not in (None, 1):
            raise TypeError(f"{what} cols must be a slice with step 1, got {cols!r}")
        lo, hi, _ = cols.indices(x.shape[1])
        n = max(0, hi - lo)
        if n > self.max_count:
            raise ValueError(f"{what}: {n} columns exceed max_count {self.max_count}")
        return n

    def reduce_scatter_rows_(self, x: Any, cols: slice, op: str = "sum") -> None:
        """x[rank, cols] = op over the ranks of x[:, cols]; the other rows are left as they are.

        On the host a ring, in place: size - 1 Sendrecv steps of one row's columns each, every
        received partial result combined with this rank's row into a scratch buffer (the last
        one into x[rank, cols]), the reduce-scatter half of a ring all-reduce; no packing copy."""
        n = self._check_rows(x, cols, "reduce_scatter_rows_")
        self._check_op(op)
        if self.size == 1:
            return
        if isinstance(x, np.ndarray):
            self._ring_reduce_segments([x[q, cols] for q in range(self.size)], op)
            self._count("reduce_scatter", self.size * n * x.itemsize)
        else:  # a device array: through the device path (counted there, the same bytes)
            x[self.rank, cols] = self.reduce_scatter(x[:, cols], axis=0, op=op)[0]

    def _ring_reduce_segments(self, segs: list[np.ndarray], op: str) -> None:
        """segs[rank] = op over the ranks of segs[rank] (segs: one view per rank, in place).
        Segment c's result starts at rank c + 1 and travels right, each rank combining its own
        segment c, to end at rank c (so summed in the order c + 1, c + 2, ..., c): at step s
        rank r passes segment r - s - 1 on and receives segment r - s - 2."""
        p, r = self.size, self.rank
        right, left = (r + 1) % p, (r - 1) % p
        combine = _COMBINE[op]
        longest = max(seg.size for seg in segs)
        scratch = self._ring_scratch(2 * longest, segs[0].dtype)
        send = segs[(r - 1) % p]
        for s in range(p - 1):
            mine = segs[(r - s - 2) % p]
            got = scratch[(s % 2) * longest:][: mine.size]  # never the buffer being sent
            self.mpi.Sendrecv(send, right, _RING_TAG, got, left, _RING_TAG)
            out = segs[r] if s == p - 2 else got
            combine(mine, got, out=out)
            send = out

    def _ring_gather_segments(self, segs: list[np.ndarray]) -> None:
        """segs[q] = rank q's segs[q] on every rank, in place: segment r - s travels right at
        step s, each received one straight into its place."""
        p, r = self.size, self.rank
        for s in range(p - 1):
            self.mpi.Sendrecv(segs[(r - s) % p], (r + 1) % p, _RING_TAG,
                              segs[(r - s - 1) % p], (r - 1) % p, _RING_TAG)

    def _ring_scratch(self, n: int, dtype: Any) -> np.ndarray:
        """A host buffer of at least n elements of dtype, kept for the next call."""
        key = np.dtype(dtype).str
        buf = self._scratch.get(key)
        if buf is None or buf.size < n:
            buf = self._scratch[key] = np.empty(n, dtype=dtype)
        return buf[:n]

    def allgather_rows_(self, x: Any, cols: slice) -> None:
        """x[q, cols] = rank q's x[q, cols] on every rank, for every q; in place, no copy on the
        host (a ring: size - 1 Sendrecv steps, each received row straight into its place)."""
        n = self._check_rows(x, cols, "allgather_rows_")
        if self.size == 1:
            return
        if isinstance(x, np.ndarray):
            self._ring_gather_segments([x[q, cols] for q in range(self.size)])
            self._count("allgather", self.size * n * x.itemsize)
        else:  # a device array: through the device path (counted there, the same bytes)
            x[:, cols] = self.allgather(x[self.rank, cols][None], axis=0)

    def bcast(self, x: Any, root: int = 0) -> Any:
        """In place: x = root's x. Returns x."""
        self._check_array(x, "bcast", "fiub")
        if isinstance(root, bool) or not isinstance(root, (int, np.integer)):
            raise TypeError(f"bcast root must be an int, got {root!r}")
        if not 0 <= root < self.size:
            raise ValueError(f"bcast root {root} out of range for communicator size {self.size}")
        if isinstance(x, np.ndarray) and not x.flags.writeable:
            raise ValueError(f"bcast needs a writeable array (shape {x.shape})")
        if self.size == 1:
            return x
        xp = get_array_module(x)
        h = x if x.flags.c_contiguous else xp.ascontiguousarray(x)
        if xp is np:
            self._bcast_flat(h.reshape(-1), int(root))
        else:
            self._path().bcast(self, h.reshape(-1), int(root))
        if h is not x:
            x[...] = h
        self._count("bcast", x.nbytes)
        return x

    def barrier(self) -> None:
        if self.size > 1:
            self.mpi.Barrier()
