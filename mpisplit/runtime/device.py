"""GPU ranks: which device a rank takes, what the MPI library and CuPy offer, device randomness.

Binding. Each rank takes GPU `local_rank % visible_devices`, where the local rank comes from
MPI's shared-memory split (MPI_COMM_TYPE_SHARED: the ranks of this node). Launcher variables
(SLURM_LOCALID, OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID, ...) are only read to report a
disagreement. With `srun --gpu-bind=single:1` or a per-rank CUDA_VISIBLE_DEVICES each rank
sees one device and takes it.

CuPy is imported only by the functions that need a GPU: importing this module does not.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

CUDA_AWARE_ENV = "MPISPLIT_CUDA_AWARE"

# Launcher variables holding a rank's index on its node (hints only; see the module docstring).
LOCAL_RANK_ENV = (
    "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK",
    "PALS_LOCAL_RANKID", "MV2_COMM_WORLD_LOCAL_RANK",
)



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


def nccl_available() -> tuple[bool, str]:
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


def gpu_identity(device_id: int) -> tuple[str, int, int, int]:
    import cupy
    from mpi4py import MPI

    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    return (MPI.Get_processor_name(), int(props["pciDomainID"]), int(props["pciBusID"]), int(props["pciDeviceID"]))


def to_device(model: Any) -> Any:
    """Move every parameter of a Module to the current GPU (CuPy arrays), in place."""
    cupy = require_cupy()
    for p in model.parameters():
        p.data = cupy.asarray(p.data)
        p.grad = None
    return model
