"""The CuPy stand-in (tests/standin) and the GPU-path bugs it exists to catch.

Runs only where `cupy` is the stand-in (PYTHONPATH=tests/standin, as tests/run_mpi.py's
stand-in pass sets it). References: NumPy computations of the same data, the ranks' data
combined in rank order, MPI's own results; each bug test fails on the code before its fix
(named in its docstring).
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from _mpi import all_ranks_equal
from conftest import world
from mpi4py import MPI

from mpisplit.parallel.comm import Communicator
from mpisplit.parallel.device_paths import CudaAwarePath, NcclPath, StagedPath
from mpisplit.parallel.gpu import use_gpu
from mpisplit.parallel.grid import ProcessGrid
from mpisplit.parallel.pipeline.p2p import StageLink

pytestmark = [pytest.mark.gpu, pytest.mark.mpi]


@pytest.fixture(autouse=True)
def cupy():
    import cupy

    if not getattr(cupy, "standin", False):
        pytest.skip("tests of the CuPy stand-in: real CuPy is imported")
    cupy._state.settings.violations.clear()
    cupy._state._deferred.clear()
    yield cupy
    cupy.cuda.Device().synchronize()


def violations(cupy) -> list[str]:
    gc.collect()
    found = list(cupy._state.settings.violations)
    cupy._state.settings.violations.clear()
    cupy._state._deferred.clear()
    return found


# ---- the stand-in is strict where CuPy is ----------------------------------------------------


def test_host_and_device_arrays_do_not_mix(cupy) -> None:
    a = cupy.arange(6.0).reshape(2, 3)
    for bad in (lambda: np.exp(a), lambda: np.asarray(a), lambda: a + np.ones(3), lambda: np.ones(3) * a,
                lambda: cupy.exp(np.ones(3)), lambda: np.concatenate([a, a]), lambda: cupy.matmul(a, np.ones((3, 1)))):
        with pytest.raises(TypeError):
            bad()
    b = cupy.exp(a) * 2 + a.sum()
    assert isinstance(b, cupy.ndarray) and isinstance(a.sum(), cupy.ndarray) and a.sum().ndim == 0
    np.testing.assert_array_equal(b.get(), np.exp(np.arange(6.0).reshape(2, 3)) * 2 + 15.0)
    assert cupy.get_array_module(a) is cupy and cupy.get_array_module(np.ones(1)) is np
    assert float(a[1, 2]) == 5.0 and cupy.asnumpy(a).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_cuda_array_interface_is_the_host_address_and_mpi_takes_it(cupy) -> None:
    x = cupy.arange(4.0) * (MPI.COMM_WORLD.Get_rank() + 1)
    out = cupy.empty(4)
    cupy.cuda.get_current_stream().synchronize()
    iface = x.__cuda_array_interface__
    assert iface["data"][0] == x.data.ptr and iface["shape"] == (4,)
    MPI.COMM_WORLD.Allreduce(x, out)
    n = MPI.COMM_WORLD.Get_size()
    np.testing.assert_array_equal(out.get(), np.arange(4.0) * (n * (n + 1) // 2))
    assert violations(cupy) == []


def test_a_pointer_before_its_stream_work_is_synchronised_is_caught(cupy) -> None:
    x = cupy.ones(8) * 3  # queued work
    out = cupy.empty(8)
    MPI.COMM_WORLD.Allreduce(x, out)  # mpi4py asks for the pointers before the stream is synchronised
    found = violations(cupy)
    assert found and "not synchronised" in found[0] and "test_gpu_standin.py" in found[0]
    cupy.cuda.get_current_stream().synchronize()
    MPI.COMM_WORLD.Allreduce(x, out)
    assert violations(cupy) == []


def test_memory_limit_and_device_count(cupy) -> None:
    s = cupy._state.settings
    free, total = cupy.cuda.runtime.memGetInfo()
    assert total == s.memory and free == s.memory - s.used
    before = s.memory
    s.memory = s.used + 1000
    try:
        with pytest.raises(cupy.cuda.memory.OutOfMemoryError):
            cupy.zeros(1000)
        small = cupy.zeros(100)  # 800 bytes fit
        assert cupy.cuda.runtime.memGetInfo()[0] == 200
        del small
    finally:
        s.memory = before
    assert cupy.cuda.runtime.getDeviceCount() == s.devices
    with pytest.raises(cupy.cuda.runtime.CUDARuntimeError):
        cupy.cuda.Device(s.devices).use()


def test_nccl_collectives_give_every_rank_the_same_bits(cupy) -> None:
    world = Communicator(MPI.COMM_WORLD)
    try:
        path = NcclPath(world)
        rng = np.random.default_rng(7 + world.rank)
        data = rng.standard_normal((world.size, 5)).astype(np.float32)
        everyone = world.mpi.allgather(data)
        expect = everyone[0].copy()
        for d in everyone[1:]:
            expect += d  # rank order
        send = cupy.asarray(data)
        recv = cupy.empty_like(send)
        path.allreduce(world, send.reshape(-1), recv.reshape(-1), "sum")  # same stream: no sync needed
        got = recv.get()
        np.testing.assert_array_equal(got, expect)
        assert all_ranks_equal(world, got)
        block = cupy.empty(5, dtype=np.float32)
        path.reduce_scatter(world, send, block, "max")
        np.testing.assert_array_equal(block.get(), np.max(everyone, axis=0)[world.rank])
        gathered = cupy.empty((world.size, 5), dtype=np.float32)
        path.allgather(world, send[0], gathered)
        np.testing.assert_array_equal(gathered.get(), np.stack([e[0] for e in everyone]))
        path.close()
    finally:
        world.free()
    assert violations(cupy) == []


# ---- the bugs of the GPU path --------------------------------------------------------------------


def test_use_gpu_binds_every_communicator_of_a_grid(cupy) -> None:
    """Before the fix use_gpu raised TypeError (GPUBinding without @dataclass) at its first call."""
    n = MPI.COMM_WORLD.Get_size()
    pp = 2 if n % 2 == 0 else 1
    with ProcessGrid(tp=1, pp=pp) as grid:
        b = use_gpu(grid, comm="mpi")
        assert b.device_id == b.local_rank % b.visible and "Stand-in GPU" in b.summary()
        for role, c in (("world", grid.world), ("dp", grid.dp_comm), ("pp", grid.pp_comm), ("stage", grid.stage_comm)):
            assert (c.device_path == "mpi") == (c.size > 1), role
            assert (role in b.paths) == (c.size > 1), role
        if grid.embed_comm is not None:
            assert grid.embed_comm.device_path == "mpi"


@pytest.mark.parametrize("kind", ["allgather", "reduce_scatter"])
def test_sliced_collectives_on_cuda_aware_mpi_synchronise_each_slice(cupy, kind) -> None:
    """Before the fix each slice's fresh buffer (a contiguous copy, or the receive buffer) went
    to MPI with its stream work still queued: the stand-in records a violation."""
    comm = Communicator(MPI.COMM_WORLD, max_count=5)
    try:
        comm.set_device_path(CudaAwarePath())
        p = comm.size
        host = np.arange(p * 3 * 7, dtype=np.float64).reshape(p * 3, 7) + comm.rank
        x = cupy.asarray(host)
        if kind == "allgather":
            got = comm.allgather(x, axis=0).get()
            expect = np.concatenate(comm.mpi.allgather(host), axis=0)
        else:
            got = comm.reduce_scatter(x, axis=0).get()
            expect = sum(comm.mpi.allgather(host))[comm.rank * 3: (comm.rank + 1) * 3]
        np.testing.assert_array_equal(got, expect)
    finally:
        comm.free()
    assert violations(cupy) == []


def test_staged_buffer_is_not_freed_under_a_pending_copy(cupy) -> None:
    """Before the fix buffer() replaced (freed) the pinned buffer that the last asynchronous
    host-to-device copy still read, when a larger message came next."""
    comm = Communicator(MPI.COMM_WORLD)
    try:
        path = StagedPath()
        small = cupy.ones(16)
        path.allreduce(comm, small, small, "sum")  # leaves a copy out of buffer "a" queued
        big = cupy.ones(4096)
        path.allreduce(comm, big, big, "sum")  # buffer "a" grows
        assert path.allocations == 2
        np.testing.assert_array_equal(big.get(), np.full(4096, comm.size, dtype=np.float64))
    finally:
        comm.free()
    assert violations(cupy) == []


@pytest.mark.parametrize("path_name", ["mpi", "nccl"])
@world(min_size=2)  # a pipeline needs two ranks
def test_pipeline_messages_take_the_device_path(cupy, path_name) -> None:
    """Before the fix StageLink copied every device message through the host (to_numpy), whatever
    the communicator's path: counted here as device-to-host copies."""
    with ProcessGrid(tp=1, pp=2, dp=MPI.COMM_WORLD.Get_size() // 2) if MPI.COMM_WORLD.Get_size() % 2 == 0 \
            else ProcessGrid(tp=1, pp=1) as grid:
        if grid.pp < 2:
            pytest.skip("an odd world size has no two-stage grid here")
        use_gpu(grid, comm=path_name)
        assert grid.pp_comm.device_path == path_name
        link = StageLink(grid.pp_comm)
        y = cupy.arange(12.0).reshape(3, 4) * (grid.pp_rank + 1)
        before = cupy._state.settings.host_copies
        if grid.pp_rank == 0:
            dy = link.send_forward_recv_backward(y, (3, 4), np.float64)
            assert isinstance(dy, cupy.ndarray)
            copies = cupy._state.settings.host_copies - before
            np.testing.assert_array_equal(dy.get(), np.arange(12.0).reshape(3, 4) * 2)
        else:
            x = link.recv_forward((3, 4), np.float64, like=y)
            link.send_backward(y)
            copies = cupy._state.settings.host_copies - before
            np.testing.assert_array_equal(x.get(), np.arange(12.0).reshape(3, 4))
        assert copies == 0
        assert link.stats()["send"]["bytes"] == 96 and link.stats()["recv"]["bytes"] == 96
    assert violations(cupy) == []


# ---- how use_gpu chooses ---------------------------------------------------------------------


@pytest.fixture
def settings(cupy):
    s = cupy._state.settings
    saved = (s.devices, s.cuda_aware)
    yield s
    s.devices, s.cuda_aware = saved
    cupy.cuda.Device(0).use()


def test_ranks_sharing_a_gpu_rule_nccl_out(cupy, settings) -> None:
    """One visible device for every rank: auto takes CUDA-aware MPI (or staging without it),
    a forced nccl is an error on every rank; with one rank NCCL has nothing to do."""
    settings.devices = 1
    comm = Communicator(MPI.COMM_WORLD)
    try:
        b = use_gpu(comm, comm="auto")
        assert b.device_id == 0
        if comm.size > 1:
            assert "ranks share a GPU" in b.nccl and b.paths == {"comm": "mpi"}
            with pytest.raises(ValueError, match="ranks share a GPU"):
                use_gpu(comm, comm="nccl")
            settings.cuda_aware = False
            b = use_gpu([comm], comm="auto")
            assert b.paths == {"comm0": "staged"} and not b.cuda_aware
            b = use_gpu(comm, comm="mpi")
            assert b.paths == {"comm": "mpi"} and "mpi forced" in b.summary()
    finally:
        comm.free()


def test_nccl_failing_on_one_rank_falls_back_everywhere(cupy, settings, monkeypatch) -> None:
    """auto: NCCL's init failing on any rank gives every rank the next path, with a note;
    a forced nccl raises on every rank."""
    import mpisplit.parallel.gpu as gpu_module

    world = MPI.COMM_WORLD
    real = gpu_module.NcclPath

    def flaky(c):
        path = real(c)  # NCCL's init is collective: every rank takes part, then one fails
        if world.Get_rank() == world.Get_size() - 1:
            path.close()
            raise RuntimeError("ncclUnhandledCudaError (stand-in)")
        return path

    monkeypatch.setattr(gpu_module, "NcclPath", flaky)
    comm = Communicator(world)
    try:
        if comm.size > 1:
            b = use_gpu(comm, comm="auto")
            assert b.paths == {"comm": "mpi"} and "NCCL failed on the comm communicator" in b.summary()
            with pytest.raises(RuntimeError, match="ncclUnhandledCudaError"):
                use_gpu(comm, comm="nccl")
        else:
            assert use_gpu(comm, comm="nccl").paths == {}
    finally:
        comm.free()


def test_bad_targets_and_devices_are_errors_on_every_rank(cupy, settings) -> None:
    with pytest.raises(TypeError, match="use_gpu takes a ProcessGrid"):
        use_gpu("world")
    with pytest.raises(ValueError, match="unknown collective path"):
        use_gpu(Communicator(MPI.COMM_SELF), comm="gloo")
    comm = Communicator(MPI.COMM_WORLD)
    try:
        with pytest.raises(ValueError, match="out of range"):
            use_gpu(comm, device_id=settings.devices)
        b = use_gpu(comm, device_id=settings.devices - 1, cuda_aware=False)
        assert b.device_id == settings.devices - 1 and b.cuda_aware_source == "given"
    finally:
        comm.free()


def test_launcher_local_rank_disagreeing_is_reported(cupy, settings, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_LOCALID", "7")
    comm = Communicator(MPI.COMM_WORLD)
    try:
        b = use_gpu(comm)
        assert "the launcher says local rank 7" in b.summary()
    finally:
        comm.free()


def test_nccl_availability_says_why_not(cupy, monkeypatch) -> None:
    from cupy.cuda import nccl

    from mpisplit.runtime.device import nccl_available

    assert nccl_available() == (True, "NCCL 2.23.4")
    monkeypatch.setattr(nccl, "get_version", lambda: (_ for _ in ()).throw(OSError("libnccl.so.2: cannot open")))
    ok, why = nccl_available()
    assert not ok and "does not load" in why and "libnccl.so.2" in why
    monkeypatch.setattr(nccl, "available", False)
    assert nccl_available() == (False, "CuPy was built without NCCL")


def test_cuda_support_without_mpi4py_query_asks_the_library(cupy, monkeypatch) -> None:
    """mpi4py without Query_cuda_support: MPIX_Query_cuda_support of the loaded libmpi (the
    MPICH wheel: a build without CUDA, so no); the environment variable decides first."""
    from mpisplit.runtime.device import mpi_cuda_support

    assert mpi_cuda_support({}) == (True, "mpi4py Query_cuda_support")  # the stand-in's answer
    monkeypatch.delattr(MPI, "Query_cuda_support")
    aware, source = mpi_cuda_support({})
    assert aware is False
    assert source.startswith("MPIX_Query_cuda_support in libmpi") or source == "the MPI library reports no CUDA support"
    assert mpi_cuda_support({"MPISPLIT_CUDA_AWARE": "1"}) == (True, "MPISPLIT_CUDA_AWARE=1")
    assert mpi_cuda_support({"MPISPLIT_CUDA_AWARE": "off"}) == (False, "MPISPLIT_CUDA_AWARE=off")
