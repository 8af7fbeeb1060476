"""cupy.cuda.nccl of the stand-in, carried by MPI.

A communicator is an MPI communicator of its ranks, made from the unique id: the id names the
rank that drew it; every member reports its world rank there, and the members build their
communicator with MPI_Comm_create_from_group (collective over the members only, as NCCL's
init is). Reductions gather every rank's data to NCCL rank 0, combine them in rank order and
broadcast the result: every rank ends with the same bits. Buffers are raw addresses (the host
addresses of stand-in arrays); each call checks the stream order of the buffers it reads and
records its writes on its stream, as NCCL's kernels would be queued there.
"""

from __future__ import annotations

import ctypes
import itertools
from typing import Any

import numpy as np

from cupy import _state

available = True

NCCL_INT8, NCCL_UINT8, NCCL_INT32, NCCL_UINT32, NCCL_INT64, NCCL_UINT64 = range(6)
NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_BFLOAT16 = 6, 7, 8, 9
NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN = 0, 1, 2, 3

_DTYPES = {NCCL_INT8: np.int8, NCCL_UINT8: np.uint8, NCCL_INT32: np.int32, NCCL_UINT32: np.uint32,
           NCCL_INT64: np.int64, NCCL_UINT64: np.uint64, NCCL_FLOAT16: np.float16,
           NCCL_FLOAT32: np.float32, NCCL_FLOAT64: np.float64}
_COMBINE = {NCCL_SUM: np.add, NCCL_PROD: np.multiply, NCCL_MAX: np.maximum, NCCL_MIN: np.minimum}
_ID_TAG, _GROUP_TAG = 7101, 7102
_serial = itertools.count()
_group: list[list[Any]] | None = None  # operations deferred between groupStart and groupEnd


class NcclError(RuntimeError):
    pass


def get_version() -> int:
    return 22304


def get_unique_id() -> tuple:
    from mpi4py import MPI

    return (MPI.COMM_WORLD.Get_rank(), next(_serial))


def groupStart() -> None:
    global _group
    if _group is not None:
        raise NcclError("groupStart inside a group (the stand-in does not nest groups)")
    _group = []


def groupEnd() -> None:
    global _group
    from mpi4py import MPI

    ops, _group = _group, None
    if ops is None:
        raise NcclError("groupEnd without groupStart")
    requests = [op() for op in ops]
    MPI.Request.Waitall(requests)


def _host(ptr: int, count: int, dtype: int) -> np.ndarray:
    dt = np.dtype(_DTYPES[dtype]) if dtype in _DTYPES else None
    if dt is None:
        raise NcclError(f"the stand-in's NCCL does not take datatype {dtype}")
    if count == 0:
        return np.empty(0, dtype=dt)
    raw = (ctypes.c_byte * (count * dt.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dt)


def _stream(ptr: int) -> _state.StreamState:
    s = _state.StreamState.live.get(int(ptr))
    if s is None:
        raise NcclError(f"unknown stream 0x{int(ptr):x}")
    return s


class NcclCommunicator:
    def __init__(self, ndev: int, commId: tuple, rank: int) -> None:
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        root, serial = commId
        if world.Get_rank() == root:
            members = {rank: root}
            for _ in range(ndev - 1):
                r, w = world.recv(source=MPI.ANY_SOURCE, tag=_ID_TAG + 2 * serial)
                members[r] = w
            order = [members[r] for r in range(ndev)]
            for w in order:
                if w != root:
                    world.send(order, dest=w, tag=_ID_TAG + 2 * serial + 1)
        else:
            world.send((rank, world.Get_rank()), dest=root, tag=_ID_TAG + 2 * serial)
            order = world.recv(source=root, tag=_ID_TAG + 2 * serial + 1)
        group = world.Get_group().Incl(order)
        self._mpi = MPI.Intracomm.Create_from_group(group, f"stand-in nccl {root} {serial}")
        group.Free()
        self._rank, self._size = rank, ndev
        if self._mpi.Get_rank() != rank:
            raise NcclError(f"rank {rank} became MPI rank {self._mpi.Get_rank()}")
        self.device_id = _state.settings.device

    def rank_id(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def destroy(self) -> None:
        if self._mpi is not None:
            self._mpi.Free()
            self._mpi = None

    def abort(self) -> None:
        self.destroy()

    # ---- stream order -------------------------------------------------------------------

    @staticmethod
    def _reads(ptr: int, stream: _state.StreamState, what: str) -> None:
        _state.buffer_at(ptr).ready_for(f"NCCL {what} reading a buffer on {stream}", stream)

    @staticmethod
    def _writes(ptr: int, stream: _state.StreamState) -> None:
        _state.buffer_at(ptr).written(stream)

    # ---- collectives (data through rank 0, combined in rank order) ----------------------

    def _reduce_all(self, data: np.ndarray, op: int) -> np.ndarray:
        parts = self._mpi.gather(data.copy(), root=0)
        if self._rank == 0:
            total = parts[0].copy()
            for p in parts[1:]:
                _COMBINE[op](total, p, out=total)
        else:
            total = None
        return self._mpi.bcast(total, root=0)

    def allReduce(self, sendbuf: int, recvbuf: int, count: int, datatype: int, op: int, stream: int) -> None:
        s = _stream(stream)
        self._reads(sendbuf, s, "allReduce")
        total = self._reduce_all(_host(sendbuf, count, datatype), op)
        _host(recvbuf, count, datatype)[...] = total
        self._writes(recvbuf, s)

    def reduceScatter(self, sendbuf: int, recvbuf: int, recvcount: int, datatype: int, op: int, stream: int) -> None:
        s = _stream(stream)
        self._reads(sendbuf, s, "reduceScatter")
        total = self._reduce_all(_host(sendbuf, recvcount * self._size, datatype), op)
        _host(recvbuf, recvcount, datatype)[...] = total[self._rank * recvcount: (self._rank + 1) * recvcount]
        self._writes(recvbuf, s)

    def allGather(self, sendbuf: int, recvbuf: int, count: int, datatype: int, stream: int) -> None:
        s = _stream(stream)
        self._reads(sendbuf, s, "allGather")
        parts = self._mpi.allgather(_host(sendbuf, count, datatype).copy())
        _host(recvbuf, count * self._size, datatype)[...] = np.concatenate(parts)
        self._writes(recvbuf, s)

    def bcast(self, buff: int, count: int, datatype: int, root: int, stream: int) -> None:
        s = _stream(stream)
        self._reads(buff, s, "bcast")
        data = self._mpi.bcast(_host(buff, count, datatype).copy() if self._rank == root else None, root=root)
        _host(buff, count, datatype)[...] = data
        self._writes(buff, s)

    def broadcast(self, sendbuff: int, recvbuff: int, count: int, datatype: int, root: int, stream: int) -> None:
        if sendbuff != recvbuff and self._rank == root:
            _host(recvbuff, count, datatype)[...] = _host(sendbuff, count, datatype)
        self.bcast(recvbuff, count, datatype, root, stream)

    # ---- point to point (deferred inside a group, as NCCL's are) ------------------------

    def send(self, sendbuf: int, count: int, datatype: int, peer: int, stream: int) -> None:
        s = _stream(stream)
        self._reads(sendbuf, s, "send")
        data = _host(sendbuf, count, datatype).copy()
        self._p2p(lambda: self._mpi.Isend(data, dest=peer, tag=_GROUP_TAG))

    def recv(self, recvbuf: int, count: int, datatype: int, peer: int, stream: int) -> None:
        s = _stream(stream)
        target = _host(recvbuf, count, datatype)
        self._writes(recvbuf, s)
        self._p2p(lambda: self._mpi.Irecv(target, source=peer, tag=_GROUP_TAG))

    @staticmethod
    def _p2p(post: Any) -> None:
        if _group is not None:
            _group.append(post)
        else:
            post().Wait()


