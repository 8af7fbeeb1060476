"""ProcessGrid: rank mapping world = dp_rank * tp + tp_rank, group membership, validation."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpisplit.parallel.comm import Communicator
from mpisplit.parallel.grid import ProcessGrid

pytestmark = pytest.mark.mpi


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@pytest.mark.parametrize("explicit_dp", [False, True])
def test_rank_mapping_for_every_tp(explicit_dp: bool) -> None:
    world = MPI.COMM_WORLD
    rank, size = world.rank, world.size
    for tp in divisors(size):
        dp = size // tp
        with ProcessGrid(tp=tp, dp=dp if explicit_dp else None) as grid:
            assert (grid.tp, grid.dp, grid.rank) == (tp, dp, rank)
            assert grid.tp_rank == rank % tp and grid.dp_rank == rank // tp
            assert grid.dp_rank * tp + grid.tp_rank == rank
            assert (grid.tp_comm.size, grid.tp_comm.rank) == (tp, grid.tp_rank)
            assert (grid.dp_comm.size, grid.dp_comm.rank) == (dp, grid.dp_rank)
            assert grid.world.size == size and grid.world.rank == rank
            # Members, in communicator rank order, by world rank.
            tp_members = grid.tp_comm.allgather(np.array([rank]), axis=0)
            dp_members = grid.dp_comm.allgather(np.array([rank]), axis=0)
            np.testing.assert_array_equal(tp_members, [grid.dp_rank * tp + i for i in range(tp)])
            np.testing.assert_array_equal(dp_members, [j * tp + grid.tp_rank for j in range(dp)])
            assert repr(grid) == (
                f"ProcessGrid(dp={dp}, tp={tp}, rank={rank}, "
                f"dp_rank={grid.dp_rank}, tp_rank={grid.tp_rank})"
            )
        for c in (grid.world, grid.tp_comm, grid.dp_comm):
            assert c.mpi == MPI.COMM_NULL


def test_default_is_pure_data_parallel() -> None:
    grid = ProcessGrid()
    assert (grid.tp, grid.dp, grid.tp_rank, grid.dp_rank) == (
        1,
        MPI.COMM_WORLD.size,
        0,
        MPI.COMM_WORLD.rank,
    )
    grid.free()


def test_grid_over_a_communicator_and_a_subcommunicator() -> None:
    c = Communicator(MPI.COMM_WORLD)
    grid = ProcessGrid(tp=c.size, comm=c)
    assert grid.tp_rank == c.rank and grid.dp == 1
    assert MPI.Comm.Compare(grid.world.mpi, c.mpi) == MPI.CONGRUENT
    grid.free()
    c.free()
    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as alone:
        assert (alone.tp, alone.dp, alone.rank) == (1, 1, 0)


def test_tp_collectives_stay_in_the_group() -> None:
    size = MPI.COMM_WORLD.size
    tp = 2 if size % 2 == 0 else 1
    with ProcessGrid(tp=tp) as grid:
        x = np.array([float(grid.rank)])
        # sum of world ranks dp_rank*tp + i over i < tp
        expected = sum(grid.dp_rank * tp + i for i in range(tp))
        np.testing.assert_array_equal(grid.tp_comm.allreduce(x), [expected])
        expected_dp = sum(j * tp + grid.tp_rank for j in range(grid.dp))
        np.testing.assert_array_equal(grid.dp_comm.allreduce(x), [expected_dp])


def test_tp_not_dividing_world_size_raises_on_every_rank() -> None:
    size = MPI.COMM_WORLD.size
    tp = size + 1
    with pytest.raises(ValueError) as info:
        ProcessGrid(tp=tp)
    msg = str(info.value)
    assert f"world size {size}" in msg and f"tp={tp}" in msg
    assert f"valid tp values: {divisors(size)}" in msg
    MPI.COMM_WORLD.Barrier()  # every rank raised and got here


def test_dp_times_tp_mismatch_raises_on_every_rank() -> None:
    size = MPI.COMM_WORLD.size
    with pytest.raises(ValueError) as info:
        ProcessGrid(tp=1, dp=size + 1)
    msg = str(info.value)
    assert f"world size {size}" in msg and "tp=1" in msg and f"dp={size + 1}" in msg
    assert f"valid tp values: {divisors(size)}" in msg
    MPI.COMM_WORLD.Barrier()


@pytest.mark.parametrize(
    "tp, error",
    [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)],
)
def test_bad_tp(tp: object, error: type) -> None:
    with pytest.raises(error, match="tp must be"):
        ProcessGrid(tp=tp)  # type: ignore[arg-type]


def test_bad_dp_and_comm() -> None:
    with pytest.raises(ValueError, match="dp must be >= 1, got 0"):
        ProcessGrid(tp=1, dp=0)
    with pytest.raises(TypeError, match="comm must be"):
        ProcessGrid(comm="world")


def _layouts(size: int) -> list[tuple[int, int, int]]:
    """Every (tp, dp, pp) with tp * dp * pp == size."""
    return [(t, size // (t * p), p) for t in divisors(size) for p in divisors(size // t)]


def test_rank_mapping_with_pipeline_stages() -> None:
    """rank = tp_rank + tp * (dp_rank + dp * pp_rank); each group's members by that formula."""
    world = MPI.COMM_WORLD
    rank, size = world.rank, world.size
    for tp, dp, pp in _layouts(size):
        with ProcessGrid(tp=tp, pp=pp) as grid:
            assert (grid.tp, grid.dp, grid.pp) == (tp, dp, pp)
            assert grid.tp_rank + tp * (grid.dp_rank + dp * grid.pp_rank) == rank
            t, d, s = grid.tp_rank, grid.dp_rank, grid.pp_rank
            def members(comm):
                return comm.allgather(np.array([rank]), axis=0)
            np.testing.assert_array_equal(members(grid.tp_comm), [i + tp * (d + dp * s) for i in range(tp)])
            np.testing.assert_array_equal(members(grid.dp_comm), [t + tp * (j + dp * s) for j in range(dp)])
            np.testing.assert_array_equal(members(grid.pp_comm), [t + tp * (d + dp * k) for k in range(pp)])
            np.testing.assert_array_equal(members(grid.stage_comm), [r + tp * dp * s for r in range(tp * dp)])
            assert grid.is_first_stage == (s == 0) and grid.is_last_stage == (s == pp - 1)
            assert grid.prev_stage == (None if s == 0 else s - 1)
            assert grid.next_stage == (None if s == pp - 1 else s + 1)
            if pp == 1:
                assert grid.embed_comm is None
            elif s in (0, pp - 1):
                np.testing.assert_array_equal(members(grid.embed_comm), [t + tp * d, t + tp * (d + dp * (pp - 1))])
            else:
                assert grid.embed_comm is None
            if pp > 1:
                assert f"pp={pp}" in repr(grid) and f"pp_rank={s}" in repr(grid)


def test_pp_not_dividing_world_size_raises_on_every_rank() -> None:
    size = MPI.COMM_WORLD.size
    with pytest.raises(ValueError) as info:
        ProcessGrid(tp=1, pp=size + 1)
    msg = str(info.value)
    assert f"world size {size}" in msg and f"pp={size + 1}" in msg and "dp * pp * tp" in msg
    with pytest.raises(ValueError, match="pp must be >= 1, got 0"):
        ProcessGrid(pp=0)
    MPI.COMM_WORLD.Barrier()
