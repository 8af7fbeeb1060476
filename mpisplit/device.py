"""GPU ranks: one device per rank, and three ways for collectives to move device buffers.

Binding. Each rank takes GPU `local_rank % visible_devices`, where the local rank comes from
MPI's shared-memory split (MPI_COMM_TYPE_SHARED: the ranks of this node). Launcher variables
(SLURM_LOCALID, OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID, ...) are only read to report a
disagreement. With `srun --gpu-bind=single:1` or a per-rank CUDA_VISIBLE_DEVICES each rank
sees one device and takes it.

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

import ctypes
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PATHS = ("auto", "mpi", "staged", "nccl")
CUDA_AWARE_ENV = "MPISPLIT_CUDA_AWARE"

# Launcher variables holding a rank's index on its node (hints only; see the module docstring).
LOCAL_RANK_ENV = (
    "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK",
    "PALS_LOCAL_RANKID", "MV2_COMM_WORLD_LOCAL_RANK",
)

_MPI_OPS = ("sum", "max", "min")


# ---- choices that need no GPU (unit-tested on any machine) ------------------------------------


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


def launcher_local_rank(env: Mapping[str, str] | None = None) -> int | None:
    """The node-local rank a launcher announced, if any (a hint, never the decision)."""
    env = os.environ if env is None else env
    for name in LOCAL_RANK_ENV:
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def device_index(local_rank: int, visible: int) -> int:
    """GPU of a rank: its node-local rank modulo the number of devices it can see."""
    if visible < 1:
        raise ValueError(f"no CUDA device visible to this rank (local rank {local_rank})")
    return local_rank % visible


def _loaded_libmpi() -> list[str]:
    # The MPI library mpi4py loaded, from this process's memory map (Linux).
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = {line.split()[-1] for line in f if "libmpi" in line and ".so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith("libmpi"))


def mpi_cuda_support(env: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """(whether the MPI library takes CUDA device buffers, how that was learnt).

    MPISPLIT_CUDA_AWARE=1/0 decides when set; else mpi4py's Query_cuda_support when it has
    one; else MPIX_Query_cuda_support() of the loaded libmpi (Open MPI's mpi-ext, MPICH 4+:
    true only for a CUDA build with GPU support enabled at run time, MPIR_CVAR_ENABLE_GPU);
    else False. Needs MPI initialised (import mpi4py.MPI first).
    """
    env = os.environ if env is None else env
    forced = env.get(CUDA_AWARE_ENV, "").strip().lower()
    if forced in ("1", "yes", "true", "on"):
        return True, f"{CUDA_AWARE_ENV}={env[CUDA_AWARE_ENV]}"
    if forced in ("0", "no", "false", "off"):
        return False, f"{CUDA_AWARE_ENV}={env[CUDA_AWARE_ENV]}"
    from mpi4py import MPI

    query = getattr(MPI, "Query_cuda_support", None)
    if query is not None:
        return bool(query()), "mpi4py Query_cuda_support"
    for path in _loaded_libmpi():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        fn = getattr(lib, "MPIX_Query_cuda_support", None)
        if fn is not None:
            fn.restype = ctypes.c_int
            fn.argtypes = []
            return bool(fn()), f"MPIX_Query_cuda_support in {os.path.basename(path)}"
    return False, "the MPI library reports no CUDA support"


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


class _MPIPath:
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
        comm._allreduce_flat(MPI.IN_PLACE, h, comm._check_op(op))
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
        comm._allreduce_flat(MPI.IN_PLACE if in_place else send, recv, comm._check_op(op))

    def _allgather(self, comm: Any, send: Any, recv: Any) -> None:
        self._sync()
        comm._allgather_flat(send, recv)

    def _reduce_scatter(self, comm: Any, send: Any, recv: Any, op: str) -> None:
        self._sync()
        comm._reduce_scatter_flat(send, recv, comm._check_op(op))

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

    def close(self) -> None:
        if self._comm is not None:
            self._comm.destroy()
            self._comm = None


# ---- dropout randomness on the device -----------------------------------------------------------


class DeviceRandom:
    """Uniform draws on the GPU driven by a NumPy Generator.

    Each call seeds a cuRAND Philox generator with an integer from `host`, so the sequence is
    fixed by the host generator's state alone: checkpoint and restore `bit_generator.state`
    exactly as for a NumPy generator. Same host state on two ranks -> same device masks.
    """

    def __init__(self, host: np.random.Generator) -> None:
        import cupy
        from cupy.cuda import curand

        self.host = host
        method = getattr(curand, "CURAND_RNG_PSEUDO_PHILOX4_32_10", 161)
        self._device = cupy.random.RandomState(seed=0, method=method)

    @property
    def bit_generator(self) -> Any:
        return self.host.bit_generator

    def random(self, shape: Any, dtype: Any = np.float64) -> Any:
        self._device.seed(int(self.host.integers(0, 2**63 - 1)))
        return self._device.random_sample(shape, dtype=dtype)


# ---- binding ranks to GPUs ----------------------------------------------------------------------


def require_cupy() -> Any:
    """The cupy module, or ValueError (a setup the user must change) saying what is missing."""
    try:
        import cupy
    except ImportError as exc:
        raise ValueError(
            f"--device gpu needs CuPy (pip install cupy-cuda12x or cupy-cuda13x): {exc}"
        ) from exc
    return cupy


def _nccl_available() -> tuple[bool, str]:
    try:
        from cupy.cuda import nccl
    except ImportError as exc:
        return False, f"cupy.cuda.nccl cannot be imported ({exc})"
    if not getattr(nccl, "available", False):
        return False, "CuPy was built without NCCL"
    try:
        v = nccl.get_version()
    except Exception as exc:  # noqa: BLE001 - a missing libnccl shows up here
        return False, f"NCCL does not load ({exc})"
    return True, f"NCCL {v // 10000}.{v // 100 % 100}.{v % 100}"


def _gpu_identity(device_id: int) -> tuple[str, int, int, int]:
    import cupy
    from mpi4py import MPI

    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    return (MPI.Get_processor_name(), int(props["pciDomainID"]), int(props["pciBusID"]), int(props["pciDeviceID"]))


@dataclass
class GPUBinding:
    """What use_gpu decided on this rank."""

    device_id: int
    device_name: str
    local_rank: int
    local_size: int
    visible: int
    cuda_aware: bool
    cuda_aware_source: str
    nccl: str  # "NCCL x.y.z" or why NCCL is not used
    requested: str
    paths: dict[str, str] = field(default_factory=dict)  # communicator role -> path
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        paths = ", ".join(f"{role} {p}" for role, p in self.paths.items()) or "none (one rank)"
        text = (
            f"GPU {self.device_id} ({self.device_name}) for local rank {self.local_rank} of "
            f"{self.local_size}, {self.visible} visible; collectives ({self.requested}): {paths}; "
            f"CUDA-aware MPI: {'yes' if self.cuda_aware else 'no'} ({self.cuda_aware_source}); {self.nccl}"
        )
        return text + "".join(f"; {n}" for n in self.notes)


def _communicators(target: Any) -> list[tuple[str, Any]]:
    if all(hasattr(target, a) for a in ("world", "tp_comm", "dp_comm")):
        return [("world", target.world), ("tp", target.tp_comm), ("dp", target.dp_comm)]
    if hasattr(target, "mpi") and hasattr(target, "set_device_path"):
        return [("comm", target)]
    if isinstance(target, Iterable) and not isinstance(target, (str, bytes)):
        comms = [(f"comm{i}", c) for i, c in enumerate(target)]
        if comms and all(hasattr(c, "mpi") and hasattr(c, "set_device_path") for _, c in comms):
            return comms
    raise TypeError(f"use_gpu takes a ProcessGrid, a Communicator or a list of them, got {type(target).__name__}")


def use_gpu(
    target: Any, comm: str = "auto", *, device_id: int | None = None, cuda_aware: bool | None = None,
) -> GPUBinding:
    """Bind this rank to its GPU and choose the collective path of each communicator.

    `target`: a ProcessGrid (its world, tp and dp communicators), a Communicator or a list of
    Communicators; the first is the job's world (collective over it). `comm`: auto, mpi,
    staged or nccl (module docstring). `device_id` overrides the local-rank choice;
    `cuda_aware` overrides the detection. Every failure raises on every rank alike.
    """
    from mpisplit.backend import local_rank_and_size
    from mpisplit.errors import agree

    check_path(comm)
    comms = _communicators(target)
    world = comms[0][1]
    cupy = None
    with agree(world):
        cupy = require_cupy()
        visible = int(cupy.cuda.runtime.getDeviceCount())
    local_rank, local_size = local_rank_and_size(world)
    with agree(world):
        dev = device_index(local_rank, visible) if device_id is None else int(device_id)
        if not 0 <= dev < visible:
            raise ValueError(f"device_id {dev} out of range: {visible} device(s) visible")
        cupy.cuda.Device(dev).use()
        props = cupy.cuda.runtime.getDeviceProperties(dev)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        identity = _gpu_identity(dev)
    notes = []
    hint = launcher_local_rank()
    if hint is not None and hint != local_rank:
        notes.append(f"the launcher says local rank {hint}, MPI's shared-memory split {local_rank}")

    if cuda_aware is None:
        aware, source = mpi_cuda_support()
    else:
        aware, source = bool(cuda_aware), "given"
    ok, nccl_text = _nccl_available()
    # Every rank must agree on NCCL: one rank without it, or two ranks on one GPU, rules it out.
    views = world.mpi.allgather((ok, identity)) if world.size > 1 else [(ok, identity)]
    ok = all(v[0] for v in views)
    ids = [v[1] for v in views]
    if ok and len(set(ids)) < len(ids):
        ok, nccl_text = False, f"{nccl_text} not used: ranks share a GPU (NCCL refuses that)"
    binding = GPUBinding(dev, name, local_rank, local_size, visible, aware, source, nccl_text, comm, notes=notes)
    for role, c in comms:
        if c.size == 1:
            continue
        chosen = choose_path(comm, size=c.size, nccl_ok=ok, cuda_aware=aware)
        path: Any = None
        if chosen == "nccl":
            try:
                with agree(world):
                    if not ok:
                        raise ValueError(f"--comm nccl: {nccl_text}")
                    path = NcclPath(c)
            except (ValueError, RuntimeError) as exc:
                if path is not None:  # this rank succeeded where another failed
                    path.close()
                if comm != "auto":
                    raise
                chosen, path = ("mpi" if aware else "staged"), None
                binding.notes.append(f"NCCL failed on the {role} communicator ({exc}); using {chosen}")
        if chosen == "nccl":
            pass
        elif chosen == "mpi":
            path = CudaAwarePath()
            if not aware:
                binding.notes.append("mpi forced although the MPI library reports no CUDA support")
        else:
            path = StagedPath()
        c.set_device_path(path)
        binding.paths[role] = chosen
    return binding


def to_device(model: Any) -> Any:
    """Move every parameter of a Module to the current GPU (CuPy arrays), in place."""
    cupy = require_cupy()
    for p in model.parameters():
        p.data = cupy.asarray(p.data)
        p.grad = None
    return model
