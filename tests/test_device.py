"""GPU plumbing that a CPU can check: path choice, detection overrides, device index, the
staged and CUDA-aware paths' host logic with NumPy arrays standing in for device arrays, and
that the CPU path never imports CuPy.

References: the choice table of mpisplit/parallel/device_paths.py's docstring; Communicator collectives on
the same data (the plain MPI path) and NumPy sums of every rank's data.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import clean_mpi_env
from mpi4py import MPI

from mpisplit.parallel.comm import Communicator
from mpisplit.parallel.device_paths import CudaAwarePath, StagedPath, check_path, choose_path
from mpisplit.parallel.gpu import use_gpu
from mpisplit.runtime.device import (
    CUDA_AWARE_ENV,
    device_index,
    launcher_local_rank,
    mpi_cuda_support,
)

pytestmark = pytest.mark.mpi


def _cupy_importable() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def comm():
    c = Communicator(MPI.COMM_WORLD)
    yield c
    c.free()


def rank_data(rank: int, shape: tuple[int, ...], dtype=np.float64) -> np.ndarray:
    # Multiples of 1/8: every sum is exact in any order, so paths compare bit for bit.
    return (np.random.default_rng(77 + rank).integers(-500, 500, size=shape) / 8).astype(dtype)


# ---- choice of path ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "size", "nccl_ok", "cuda_aware", "expected"),
    [
        ("auto", 4, True, True, "nccl"),
        ("auto", 4, True, False, "nccl"),
        ("auto", 1, True, True, "mpi"),  # NCCL only for more than one rank
        ("auto", 1, True, False, "staged"),
        ("auto", 2, False, True, "mpi"),  # CUDA-aware MPI only when the library reports it
        ("auto", 2, False, False, "staged"),
        ("mpi", 2, True, False, "mpi"),  # forced paths are taken as asked
        ("staged", 2, True, True, "staged"),
        ("nccl", 2, False, False, "nccl"),  # use_gpu raises for this one
    ],
)
def test_choose_path(requested: str, size: int, nccl_ok: bool, cuda_aware: bool, expected: str) -> None:
    assert choose_path(requested, size=size, nccl_ok=nccl_ok, cuda_aware=cuda_aware) == expected


@pytest.mark.parametrize("bad", ["NCCL", "gloo", "", None, 1])
def test_unknown_path_is_a_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match=r"unknown collective path .*'auto', 'mpi', 'staged', 'nccl'"):
        check_path(bad)
    with pytest.raises(ValueError, match="unknown collective path"):
        choose_path(bad, size=2, nccl_ok=True, cuda_aware=True)  # type: ignore[arg-type]


def test_use_gpu_validates_before_any_collective() -> None:
    # Raised on every rank alike, before cupy is touched or any rank waits in a collective.
    with pytest.raises(ValueError, match="unknown collective path 'fast'"):
        use_gpu([], comm="fast")
    with pytest.raises(TypeError, match="ProcessGrid, a Communicator"):
        use_gpu(42)


def test_use_gpu_without_cupy_fails_on_every_rank(comm: Communicator) -> None:
    if _cupy_importable():
        pytest.skip("CuPy is installed here")
    with pytest.raises(ValueError, match="needs CuPy") as info:
        use_gpu(comm)
    assert f"{comm.size - 1} other rank" in str(info.value) or comm.size == 1
    comm.barrier()


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("yes", True), ("on", True), ("0", False), ("false", False)],
)
def test_cuda_support_override(value: str, expected: bool) -> None:
    aware, source = mpi_cuda_support({CUDA_AWARE_ENV: value})
    assert aware is expected and source == f"{CUDA_AWARE_ENV}={value}"


def test_cuda_support_detected_from_the_library() -> None:
    aware, source = mpi_cuda_support({})
    assert isinstance(aware, bool) and source
    if "MPICH" in MPI.Get_library_version() and "CUDA" not in MPI.Get_library_version():
        # The MPICH wheel is built without CUDA: it must say so through MPIX_Query_cuda_support.
        assert aware is False and "MPIX_Query_cuda_support" in source


def test_launcher_hints_and_device_index() -> None:
    assert launcher_local_rank({}) is None
    assert launcher_local_rank({"SLURM_LOCALID": "3"}) == 3
    assert launcher_local_rank({"OMPI_COMM_WORLD_LOCAL_RANK": "2", "SLURM_LOCALID": ""}) == 2
    assert launcher_local_rank({"MPI_LOCALRANKID": "x"}) is None
    assert [device_index(r, 4) for r in range(6)] == [0, 1, 2, 3, 0, 1]
    assert device_index(5, 1) == 0  # --gpu-bind=single:1: every rank sees its one GPU as 0
    with pytest.raises(ValueError, match="no CUDA device visible to this rank \\(local rank 2\\)"):
        device_index(2, 0)


# ---- the staged path's host side with NumPy stand-ins -------------------------------------------


class HostStandIns:
    """alloc/to_host/to_device for StagedPath on NumPy arrays, recording what happened."""

    def __init__(self) -> None:
        self.allocated: list[np.ndarray] = []
        self.copies = {"to_host": 0, "to_device": 0}

    def alloc(self, nbytes: int) -> np.ndarray:
        buf = np.empty(nbytes, dtype=np.uint8)
        self.allocated.append(buf)
        return buf

    def to_host(self, dev: np.ndarray, host: np.ndarray) -> None:
        assert host.shape == dev.shape and host.dtype == dev.dtype and host.flags.c_contiguous
        assert any(np.shares_memory(host, b) for b in self.allocated), "staging outside the pinned buffers"
        self.copies["to_host"] += 1
        np.copyto(host, dev)

    def to_device(self, host: np.ndarray, dev: np.ndarray) -> None:
        assert host.shape == dev.shape and host.dtype == dev.dtype
        self.copies["to_device"] += 1
        np.copyto(dev, host)


def _staged() -> tuple[StagedPath, HostStandIns]:
    h = HostStandIns()
    return StagedPath(alloc=h.alloc, to_host=h.to_host, to_device=h.to_device), h


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int64])
def test_staged_collectives_equal_the_plain_path(comm: Communicator, dtype: type) -> None:
    path, h = _staged()
    p, r = comm.size, comm.rank
    x = rank_data(r, (3 * p, 5), dtype)
    everyone = [rank_data(q, (3 * p, 5), dtype) for q in range(p)]
    for op, ref in (("sum", np.sum), ("max", np.max), ("min", np.min)):
        out = np.empty_like(x)
        path.allreduce(comm, x.reshape(-1), out.reshape(-1), op)
        np.testing.assert_array_equal(out, ref(np.stack(everyone), axis=0))
        np.testing.assert_array_equal(out, comm.allreduce(x, op=op))
    inplace = x.copy()
    path.allreduce(comm, inplace.reshape(-1), inplace.reshape(-1), "sum")
    np.testing.assert_array_equal(inplace, comm.allreduce(x))

    gathered = np.empty((p, x.size), dtype=x.dtype)
    path.allgather(comm, x.reshape(-1), gathered)
    np.testing.assert_array_equal(gathered, np.stack([e.reshape(-1) for e in everyone]))

    block = np.empty((3, 5), dtype=x.dtype)
    path.reduce_scatter(comm, x.reshape(p, -1), block.reshape(-1), "sum")
    np.testing.assert_array_equal(block, comm.reduce_scatter(x, axis=0))

    b = x.copy()
    path.bcast(comm, b.reshape(-1), p - 1)
    np.testing.assert_array_equal(b, everyone[p - 1])
    # Every collective went through the pinned buffers: one copy each way per call (6 calls).
    assert h.copies == {"to_host": 7, "to_device": 7}


def test_staged_buffers_are_reused_and_grown(comm: Communicator) -> None:
    path, h = _staged()
    x = rank_data(comm.rank, (1000,))  # 8000 bytes -> one 8 KiB buffer
    out = np.empty_like(x)
    path.allreduce(comm, x, out, "sum")
    first = path._buffers["a"]
    assert path.allocations == 1 and first.nbytes == 8192
    for _ in range(3):  # same size, smaller size, another dtype of no more bytes: no allocation
        path.allreduce(comm, x[:10], out[:10], "max")
        path.allreduce(comm, x.astype(np.float32), out.astype(np.float32), "sum")
        path.allreduce(comm, x, out, "sum")
    assert path._buffers["a"] is first and path.allocations == 1 and len(h.allocated) == 1
    np.testing.assert_array_equal(out, comm.allreduce(x))

    big = rank_data(comm.rank, (1500,))  # 12000 bytes: grows once, to the next power of two
    big_out = np.empty_like(big)
    path.allreduce(comm, big, big_out, "sum")
    path.allreduce(comm, big, big_out, "sum")
    assert path.allocations == 2 and path._buffers["a"].nbytes == 16384 and path._buffers["a"] is not first
    np.testing.assert_array_equal(big_out, comm.allreduce(big))
    # A second role (the receive side of allgather) has its own buffer.
    g = np.empty((comm.size, 10))
    path.allgather(comm, x[:10], g)
    assert set(path._buffers) == {"a", "b"} and path.allocations == 3


def test_staged_path_slices_messages_over_max_count() -> None:
    small = Communicator(MPI.COMM_WORLD, max_count=7)  # forces several MPI calls per collective
    try:
        path, _ = _staged()
        x = rank_data(small.rank, (4 * small.size, 5))
        out = np.empty_like(x)
        path.allreduce(small, x.reshape(-1), out.reshape(-1), "sum")
        np.testing.assert_array_equal(out, small.allreduce(x))
        rs = np.empty((4, 5))
        path.reduce_scatter(small, x.reshape(small.size, -1), rs.reshape(-1), "sum")
        np.testing.assert_array_equal(rs, small.reduce_scatter(x, axis=0))
    finally:
        small.free()


# ---- the CUDA-aware path's logic with NumPy buffers -------------------------------------------


def test_cuda_aware_path_synchronises_before_every_collective(comm: Communicator) -> None:
    calls = []
    path = CudaAwarePath(sync=lambda: calls.append(1))
    x = rank_data(comm.rank, (2 * comm.size, 3))
    out = np.empty_like(x)
    path.allreduce(comm, x.reshape(-1), out.reshape(-1), "max")
    np.testing.assert_array_equal(out, comm.allreduce(x, op="max"))
    y = x.copy()
    path.allreduce(comm, y.reshape(-1), y.reshape(-1), "sum")  # in place
    np.testing.assert_array_equal(y, comm.allreduce(x))
    g = np.empty((comm.size, x.size))
    path.allgather(comm, x.reshape(-1), g)
    np.testing.assert_array_equal(g.reshape(-1), comm.allgather(x, axis=0).reshape(-1))
    rs = np.empty((2, 3))
    path.reduce_scatter(comm, x.reshape(comm.size, -1), rs.reshape(-1), "sum")
    np.testing.assert_array_equal(rs, comm.reduce_scatter(x, axis=0))
    b = x.copy()
    path.bcast(comm, b.reshape(-1), 0)
    np.testing.assert_array_equal(b, rank_data(0, x.shape))
    assert len(calls) == 5


def test_a_communicator_defaults_to_staging_and_frees_its_path() -> None:
    c = Communicator(MPI.COMM_WORLD)
    assert c.device_path == "staged" and c._device_path is None  # created on first device use
    closed = []

    class Probe(StagedPath):
        name = "probe"

        def close(self) -> None:
            closed.append(True)

    c.set_device_path(Probe())
    assert c.device_path == "probe"
    c.set_device_path(StagedPath())  # replacing a path closes the old one
    assert closed == [True] and c.device_path == "staged"
    c.free()


# ---- the CPU path never imports CuPy ------------------------------------------------------------

CPU_STEP = textwrap.dedent(
    """
    import sys
    import numpy as np
    import mpisplit as ms
    import mpisplit.runtime.device, mpisplit.training.amp
    from mpi4py import MPI

    grid = ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    cfg = ms.GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.1)
    master = ms.GPT(cfg, grid, seed=0)
    net = ms.GPT(cfg, grid, init=False)
    mp = ms.amp.MixedPrecision(net, master, "float16", grid.world)
    opt = ms.optim.AdamW(master.parameters(), lr=1e-3)
    ids = np.random.default_rng(0).integers(0, 11, size=(2, 8))
    for model in (master, net):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        if model is net:
            mp.backward(loss)
            mp.step(opt, dp_comm=grid.dp_comm, tp_comm=grid.tp_comm, max_norm=1.0)
        else:
            loss.backward()
            ms.optim.clip_grad_norm(master.parameters(), 1.0, grid.tp_comm)
            opt.step(); opt.zero_grad()
    c = ms.Communicator(MPI.COMM_WORLD)
    c.allreduce(np.ones(3)); c.device_path
    assert "cupy" not in sys.modules and "cupyx" not in sys.modules, sorted(
        m for m in sys.modules if m.startswith("cupy"))
    print("no cupy")
    """
)


def test_cpu_training_step_never_imports_cupy(comm: Communicator) -> None:
    if comm.rank != 0:
        comm.barrier()
        return
    try:
        out = subprocess.run(
            [sys.executable, "-c", CPU_STEP], env=clean_mpi_env(), capture_output=True, text=True, timeout=120,
            check=False,
        )
    finally:
        comm.barrier()
    assert out.returncode == 0 and out.stdout.strip() == "no cupy", out.stdout + out.stderr
