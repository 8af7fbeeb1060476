"""GPU ranks (CuPy): skipped where CuPy or a CUDA device is missing.

References: the same computation on NumPy (float64: to ~1e-12; float32 training: to float32
tolerance), NumPy reductions of every rank's data for every collective path, the counters of
the NumPy path. The path under test comes from MPISPLIT_TEST_COMM (auto, staged, mpi, nccl;
default auto); benchmarks/device_check.sh runs this file at 1 and 2 ranks with several.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from _mpi import all_ranks_equal, divisors
from mpi4py import MPI

from mpisplit.autograd.tensor import Tensor
from mpisplit.models.config import GPTConfig
from mpisplit.models.gpt import GPT
from mpisplit.nn.linear import ColumnParallelLinear, RowParallelLinear
from mpisplit.nn.mlp import ParallelMLP
from mpisplit.parallel.comm import KINDS, Communicator
from mpisplit.parallel.device_paths import CudaAwarePath, NcclPath, StagedPath
from mpisplit.parallel.gpu import use_gpu
from mpisplit.parallel.grid import ProcessGrid
from mpisplit.runtime.backend import to_numpy
from mpisplit.runtime.device import DeviceRandom, mpi_cuda_support
from mpisplit.training.amp import MixedPrecision, compute_dtype
from mpisplit.training.optim import AdamW, average_gradients, clip_grad_norm

pytestmark = [pytest.mark.gpu, pytest.mark.mpi]

PATH = os.environ.get("MPISPLIT_TEST_COMM", "auto")
CFG = {"vocab_size": 29, "block_size": 16, "n_layer": 2, "n_head": 4, "n_embd": 32, "dropout": 0.0}


def _shared_gpu() -> bool:
    """Whether two ranks of the world sit on one GPU (NCCL refuses them)."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    ident = (MPI.Get_processor_name(), props["pciDomainID"], props["pciBusID"], props["pciDeviceID"])
    everyone = MPI.COMM_WORLD.allgather(ident)
    return len(set(everyone)) < len(everyone)


def standin() -> bool:
    """Whether cupy is tests/standin's NumPy-backed stand-in (not a real GPU)."""
    import cupy

    return bool(getattr(cupy, "standin", False))


@pytest.fixture(autouse=True)
def _host_reference_is_numpy():
    """Under the stand-in the device runs the NumPy formulas on NumPy's BLAS: the host reference
    runs them too (not the fused numba kernels), so the two may be compared bit for bit."""
    from mpisplit import kernels

    if not standin():
        yield
        return
    kernels.set_enabled(False)
    try:
        yield
    finally:
        kernels.set_enabled(None)


@pytest.fixture(autouse=True)
def _no_stream_order_violation():
    import cupy

    yield
    if standin():
        found = list(cupy._state.settings.violations)
        cupy._state.settings.violations.clear()
        assert not found, found


@pytest.fixture(autouse=True)
def _bound_and_runnable():
    with ProcessGrid(tp=1) as grid:
        use_gpu(grid, comm="staged")  # binds this rank's GPU before anything allocates
    if PATH == "nccl" and _shared_gpu():
        pytest.skip("MPISPLIT_TEST_COMM=nccl: NCCL refuses two ranks on one GPU")


def _ids(seed: int, b: int = 4, t: int = 12) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, CFG["vocab_size"], size=(b, t + 1))
    return ids[:, :-1], ids[:, 1:]


def _grid_pairs():
    """(CPU grid, GPU grid) per TP degree dividing the world size, the GPU one bound by use_gpu."""
    for tp in divisors(MPI.COMM_WORLD.Get_size()):
        if CFG["n_head"] % tp:
            continue
        cpu, gpu = ProcessGrid(tp=tp), ProcessGrid(tp=tp)
        binding = use_gpu(gpu, comm=PATH)
        try:
            yield cpu, gpu, binding
        finally:
            cpu.free()
            gpu.free()


def _rel(a, b) -> float:
    a, b = np.asarray(to_numpy(a), dtype=np.float64), np.asarray(to_numpy(b), dtype=np.float64)
    return float(np.abs(a - b).max(initial=0.0) / max(np.abs(b).max(initial=0.0), 1e-300))


# ---- binding ----------------------------------------------------------------------------------


def test_binding_and_summary() -> None:
    import cupy

    with ProcessGrid(tp=1) as grid:
        b = use_gpu(grid, comm=PATH)
        assert cupy.cuda.Device().id == b.device_id == b.local_rank % b.visible
        assert b.local_size <= MPI.COMM_WORLD.Get_size()
        assert all(p in ("mpi", "staged", "nccl") for p in b.paths.values())
        if grid.world.size > 1:
            # tp=1: the tp communicator has one rank; pp=1: the stage's is the world's ranks
            assert set(b.paths) == {"world", "dp", "stage"}
            if PATH != "auto":
                assert set(b.paths.values()) == {PATH}
        assert f"GPU {b.device_id}" in b.summary() and "collectives" in b.summary()


# ---- collectives on every path -------------------------------------------------------------


def _rank_data(rank: int, shape, dtype) -> np.ndarray:
    v = np.random.default_rng(31 + rank).integers(-200, 200, size=shape)
    return (v / 8).astype(dtype) if np.dtype(dtype).kind == "f" else v.astype(dtype)


def _available_paths(comm: Communicator) -> list[str]:
    paths = ["staged"]
    if mpi_cuda_support()[0]:
        paths.append("mpi")
    probe = ProcessGrid(tp=1, comm=comm)
    try:
        b = use_gpu(probe, comm="auto")
        if "nccl" in b.paths.values():
            paths.append("nccl")
    finally:
        probe.free()
    return paths


def _exercise(comm: Communicator, cupy, dtype) -> dict:
    p, r = comm.size, comm.rank
    everyone = [_rank_data(q, (2 * p, 6), dtype) for q in range(p)]
    x = cupy.asarray(everyone[r])
    for op, ref in (("sum", np.sum), ("max", np.max), ("min", np.min)):
        out = comm.allreduce(x, op=op)
        assert isinstance(out, cupy.ndarray) and out.dtype == x.dtype
        np.testing.assert_array_equal(out.get(), ref(np.stack(everyone), axis=0))
    y = x.copy()
    assert comm.allreduce_(y) is y
    np.testing.assert_array_equal(y.get(), np.sum(everyone, axis=0))
    strided = x.copy()[:, ::2]  # non-contiguous, reduced in place
    comm.allreduce_(strided, op="max")
    np.testing.assert_array_equal(strided.get(), np.max([e[:, ::2] for e in everyone], axis=0))
    for axis in (0, 1, -1):
        g = comm.allgather(x, axis=axis)
        assert g.flags.c_contiguous
        np.testing.assert_array_equal(g.get(), np.concatenate(everyone, axis=axis))
    for axis in (0, 1):
        if everyone[0].shape[axis] % p == 0:
            rs = comm.reduce_scatter(x, axis=axis)
            expected = np.split(np.sum(everyone, axis=0), p, axis=axis)[r]
            np.testing.assert_array_equal(rs.get(), expected)
    b = x.copy()
    comm.bcast(b, root=p - 1)
    np.testing.assert_array_equal(b.get(), everyone[p - 1])
    mask = cupy.asarray(everyone[r] > 0)
    np.testing.assert_array_equal(comm.allgather(mask, axis=0).get(), np.concatenate([e > 0 for e in everyone]))
    return comm.stats()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int64])
def test_collectives_of_every_path_equal_numpy(dtype) -> None:
    import cupy

    world = Communicator(MPI.COMM_WORLD)
    try:
        paths = _available_paths(world)
        # The NumPy path's counters: every device path must count exactly the same.
        host = Communicator(MPI.COMM_WORLD)
        reference_stats = _exercise_numpy(host, dtype)
        host.free()
        for name in paths:
            c = Communicator(MPI.COMM_WORLD)
            try:
                if c.size > 1:
                    use_gpu(c, comm=name)
                    assert c.device_path == name
                assert _exercise(c, cupy, dtype) == reference_stats, name
            finally:
                c.free()
    finally:
        world.free()


def _exercise_numpy(comm: Communicator, dtype) -> dict:
    # The same calls on host arrays: only for the counters.
    p = comm.size
    x = _rank_data(comm.rank, (2 * p, 6), dtype)
    for op in ("sum", "max", "min"):
        comm.allreduce(x, op=op)
    comm.allreduce_(x.copy())
    comm.allreduce_(x.copy()[:, ::2], op="max")
    for axis in (0, 1, -1):
        comm.allgather(x, axis=axis)
    for axis in (0, 1):
        if x.shape[axis] % p == 0:
            comm.reduce_scatter(x, axis=axis)
    comm.bcast(x.copy(), root=p - 1)
    comm.allgather(x > 0, axis=0)
    stats = comm.stats()
    assert set(stats) == set(KINDS)
    return stats


def test_path_objects_on_flat_device_buffers() -> None:
    """Each path's four flat collectives called directly (any world size, even 1)."""
    import cupy

    c = Communicator(MPI.COMM_WORLD)
    try:
        paths = [StagedPath()]
        if mpi_cuda_support()[0]:
            paths.append(CudaAwarePath())
        try:
            if not _shared_gpu():
                paths.append(NcclPath(c))
        except ImportError:
            pass
        p, r = c.size, c.rank
        everyone = [_rank_data(q, (p, 5), np.float32) for q in range(p)]
        for path in paths:
            x = cupy.asarray(everyone[r]).reshape(-1)
            out = cupy.empty_like(x)
            path.allreduce(c, x, out, "sum")
            np.testing.assert_array_equal(out.get(), np.sum(everyone, axis=0).reshape(-1), err_msg=path.name)
            g = cupy.empty((p, x.size), dtype=x.dtype)
            path.allgather(c, x, g)
            np.testing.assert_array_equal(g.get(), np.stack([e.reshape(-1) for e in everyone]), err_msg=path.name)
            block = cupy.empty(5, dtype=x.dtype)
            path.reduce_scatter(c, x.reshape(p, 5), block, "max")
            np.testing.assert_array_equal(block.get(), np.max(everyone, axis=0)[r], err_msg=path.name)
            b = x.copy()
            path.bcast(c, b, 0)
            np.testing.assert_array_equal(b.get(), everyone[0].reshape(-1), err_msg=path.name)
            path.close()
    finally:
        c.free()


def test_staged_path_reuses_pinned_buffers() -> None:
    import cupy

    c = Communicator(MPI.COMM_WORLD)
    try:
        path = StagedPath()
        c.set_device_path(path)
        x = cupy.arange(1000, dtype=cupy.float32)
        for _ in range(3):
            out = c.allreduce(x)
        if c.size > 1:
            first = path._buffers["a"]
            assert path.allocations == 1
            c.allreduce(x[:100])
            c.allreduce(x.astype(cupy.float64)[:500])
            assert path._buffers["a"] is first and path.allocations == 1
        np.testing.assert_array_equal(out.get(), np.arange(1000, dtype=np.float32) * c.size)
    finally:
        c.free()


# ---- layers and the GPT against NumPy ------------------------------------------------------------


def test_layers_on_cupy_equal_numpy_float64() -> None:
    import cupy

    from mpisplit.runtime.device import to_device

    for cpu, gpu, _ in _grid_pairs():
        rng = np.random.default_rng(4)
        x64 = rng.standard_normal((3, 5, 12))
        for make in (
            lambda g: ColumnParallelLinear(12, 10, g.tp_comm, dtype="float64", gather_output=True, seed=1),
            lambda g: RowParallelLinear(12, 7, g.tp_comm, dtype="float64", input_is_parallel=False, seed=1),
            lambda g: ParallelMLP(12, 20, g.tp_comm, dtype="float64", seed=1),
        ):
            host, dev = make(cpu), to_device(make(gpu))
            xh, xd = Tensor(x64, requires_grad=True), Tensor(cupy.asarray(x64), requires_grad=True)
            yh, yd = host(xh), dev(xd)
            assert isinstance(yd.data, cupy.ndarray)
            assert _rel(yd.data, yh.data) < 1e-12
            gy = rng.standard_normal(yh.shape)
            yh.backward(gy)
            yd.backward(cupy.asarray(gy))
            assert _rel(xd.grad, xh.grad) < 1e-12
            for (name, ph), pd in zip(host.named_parameters(), dev.parameters()):
                assert _rel(pd.grad, ph.grad) < 1e-12, name


def test_gpt_on_cupy_equals_numpy_float64() -> None:
    for cpu, gpu, _ in _grid_pairs():
        host = GPT(GPTConfig(**CFG), cpu, dtype="float64", seed=2)
        dev = GPT(GPTConfig(**CFG), gpu, dtype="float64", seed=2, device="gpu")
        x, y = _ids(0)
        lh, ld = host.loss(x, y), dev.loss(x, y)
        assert abs(float(to_numpy(ld.data)) - float(lh.data)) < 1e-12
        lh.backward()
        ld.backward()
        for (name, ph), pd in zip(host.named_parameters(), dev.parameters()):
            assert _rel(pd.grad, ph.grad) < 1e-10, name
        assert _rel(dev(x).data, host(x).data) < 1e-12  # gathered logits
        out_h = host.generate(x[:1, :4], 5)
        out_d = dev.generate(x[:1, :4], 5)
        np.testing.assert_array_equal(out_d, out_h)


def test_packed_rows_and_lora_dropout_on_cupy() -> None:
    """Packed rows with LoRA adapters on the device equal the host (positions on the device:
    learned and rotary positions, the block-diagonal mask); LoRA's dropout draws its masks on
    the device (not the host's masks) and full recomputation replays them bit for bit."""
    from mpisplit.models.lora import apply_lora
    from mpisplit.nn.lora import LoraConfig

    positions = np.tile(np.concatenate([np.arange(5), np.arange(7)]), (4, 1))
    llama = {**CFG, "family": "llama", "norm": "rmsnorm", "mlp": "swiglu", "positions": "rotary", "n_kv_head": 2,
             "qkv_bias": False, "out_bias": False, "mlp_bias": False}
    x, y = _ids(1)

    def run(cfg, grid, device, dropout=0.0, recompute="none"):
        model = GPT(GPTConfig(**cfg), grid, dtype="float64", seed=2, device=device, recompute=recompute)
        if cfg is llama:
            apply_lora(model, LoraConfig(rank=2, alpha=4.0, dropout=dropout), seed=1)
            for n, p in model.named_parameters():
                if n.endswith(".lora.b"):
                    p.data[...] = 0.5
        loss = model.loss(x, y, positions=positions)
        loss.backward()
        return float(to_numpy(loss.data)), [p.grad for p in model.parameters()]

    for cpu, gpu, _ in _grid_pairs():
        for cfg in (CFG, llama):
            (lh, gh), (ld, gd) = run(cfg, cpu, "cpu"), run(cfg, gpu, "gpu")
            assert abs(ld - lh) < 1e-12
            for a, b in zip(gd, gh):
                assert (a is None) == (b is None) and (a is None or _rel(a, b) < 1e-10)
        (l0, g0), (l1, g1) = run(llama, gpu, "gpu", 0.3), run(llama, gpu, "gpu", 0.3, "full")
        assert l0 == l1 and abs(l0 - run(llama, gpu, "gpu")[0]) > 1e-6  # the masks act
        assert all(a is None or np.array_equal(to_numpy(a), to_numpy(b)) for a, b in zip(g0, g1))


def test_paged_serving_engine_on_cupy_equals_numpy_float64() -> None:
    """The serving engine with its KV blocks on the GPU (gathered attention) against the same
    engine on the host (the compiled kernel or NumPy): the same greedy tokens, logits to 1e-10,
    with prefix reuse and preemption in an 8-block pool."""
    from mpisplit.serving.engine import Engine, SequenceSpec
    from mpisplit.serving.sampling import SamplingParams

    def run(model):
        eng = Engine(model, max_batch=4, prefill_chunk=5, kv_blocks=8, kv_block_size=4)
        prompts = [list(range(1, 9)), list(range(1, 9)) + [20], [7, 3, 9]]  # 14, 15, 9 positions: 11 blocks
        pending = [SequenceSpec(i, p, 6, SamplingParams(temperature=0.0)) for i, p in enumerate(prompts)]
        got = {i: [] for i in range(len(prompts))}
        while pending or eng.running:
            if pending and eng.can_admit(pending[0]):
                eng.add(pending.pop(0))
            for out in eng.step():
                got[out.rid].append((out.token, out.logits))
        return got, eng

    for cpu, gpu, _ in _grid_pairs():
        host = GPT(GPTConfig(**CFG), cpu, dtype="float64", seed=2)
        dev = GPT(GPTConfig(**CFG), gpu, dtype="float64", seed=2, device="gpu")
        host.eval()
        dev.eval()
        (want, _), (got, eng) = run(host), run(dev)
        assert eng.blocks.hit_tokens > 0 and eng.preemptions > 0 and eng.blocks.used == 0
        for rid in want:
            assert [t for t, _ in got[rid]] == [t for t, _ in want[rid]], rid
            assert _rel(np.array([lg for _, lg in got[rid]]), np.array([lg for _, lg in want[rid]])) < 1e-10


def test_training_steps_on_gpu_equal_cpu_float32() -> None:
    for cpu, gpu, binding in _grid_pairs():
        host = GPT(GPTConfig(**CFG), cpu, seed=5)
        dev = GPT(GPTConfig(**CFG), gpu, seed=5, device="gpu")
        oh = AdamW(host.parameters(), lr=3e-3, weight_decay=0.1)
        od = AdamW(dev.parameters(), lr=3e-3, weight_decay=0.1)
        for g in (cpu, gpu):
            for c in (g.world, g.tp_comm, g.dp_comm):
                c.reset_stats()
        for step in range(4):
            x, y = _ids(10 + step + 100 * cpu.dp_rank)
            for model, opt, g in ((host, oh, cpu), (dev, od, gpu)):
                loss = model.loss(x, y)
                loss.backward()
                average_gradients(model.parameters(), g.dp_comm)
                norm = clip_grad_norm(model.parameters(), 1.0, g.tp_comm)
                opt.step()
                opt.zero_grad()
                if model is host:
                    lh, nh = float(loss.data), norm
                else:
                    ld, nd = float(to_numpy(loss.data)), norm
            assert abs(ld - lh) < 1e-5 * abs(lh) and abs(nd - nh) < 1e-4 * nh, (step, ld, lh, nd, nh)
        for (name, ph), pd in zip(host.named_parameters(), dev.parameters()):
            # AdamW moves an entry by ~lr whatever its gradient's size: an entry whose gradient
            # is ~0 may step either way on the two devices. All but a few per mille must agree.
            # The key bias's gradient is zero in exact arithmetic (softmax ignores a shift of every
            # key): it is rounding noise, summed in another order on the device path (NCCL's, the
            # host ring's), so AdamW may step each entry either way. It is left out, after checking
            # that no entry moved further than AdamW's 2 lr a step.
            d = to_numpy(pd.data)
            assert float(np.abs(d - ph.data).max()) <= 2 * 3e-3 * 4 * 1.01, name
            keep = np.ones(d.shape, dtype=bool)
            if name.endswith("c_attn.bias"):  # local [q | k | v]: the middle third is k
                third = d.shape[0] // 3
                keep[third: 2 * third] = False
            far = ~np.isclose(d, ph.data, rtol=1e-4, atol=1e-6) & keep
            assert far.sum() <= max(1, 1e-3 * keep.sum()), (name, int(far.sum()), int(keep.sum()))
        # The device paths count exactly what the host path counts.
        for a, b in ((cpu.world, gpu.world), (cpu.tp_comm, gpu.tp_comm), (cpu.dp_comm, gpu.dp_comm)):
            assert a.stats() == b.stats(), binding.summary()


def test_a_training_step_makes_no_hidden_host_sync() -> None:
    import cupyx

    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as grid:
        use_gpu(grid)
        model = GPT(GPTConfig(**CFG), grid, seed=0, device="gpu")
        opt = AdamW(model.parameters(), lr=1e-3)
        x, y = _ids(1)
        model.loss(x, y).backward()  # warm-up: kernels compiled, memory pool filled
        opt.step()
        opt.zero_grad()
        with cupyx.allow_synchronize(False):
            loss = model.loss(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        assert np.isfinite(float(to_numpy(loss.data)))  # the one read per step, outside


def test_dropout_masks_come_from_the_host_generator_state() -> None:
    import cupy

    a = DeviceRandom(np.random.default_rng(9))
    b = DeviceRandom(np.random.default_rng(9))
    ma, mb = a.random((64, 64), dtype=np.float32), b.random((64, 64), dtype=np.float32)
    assert isinstance(ma, cupy.ndarray) and bool((ma == mb).all())
    assert 0.45 < float(ma.mean()) < 0.55
    state = a.bit_generator.state
    first = a.random((8,))
    a.bit_generator.state = state  # restoring the host state replays the device stream
    assert bool((a.random((8,)) == first).all())
    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as grid:
        use_gpu(grid)
        model = GPT(GPTConfig(**{**CFG, "dropout": 0.2}), grid, seed=0, device="gpu")
        x, y = _ids(2)
        model.loss(x, y).backward()
        assert all(p.grad is not None and bool(cupy.isfinite(p.grad).all()) for p in model.parameters())


# ---- mixed precision on the GPU -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_amp_step_runs_and_skips_on_overflow(dtype: str) -> None:
    import cupy

    if dtype == "bfloat16":
        try:
            compute_dtype("bfloat16", cupy)
        except ValueError as exc:
            pytest.skip(str(exc))
    for _, gpu, _ in _grid_pairs():
        master = GPT(GPTConfig(**CFG), gpu, seed=3, device="gpu")
        net = GPT(GPTConfig(**CFG), gpu, init=False, device="gpu")
        mp = MixedPrecision(net, master, dtype, gpu.world)
        assert all(p.dtype.name == dtype and isinstance(p.data, cupy.ndarray) for p in net.parameters())
        opt = AdamW(master.parameters(), lr=1e-2)
        x, y = _ids(3)
        losses = []
        for _ in range(4):
            loss = net.loss(x, y)
            assert loss.dtype == np.float32
            mp.backward(loss)
            result = mp.step(opt, dp_comm=gpu.dp_comm, tp_comm=gpu.tp_comm, max_norm=1.0)
            assert not result["skipped"]
            losses.append(float(to_numpy(loss.data)))
        assert losses[-1] < losses[0]
        before = [m.data.copy() for m in master.parameters()]
        mp.backward(net.loss(x, y))
        if gpu.rank == gpu.world.size - 1:
            net.h[0].attn.c_attn.weight.grad[0, 0] = cupy.inf
        scale = mp.scale
        result = mp.step(opt, dp_comm=gpu.dp_comm, tp_comm=gpu.tp_comm, max_norm=1.0)
        assert result["skipped"] and mp.scale == scale / 2 and all_ranks_equal(gpu.world, result["skipped"])
        for m, b in zip(master.parameters(), before):
            assert bool((m.data == b).all())
