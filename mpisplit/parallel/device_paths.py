"""How collectives move CuPy buffers: three paths, chosen per communicator.

Paths for CuPy arrays (`use_gpu(..., comm=...)`, train.py's `--comm`):

  mpi     CUDA-aware MPI: device pointers go straight to mpi4py once the current stream is
          synchronised (MPI cannot see CUDA streams).
  staged  device -> pinned host buffer -> MPI on the host -> device. The pinned buffers are
          kept per role ("a" send/in place, "b" receive), sized in bytes so every dtype
          reuses them, and grown to the next power of two when a message outgrows them.
  nccl    NCCL through cupy.cuda.nccl on the current stream (no host synchronisation); the
          unique id goes to every rank of the communicator by an MPI broadcast.

auto picks nccl when NCCL is available, the communicator has more than one rank and no two
ranks of the job share a GPU (NCCL refuses that); else mpi when the MPI library reports CUDA
support (MPIX_Query_cuda_support, or MPISPLIT_CUDA_AWARE=1/0 to override); else staged.
Every path counts the same calls and bytes (the Communicator counts, not the path).

CuPy is imported only by the functions that need a GPU: importing this module does not.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

PATHS = ("auto", "mpi", "staged", "nccl")

_MPI_OPS = ("sum", "max", "min")


def check_path(requested: Any) -> str:
    """The path name, or ValueError naming the choices. Local: every rank raises alike."""
    if requested not in PATHS:
        raise ValueError(f"unknown collective path {requested!r}; expected one of {list(PATHS)}")
    return requested


def choose_path(requested: str, *, size: int, nccl_ok: bool, cuda_aware: bool) -> str:
    """The path a communicator of `size` ranks uses for device arrays.

    A forced path is returned as is (nccl when NCCL cannot run is the caller's error to
    raise); auto: nccl if `nccl_ok` and size > 1, else mpi if `cuda_aware`, else staged.
    """
    check_path(requested)
    if requested != "auto":
        return requested
    if nccl_ok and size > 1:
        return "nccl"
    return "mpi" if cuda_aware else "staged"



# ---- dtypes MPI can carry ---------------------------------------------------------------------


def _mpi_knows(dtype: np.dtype) -> bool:
    # NumPy's own dtypes have MPI datatypes (float16 as MPIX_C_FLOAT16 in MPICH); an extension
    # dtype (ml_dtypes.bfloat16) does not.
    return type(dtype).__module__.split(".")[0] == "numpy" and dtype.name != "bfloat16"


def _raw_view(a: Any) -> Any:
    """a viewed as unsigned integers of the same width (pure data movement of any dtype)."""
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _address(a: Any) -> int:
    iface = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    return iface["data"][0]


class _MPIPath(ABC):
    """Shared logic of the MPI-based paths: a dtype MPI does not know (bfloat16) moves as raw
    integers and reduces in float32; subclasses implement the four flat collectives."""

    name = ""

    def allreduce(self, comm: Any, send: Any, recv: Any, op: str) -> None:
        if _mpi_knows(send.dtype):
            self._allreduce(comm, send, recv, op)
            return
        wide = send.astype(np.float32)
        self._allreduce(comm, wide, wide, op)
        recv[...] = wide.astype(recv.dtype)

    def reduce_scatter(self, comm: Any, send: Any, recv: Any, op: str) -> None:
        if _mpi_knows(send.dtype):
            self._reduce_scatter(comm, send, recv, op)
            return
        wide = recv.astype(np.float32)
        self._reduce_scatter(comm, send.astype(np.float32), wide, op)
        recv[...] = wide.astype(recv.dtype)

    def allgather(self, comm: Any, send: Any, recv: Any) -> None:
        if _mpi_knows(send.dtype):
            self._allgather(comm, send, recv)
        else:
            self._allgather(comm, _raw_view(send), _raw_view(recv))

    def bcast(self, comm: Any, buf: Any, root: int) -> None:
        self._bcast(comm, buf if _mpi_knows(buf.dtype) else _raw_view(buf), root)

    def close(self) -> None:
        pass

    # The flat collectives each MPI-based path implements.

    @abstractmethod
    def _allreduce(self, comm: Any, send: Any, recv: Any, op: str) -> None: ...

    @abstractmethod
    def _reduce_scatter(self, comm: Any, send: Any, recv: Any, op: str) -> None: ...

    @abstractmethod
    def _allgather(self, comm: Any, send: Any, recv: Any) -> None: ...

    @abstractmethod
    def _bcast(self, comm: Any, buf: Any, root: int) -> None: ...


# ---- staged: pinned host buffers --------------------------------------------------------------


def _pinned_empty(nbytes: int) -> np.ndarray:
    import cupyx

    return cupyx.empty_pinned((nbytes,), dtype=np.uint8)


class StagedPath(_MPIPath):
    """Copies through reused pinned host buffers; MPI on the host.

    `alloc(nbytes) -> uint8 array`, `to_host(device_flat, host_flat)` (returns when the data
    is on the host) and `to_device(host_flat, device_flat)` default to CuPy (pinned memory,
    copies on the current stream); tests pass NumPy stand-ins to run the host side anywhere.
    """

    name = "staged"

    def __init__(
        self, *, alloc: Callable[[int], np.ndarray] | None = None,
        to_host: Callable[[Any, np.ndarray], None] | None = None,
        to_device: Callable[[np.ndarray, Any], None] | None = None,
    ) -> None:
        self._alloc = alloc or _pinned_empty
        self._to_host = to_host or self._cupy_to_host
        self._to_device = to_device or self._cupy_to_device
        self._buffers: dict[str, np.ndarray] = {}
        self._pending: Any = None  # event of the last host-to-device copy out of a buffer
        self.allocations = 0  # pinned allocations so far (stays put once the sizes are seen)

    def buffer(self, role: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A host view (shape, dtype) of the pinned buffer of `role`, grown if too small."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buf = self._buffers.get(role)
        if buf is None or buf.nbytes < nbytes:
            self._wait()  # the copy still reading the old buffer must end before it is freed
            size = 1 << max(12, (nbytes - 1).bit_length())  # next power of two, >= 4 KiB
            buf = self._alloc(size)
            self._buffers[role] = buf
            self.allocations += 1
        return buf[:nbytes].view(dtype).reshape(shape)

    def _cupy_to_host(self, dev: Any, host: np.ndarray) -> None:
        self._wait()
        dev.get(out=host)  # on the current stream, after the kernels that wrote `dev`; blocks

    def _cupy_to_device(self, host: np.ndarray, dev: Any) -> None:
        import cupy

        dev.set(host)  # asynchronous (pinned source): the buffer stays busy until the event
        self._pending = cupy.cuda.Event(block=False, disable_timing=True)
        self._pending.record()

    def _wait(self) -> None:
        # Before a buffer is written again, the copy that reads it must be done (it may sit on
        # another stream than the current one).
        if self._pending is not None:
            self._pending.synchronize()
            self._pending = None

    def _allreduce(self, comm: Any, send: Any, recv: Any, op: str) -> None:
        from mpi4py import MPI

        h = self.buffer("a", send.shape, send.dtype)
        self._to_host(send, h)
        comm._allreduce_flat(MPI.IN_PLACE, h, op)
        self._to_device(h, recv)

    def _allgather(self, comm: Any, send: Any, recv: Any) -> None:
        h = self.buffer("a", send.shape, send.dtype)
        self._to_host(send, h)
        out = self.buffer("b", recv.shape, recv.dtype)
        self._wait()
        comm._allgather_flat(h, out)
        self._to_device(out, recv)

    def _reduce_scatter(self, comm: Any, send: Any, recv: Any, op: str) -> None:
        h = self.buffer("a", send.shape, send.dtype)
        self._to_host(send, h)
        out = self.buffer("b", recv.shape, recv.dtype)
        self._wait()
        comm._reduce_scatter_flat(h, out, comm._check_op(op))
        self._to_device(out, recv)

    def _bcast(self, comm: Any, buf: Any, root: int) -> None:
        h = self.buffer("a", buf.shape, buf.dtype)
        self._to_host(buf, h)
        comm._bcast_flat(h, root)
        self._to_device(h, buf)


# ---- CUDA-aware MPI ---------------------------------------------------------------------------


def _sync_current_stream() -> None:
    import cupy

    cupy.cuda.get_current_stream().synchronize()


class CudaAwarePath(_MPIPath):
    """Device pointers handed to mpi4py (which reads __cuda_array_interface__)."""

    name = "mpi"

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self._sync = sync or _sync_current_stream

    def _allreduce(self, comm: Any, send: Any, recv: Any, op: str) -> None:
        from mpi4py import MPI

        self._sync()
        in_place = send is recv or _address(send) == _address(recv)
        comm._allreduce_flat(MPI.IN_PLACE if in_place else send, recv, op)

    def _allgather(self, comm: Any, send: Any, recv: Any) -> None:
        self._sync()
        comm._allgather_flat(send, recv, sync=self._sync)

    def _reduce_scatter(self, comm: Any, send: Any, recv: Any, op: str) -> None:
        self._sync()
        comm._reduce_scatter_flat(send, recv, comm._check_op(op), sync=self._sync)

    def _bcast(self, comm: Any, buf: Any, root: int) -> None:
        self._sync()
        comm._bcast_flat(buf, root)


# ---- NCCL ---------------------------------------------------------------------------------------


class NcclPath:
    """NCCL collectives of one communicator, enqueued on the current CUDA stream. Collective
    to create (over `comm`: rank 0 draws the unique id, an MPI broadcast hands it out)."""

    name = "nccl"

    def __init__(self, comm: Any) -> None:
        from cupy.cuda import nccl

        self._lib = nccl
        uid = nccl.get_unique_id() if comm.rank == 0 else None
        uid = comm.mpi.bcast(uid, root=0)  # 128 bytes of metadata: pickled bcast
        self._comm = nccl.NcclCommunicator(comm.size, uid, comm.rank)
        self.version = nccl.get_version()
        # nccl.h's enum values, should this CuPy not export a name.
        self._ops = {op: getattr(nccl, f"NCCL_{op.upper()}", v) for op, v in (("sum", 0), ("max", 2), ("min", 3))}
        codes = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5,
                 "float16": 6, "float32": 7, "float64": 8}
        types = {name: getattr(nccl, f"NCCL_{name.upper()}", v) for name, v in codes.items()}
        types["bool"] = types["uint8"]
        if self.version >= 21000:  # ncclBfloat16 (= 9) from NCCL 2.10
            types["bfloat16"] = getattr(nccl, "NCCL_BFLOAT16", 9)
        self._types = types

    def _type(self, dtype: np.dtype) -> int:
        try:
            return self._types[dtype.name]
        except KeyError:
            raise TypeError(f"NCCL collectives do not take dtype {dtype}") from None

    @staticmethod
    def _stream() -> int:
        import cupy

        return cupy.cuda.get_current_stream().ptr

    def allreduce(self, comm: Any, send: Any, recv: Any, op: str) -> None:
        self._comm.allReduce(
            send.data.ptr, recv.data.ptr, send.size, self._type(send.dtype), self._ops[op], self._stream(),
        )

    def allgather(self, comm: Any, send: Any, recv: Any) -> None:
        # recv (size, n): rank r's n elements at row r, as ncclAllGather lays them out.
        self._comm.allGather(send.data.ptr, recv.data.ptr, send.size, self._type(send.dtype), self._stream())

    def reduce_scatter(self, comm: Any, send: Any, recv: Any, op: str) -> None:
        # send (size, m): block r goes to rank r.
        self._comm.reduceScatter(
            send.data.ptr, recv.data.ptr, recv.size, self._type(send.dtype), self._ops[op], self._stream(),
        )

    def bcast(self, comm: Any, buf: Any, root: int) -> None:
        # cupy's bcast takes a C int count: slice as MPI does.
        step = min(comm.max_count, 2**31 - 1)
        t, s = self._type(buf.dtype), self._stream()
        for lo in range(0, max(buf.size, 1), step):
            part = buf[lo: lo + step]
            self._comm.bcast(part.data.ptr, part.size, t, root, s)

    def exchange(self, sends: list[tuple[Any, int]], recvs: list[tuple[Any, int]]) -> None:
        """Point to point in one NCCL group: each (array, peer) of `sends` sent, each of `recvs`
        received into (contiguous device arrays), on the current stream."""
        t, s = self._type, self._stream()
        self._lib.groupStart()
        try:
            for buf, peer in recvs:
                self._comm.recv(buf.data.ptr, buf.size, t(buf.dtype), peer, s)
            for buf, peer in sends:
                self._comm.send(buf.data.ptr, buf.size, t(buf.dtype), peer, s)
        finally:
            self._lib.groupEnd()

    def close(self) -> None:
        if self._comm is not None:
            self._comm.destroy()
            self._comm = None
