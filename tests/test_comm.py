"""Communicator collectives against NumPy references built from every rank's data.

Each rank's data is a deterministic function of its rank, so every rank can compute the
reference for all ranks locally. Float data are multiples of 1/8 with small magnitude, so every
sum is exact in float32 and float64 whatever order MPI adds in: results compare bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import world
from mpi4py import MPI

from mpisplit.parallel.comm import HOST_RING_ALLREDUCE_MIN_BYTES, KINDS, MAX_COUNT, Communicator

pytestmark = pytest.mark.mpi

DTYPES = [np.float32, np.float64, np.int64]
OPS = {"sum": np.sum, "max": np.max, "min": np.min}


def rank_data(rank: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    rng = np.random.default_rng(1234 + rank)
    values = rng.integers(-1000, 1000, size=shape)
    if np.dtype(dtype).kind == "f":
        return (values / 8).astype(dtype)
    return values.astype(dtype)


def all_data(size: int, shape: tuple[int, ...], dtype: type) -> list[np.ndarray]:
    return [rank_data(r, shape, dtype) for r in range(size)]


@pytest.fixture
def comm():
    c = Communicator(MPI.COMM_WORLD)
    yield c
    c.free()


def zero_stats() -> dict[str, dict[str, int]]:
    return {kind: {"calls": 0, "bytes": 0} for kind in KINDS}


def test_dup_and_free() -> None:
    c = Communicator(MPI.COMM_WORLD)
    assert (c.rank, c.size) == (MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size)
    assert c.mpi != MPI.COMM_WORLD
    assert MPI.Comm.Compare(c.mpi, MPI.COMM_WORLD) == MPI.CONGRUENT
    c2 = Communicator(c)  # from a Communicator: a dup of its dup
    assert c2.mpi != c.mpi and MPI.Comm.Compare(c2.mpi, c.mpi) == MPI.CONGRUENT
    c2.free()
    with c:
        assert repr(c) == f"Communicator(rank={c.rank}, size={c.size})"
    assert c.mpi == MPI.COMM_NULL
    c.free()  # a second free is harmless


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_allreduce(comm: Communicator, dtype: type, op: str, shape: tuple[int, ...]) -> None:
    x = rank_data(comm.rank, shape, dtype)
    x_before = x.copy()
    expected = OPS[op](np.stack(all_data(comm.size, shape, dtype)), axis=0)
    out = comm.allreduce(x, op=op)
    assert out is not x and out.dtype == np.dtype(dtype) and out.shape == shape
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(x, x_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", list(OPS))
def test_allreduce_inplace(comm: Communicator, dtype: type, op: str) -> None:
    x = rank_data(comm.rank, (4, 6), dtype)
    expected = OPS[op](np.stack(all_data(comm.size, (4, 6), dtype)), axis=0)
    assert comm.allreduce_(x, op=op) is x
    np.testing.assert_array_equal(x, expected)


def test_allreduce_inplace_noncontiguous_view(comm: Communicator) -> None:
    base = rank_data(comm.rank, (4, 6), np.float64)
    view = base[:, ::2]  # (4, 3), strided
    untouched = base[:, 1::2].copy()
    expected = np.sum([d[:, ::2] for d in all_data(comm.size, (4, 6), np.float64)], axis=0)
    assert comm.allreduce_(view, op="sum") is view
    np.testing.assert_array_equal(base[:, ::2], expected)
    np.testing.assert_array_equal(base[:, 1::2], untouched)


def test_allreduce_noncontiguous_input(comm: Communicator) -> None:
    x = rank_data(comm.rank, (5, 3), np.float32).T  # (3, 5), Fortran order
    expected = np.sum([d.T for d in all_data(comm.size, (5, 3), np.float32)], axis=0)
    np.testing.assert_array_equal(comm.allreduce(x), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_allgather(comm: Communicator, dtype: type, axis: int) -> None:
    shape = (2, 3, 4)
    x = rank_data(comm.rank, shape, dtype)
    expected = np.concatenate(all_data(comm.size, shape, dtype), axis=axis)
    out = comm.allgather(x, axis=axis)
    assert out.flags.c_contiguous and out.dtype == np.dtype(dtype)
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)


def test_allgather_default_axis_is_last(comm: Communicator) -> None:
    x = rank_data(comm.rank, (3, 2), np.float64)
    expected = np.concatenate(all_data(comm.size, (3, 2), np.float64), axis=-1)
    np.testing.assert_array_equal(comm.allgather(x), expected)


def test_allgather_noncontiguous_and_bool(comm: Communicator) -> None:
    x = rank_data(comm.rank, (4, 3), np.float64)[::2]  # (2, 3), strided rows
    expected = np.concatenate([d[::2] for d in all_data(comm.size, (4, 3), np.float64)], axis=1)
    np.testing.assert_array_equal(comm.allgather(x, axis=1), expected)
    mask = np.arange(3) == comm.rank % 3
    expected_mask = np.concatenate([np.arange(3) == r % 3 for r in range(comm.size)])
    np.testing.assert_array_equal(comm.allgather(mask, axis=0), expected_mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("op", list(OPS))
def test_reduce_scatter(comm: Communicator, dtype: type, axis: int, op: str) -> None:
    shape = [3, 2, 5]
    shape[axis] = 2 * comm.size  # divisible by the size, two entries per rank
    shape = tuple(shape)
    x = rank_data(comm.rank, shape, dtype)
    total = OPS[op](np.stack(all_data(comm.size, shape, dtype)), axis=0)
    expected = np.split(total, comm.size, axis=axis)[comm.rank]
    out = comm.reduce_scatter(x, axis=axis, op=op)
    assert out.flags.c_contiguous and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [slice(0, 7), slice(2, 5), slice(6, 7), slice(3, 3)])
def test_rows_in_place(comm: Communicator, dtype: type, cols: slice) -> None:
    # (size, 7): row q is rank q's part; one column range per call, other columns untouched
    size, r = comm.size, comm.rank
    x = rank_data(r, (size, 7), dtype)
    before = x.copy()
    ref = np.sum(np.stack(all_data(size, (size, 7), dtype)), axis=0)
    comm.reset_stats()
    comm.reduce_scatter_rows_(x, cols)
    want = before.copy()
    want[r, cols] = ref[r, cols]
    np.testing.assert_array_equal(x, want)
    mine = [rank_data(q, (size, 7), dtype)[q] + 1 for q in range(size)]  # rank q's row, as q holds it
    y = before.copy()
    y[r] = mine[r]
    comm.allgather_rows_(y, cols)
    want = before.copy()
    want[r] = mine[r]
    for q in range(size):
        want[q, cols] = mine[q][cols]
    np.testing.assert_array_equal(y, want)
    n = len(range(7)[cols])
    each = {"calls": 1, "bytes": size * n * np.dtype(dtype).itemsize} if size > 1 else {"calls": 0, "bytes": 0}
    stats = comm.stats()
    assert stats["reduce_scatter"] == each and stats["allgather"] == each


def test_rows_bad_input(comm: Communicator) -> None:
    with pytest.raises(ValueError, match=r"needs a C-contiguous \(\d+, m\) array, got shape \(5,\)"):
        comm.reduce_scatter_rows_(np.zeros(5), slice(0, 1))
    with pytest.raises(TypeError, match="cols must be a slice with step 1"):
        comm.allgather_rows_(np.zeros((comm.size, 4)), slice(0, 4, 2))


def test_reduce_scatter_default_is_sum_over_axis0(comm: Communicator) -> None:
    shape = (comm.size, 3)
    total = np.sum(all_data(comm.size, shape, np.float64), axis=0)
    out = comm.reduce_scatter(rank_data(comm.rank, shape, np.float64))
    np.testing.assert_array_equal(out, total[comm.rank : comm.rank + 1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_bcast(comm: Communicator, dtype: type) -> None:
    for root in sorted({0, comm.size - 1}):
        x = rank_data(comm.rank, (3, 4), dtype)
        assert comm.bcast(x, root=root) is x
        np.testing.assert_array_equal(x, rank_data(root, (3, 4), dtype))


def test_bcast_noncontiguous(comm: Communicator) -> None:
    base = np.full((4, 4), float(comm.rank))
    comm.bcast(base[:, 1], root=0)
    expected = np.full((4, 4), float(comm.rank))
    expected[:, 1] = 0.0
    np.testing.assert_array_equal(base, expected)


def test_counters_exact(comm: Communicator) -> None:
    p = comm.size
    assert comm.stats() == zero_stats()
    a = np.zeros((3, 4), np.float32)  # 48 bytes
    comm.allreduce(a)
    comm.allreduce_(a, op="max")
    comm.allgather(np.zeros(5, np.float64), axis=0)  # result 40 * p bytes
    comm.reduce_scatter(np.zeros((2 * p, 3), np.float64))  # input 48 * p bytes
    comm.bcast(np.zeros(7, np.int64))  # 56 bytes
    comm.barrier()
    stats = comm.stats()
    if p == 1:
        assert stats == zero_stats()  # size-1 fast path: nothing ran
    else:
        assert stats == {
            "allreduce": {"calls": 2, "bytes": 96},
            "allgather": {"calls": 1, "bytes": 40 * p},
            "reduce_scatter": {"calls": 1, "bytes": 48 * p},
            "bcast": {"calls": 1, "bytes": 56},
        }
    stats["allreduce"]["calls"] = 99  # a copy: the communicator's own counters do not change
    assert comm.stats()["allreduce"]["calls"] == (2 if p > 1 else 0)
    comm.reset_stats()
    assert comm.stats() == zero_stats()


def test_size_one_fast_path_returns_copies() -> None:
    c = Communicator(MPI.COMM_SELF)
    x = np.arange(6.0).reshape(2, 3)
    for out in (c.allreduce(x), c.allgather(x, axis=0), c.reduce_scatter(x, axis=1)):
        assert out is not x
        np.testing.assert_array_equal(out, x)
    assert c.allreduce_(x) is x and c.bcast(x) is x
    np.testing.assert_array_equal(x, np.arange(6.0).reshape(2, 3))
    assert c.stats() == zero_stats()
    c.free()


def test_zero_size_arrays(comm: Communicator) -> None:
    x = np.zeros((0, 3))
    assert comm.allreduce(x).shape == (0, 3)
    assert comm.allgather(x, axis=1).shape == (0, 3 * comm.size)
    comm.bcast(x)
    assert comm.stats()["allreduce"]["calls"] == (1 if comm.size > 1 else 0)


class CountingComm:
    """Stands in for comm.mpi and counts the MPI calls that pass through it."""

    def __init__(self, inner: MPI.Intracomm) -> None:
        self.inner = inner
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str):
        target = getattr(self.inner, name)
        if not callable(target):
            return target

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return target(*args, **kwargs)

        return counted


@pytest.mark.parametrize("max_count", [1, 3, 4])
def test_slicing_to_max_count(max_count: int) -> None:
    # 10 elements per message: ceil(10 / max_count) MPI calls for each collective.
    c = Communicator(MPI.COMM_WORLD, max_count=max_count)
    real = c.mpi
    counting = CountingComm(real)
    c.mpi = counting  # type: ignore[assignment]
    p, r = c.size, c.rank
    n_calls = math.ceil(10 / max_count)
    try:
        x = rank_data(r, (2, 5), np.float64)
        everyone = all_data(p, (2, 5), np.float64)
        np.testing.assert_array_equal(c.allreduce(x), np.sum(everyone, axis=0))
        y = x.copy()
        c.allreduce_(y, op="min")
        np.testing.assert_array_equal(y, np.min(everyone, axis=0))
        b = x.copy()
        c.bcast(b, root=p - 1)
        np.testing.assert_array_equal(b, everyone[p - 1])
        np.testing.assert_array_equal(c.allgather(x, axis=1), np.concatenate(everyone, axis=1))
        # reduce_scatter: 10 elements per rank's block.
        z = rank_data(r, (2 * p, 5), np.float64)
        total = np.sum(all_data(p, (2 * p, 5), np.float64), axis=0)
        np.testing.assert_array_equal(c.reduce_scatter(z, axis=0), np.split(total, p, axis=0)[r])
        if p > 1:
            assert counting.calls == {
                "Allreduce": 2 * n_calls,
                "Bcast": n_calls,
                "Allgather": n_calls,
                "Reduce_scatter_block": n_calls,
            }
            # Counters count logical collectives, not slices.
            assert c.stats()["allreduce"] == {"calls": 2, "bytes": 2 * 80}
        else:
            assert counting.calls == {}
    finally:
        c.mpi = real
        c.free()


def ring_order_sum(parts: list[np.ndarray], piece: int) -> np.ndarray:
    """The ring all-reduce's sums, formed here in its order: per piece of `piece` elements cut
    into p segments (segment c = elements [c n // p, (c + 1) n // p) of an n-element piece),
    segment c summed as x[c] + (x[c - 1] + (... + (x[c + 2] + x[c + 1])))."""
    p, total = len(parts), parts[0].size
    out = np.empty_like(parts[0])
    for lo in range(0, total, piece):
        n = min(piece, total - lo)
        for c in range(p):
            seg = slice(lo + c * n // p, lo + (c + 1) * n // p)
            acc = parts[(c + 1) % p][seg].copy()
            for k in range(2, p + 1):
                acc = parts[(c + k) % p][seg] + acc
            out[seg] = acc
    return out


@pytest.mark.parametrize("n, chunk_bytes", [(1000, 64), (37, 16), (3, 8), (5000, 4 << 20)])
@pytest.mark.parametrize("op", list(OPS))
def test_ring_allreduce_order_pieces_and_identical_bits(
    comm: Communicator, monkeypatch: pytest.MonkeyPatch, n: int, chunk_bytes: int, op: str
) -> None:
    # Every host all-reduce through the ring (threshold 0), in pieces of chunk_bytes per rank's
    # segment: sizes that divide neither by the ranks nor by the piece, segments of 0 elements.
    from mpisplit.parallel import comm as comm_module

    monkeypatch.setattr(comm_module, "HOST_RING_ALLREDUCE_MIN_BYTES", 0)
    monkeypatch.setattr(comm_module, "HOST_ALLREDUCE_CHUNK_BYTES", chunk_bytes)
    parts = [np.random.default_rng(r).standard_normal(n).astype(np.float32) for r in range(comm.size)]
    x = parts[comm.rank].copy()
    comm.allreduce_(x, op=op)
    if op == "sum":  # not exact: the ring's own order, bit for bit
        expected = ring_order_sum(parts, comm.size * (chunk_bytes // 4))
        np.testing.assert_allclose(x, np.sum(np.stack(parts).astype(np.float64), axis=0), rtol=1e-5, atol=1e-5)
    else:
        expected = OPS[op](np.stack(parts), axis=0)
    np.testing.assert_array_equal(x, expected)
    everyone = comm.allgather(x[None], axis=0)
    assert all(np.array_equal(everyone[0], row) for row in everyone)  # the same bits on every rank
    y = comm.allreduce(parts[comm.rank], op=op)  # the copying form takes the same path
    np.testing.assert_array_equal(y, expected)
    assert comm.stats()["allreduce"]["calls"] == (2 if comm.size > 1 else 0)  # size 1: no call


def test_large_allreduce_takes_the_ring(comm: Communicator) -> None:
    # At or above HOST_RING_ALLREDUCE_MIN_BYTES a host all-reduce is 2 (p - 1) Sendrecv per
    # piece and no MPI Allreduce; below it, MPI's Allreduce.
    from mpisplit.parallel.comm import HOST_ALLREDUCE_CHUNK_BYTES, HOST_RING_ALLREDUCE_MIN_BYTES

    real = comm.mpi
    counting = CountingComm(real)
    comm.mpi = counting  # type: ignore[assignment]
    try:
        p = comm.size
        big = rank_data(comm.rank, (3 * p * HOST_ALLREDUCE_CHUNK_BYTES // 8 + 5,), np.float64)
        assert big.nbytes >= HOST_RING_ALLREDUCE_MIN_BYTES
        expected = np.sum(all_data(p, big.shape, np.float64), axis=0)
        comm.allreduce_(big)
        np.testing.assert_array_equal(big, expected)  # multiples of 1/8: exact in any order
        small = rank_data(comm.rank, (HOST_RING_ALLREDUCE_MIN_BYTES // 8 - 1,), np.float64)
        comm.allreduce_(small, op="max")
        np.testing.assert_array_equal(small, np.max(all_data(p, small.shape, np.float64), axis=0))
        if p > 1:  # (the ranks of one node: the first large all-reduce asks MPI once)
            assert counting.calls == {"Split_type": 1, "Sendrecv": 2 * (p - 1) * 4, "Allreduce": 1}
        else:
            assert counting.calls == {}
    finally:
        comm.mpi = real


@pytest.mark.parametrize(("choice", "ring"), [("ring", True), ("mpi", False), ("auto", True)])
def test_allreduce_choice(comm: Communicator, monkeypatch: pytest.MonkeyPatch, choice: str, ring: bool) -> None:
    """MPISPLIT_ALLREDUCE forces the ring or MPI's Allreduce for large host all-reduces; auto takes
    the ring on the ranks of one node (every test here: tests/test_hosts.py has the other case)."""
    monkeypatch.setenv("MPISPLIT_ALLREDUCE", choice)
    real = comm.mpi
    counting = CountingComm(real)
    comm.mpi = counting  # type: ignore[assignment]
    try:
        big = rank_data(comm.rank, (HOST_RING_ALLREDUCE_MIN_BYTES // 8 + 3,), np.float64)
        comm.allreduce_(big)
        np.testing.assert_array_equal(big, np.sum(all_data(comm.size, big.shape, np.float64), axis=0))
        if comm.size > 1:
            assert ("Sendrecv" in counting.calls) == ring and ("Allreduce" in counting.calls) != ring
    finally:
        comm.mpi = real
    assert not comm.spans_nodes()


def test_allreduce_choice_is_checked(comm: Communicator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPISPLIT_ALLREDUCE", "fast")
    big = np.zeros(HOST_RING_ALLREDUCE_MIN_BYTES // 8 + 3)
    with pytest.raises(ValueError, match="MPISPLIT_ALLREDUCE must be one of auto, ring, mpi, got 'fast'"):
        comm.allreduce_(big) if comm.size > 1 else comm._ring_allreduces()


def test_default_max_count() -> None:
    assert MAX_COUNT == 2**31 - 1
    c = Communicator(MPI.COMM_SELF)
    assert c.max_count == MAX_COUNT
    c.free()


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_max_count(bad: object) -> None:
    with pytest.raises(ValueError, match="max_count"):
        Communicator(MPI.COMM_SELF, max_count=bad)  # type: ignore[arg-type]


def test_bad_communicator_argument() -> None:
    with pytest.raises(TypeError, match="Intracomm"):
        Communicator("world")  # type: ignore[arg-type]


def test_argument_errors_raise_on_every_rank(comm: Communicator) -> None:
    # All checks are local and identical on every rank; none reaches a collective.
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="unknown reduction op 'prod'"):
        comm.allreduce(x, op="prod")
    with pytest.raises(ValueError, match="unknown reduction op"):
        comm.allreduce_(x, op="avg")
    with pytest.raises(TypeError, match="dtype bool"):
        comm.allreduce(np.zeros(3, dtype=bool))
    with pytest.raises(TypeError, match="dtype complex128"):
        comm.reduce_scatter(np.zeros(comm.size, dtype=complex))
    with pytest.raises(TypeError, match="NumPy or CuPy array, got list"):
        comm.allreduce([1.0, 2.0])
    with pytest.raises(ValueError, match=r"axis 2 out of range for shape \(2, 3\)"):
        comm.allgather(x, axis=2)
    with pytest.raises(ValueError, match="out of range"):
        comm.reduce_scatter(x, axis=-3)
    with pytest.raises(TypeError, match="axis must be an int"):
        comm.allgather(x, axis=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"root {comm.size} out of range"):
        comm.bcast(x, root=comm.size)
    with pytest.raises(ValueError, match="root -1 out of range"):
        comm.bcast(x, root=-1)
    readonly = np.zeros(3)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        comm.allreduce_(readonly)
    with pytest.raises(ValueError, match="writeable"):
        comm.bcast(readonly)
    assert comm.stats() == zero_stats()
    comm.barrier()  # every rank got here: nobody is stuck in a collective


@world(min_size=2)  # every length is divisible by 1
def test_reduce_scatter_not_divisible(comm: Communicator) -> None:
    x = np.zeros((3, comm.size + 1))
    with pytest.raises(ValueError) as info:
        comm.reduce_scatter(x, axis=1)
    msg = str(info.value)
    assert f"({3}, {comm.size + 1})" in msg and f"size {comm.size}" in msg
    assert f"length {comm.size + 1}" in msg
    comm.barrier()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_collectives_on_cupy_arrays(comm: Communicator, dtype: type) -> None:
    # Same references as the NumPy tests; results must stay on the device.
    import cupy

    p, r = comm.size, comm.rank
    everyone = all_data(p, (2 * p, 3), dtype)
    x = cupy.asarray(everyone[r])

    out = comm.allreduce(x, op="max")
    assert isinstance(out, cupy.ndarray) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out.get(), np.max(everyone, axis=0))

    y = x.copy()
    assert comm.allreduce_(y) is y
    np.testing.assert_array_equal(y.get(), np.sum(everyone, axis=0))

    view = x.copy()[:, ::2]  # strided device view, reduced in place
    comm.allreduce_(view, op="min")
    np.testing.assert_array_equal(view.get(), np.min([d[:, ::2] for d in everyone], axis=0))

    g = comm.allgather(x, axis=1)
    assert isinstance(g, cupy.ndarray) and g.flags.c_contiguous
    np.testing.assert_array_equal(g.get(), np.concatenate(everyone, axis=1))

    rs = comm.reduce_scatter(x, axis=0)
    assert isinstance(rs, cupy.ndarray)
    np.testing.assert_array_equal(rs.get(), np.split(np.sum(everyone, axis=0), p, axis=0)[r])

    b = x.copy()
    assert comm.bcast(b, root=p - 1) is b
    np.testing.assert_array_equal(b.get(), everyone[p - 1])
