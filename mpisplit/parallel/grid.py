"""ProcessGrid: the world as a dp x tp grid of ranks, with one communicator per row and column.

world rank = dp_rank * tp + tp_rank: tensor-parallel (TP) ranks are the fastest-varying index,
so that a TP group holds consecutive ranks and, with the usual block placement, sits in one node.

    tp=2, dp=3 (world size 6)      tp groups (tp_comm): {0,1} {2,3} {4,5}
        tp_rank:  0  1             dp groups (dp_comm): {0,2,4} {1,3,5}
        dp 0:     0  1
        dp 1:     2  3
        dp 2:     4  5
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mpi4py import MPI

from mpisplit.parallel.comm import Communicator

if TYPE_CHECKING:
    from typing_extensions import Self


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_degree(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class ProcessGrid:
    """dp x tp grid over `comm` (an mpi4py communicator or a Communicator; default COMM_WORLD).

    `dp` defaults to world size // tp. Collective over `comm` (it creates communicators).
    """

    def __init__(self, tp: int = 1, dp: int | None = None, comm: Any = None) -> None:
        base = MPI.COMM_WORLD if comm is None else comm
        base_mpi = base.mpi if isinstance(base, Communicator) else base
        if not isinstance(base_mpi, MPI.Intracomm):
            raise TypeError(
                f"comm must be an mpi4py Intracomm or a Communicator, got {type(base).__name__}"
            )
        world_size = base_mpi.Get_size()
        # Validation is local and identical on every rank: all raise, none enters a collective.
        tp = _check_degree("tp", tp)
        if dp is not None:
            dp = _check_degree("dp", dp)
        if world_size % tp != 0 or (dp is not None and dp * tp != world_size):
            shown_dp = f"dp={dp}" if dp is not None else "dp=world size // tp"
            raise ValueError(
                f"process grid needs dp * tp == world size: world size {world_size}, tp={tp}, "
                f"{shown_dp}; valid tp values: {_divisors(world_size)}"
            )
        self.tp: int = tp
        self.dp: int = world_size // tp
        self.world = Communicator(base_mpi)
        self.rank: int = self.world.rank
        self.tp_rank: int = self.rank % tp
        self.dp_rank: int = self.rank // tp
        # Same dp_rank -> one TP group, ordered by tp_rank; same tp_rank -> one DP group.
        self.tp_comm = Communicator._adopt(self.world.mpi.Split(self.dp_rank, self.tp_rank))
        self.dp_comm = Communicator._adopt(self.world.mpi.Split(self.tp_rank, self.dp_rank))
        assert self.tp_comm.size == tp and self.tp_comm.rank == self.tp_rank
        assert self.dp_comm.size == self.dp and self.dp_comm.rank == self.dp_rank

    def free(self) -> None:
        """Free the three communicators (collective)."""
        for c in (self.tp_comm, self.dp_comm, self.world):
            c.free()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def __repr__(self) -> str:
        return (
            f"ProcessGrid(dp={self.dp}, tp={self.tp}, rank={self.rank}, "
            f"dp_rank={self.dp_rank}, tp_rank={self.tp_rank})"
        )
