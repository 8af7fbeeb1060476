"""ProcessGrid: the world as a dp x pp x tp grid of ranks, with one communicator per axis.

world rank = tp_rank + tp * (dp_rank + dp * pp_rank): tensor-parallel (TP) ranks are the
fastest-varying index, so that a TP group holds consecutive ranks and, with the usual block
placement, sits in one node; pipeline stages (PP) vary slowest, so stages cross nodes.

    tp=2, dp=3 (world size 6)      tp groups (tp_comm): {0,1} {2,3} {4,5}
        tp_rank:  0  1             dp groups (dp_comm): {0,2,4} {1,3,5}
        dp 0:     0  1
        dp 1:     2  3
        dp 2:     4  5

    tp=2, dp=1, pp=2 (world 4)     stage 0: ranks {0,1}; stage 1: ranks {2,3}
                                   pp groups (pp_comm): {0,2} {1,3}

Stage k talks to k - 1 and k + 1 with the same (dp, tp) coordinates over `pp_comm`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

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


def _layout(world_size: int, tp: Any, dp: Any, pp: Any) -> tuple[int, int, int]:
    """(tp, dp, pp) checked against the world size; the same ValueError on every rank."""
    tp, pp = _check_degree("tp", tp), _check_degree("pp", pp)
    if dp is not None:
        dp = _check_degree("dp", dp)
    if world_size % (tp * pp) != 0 or (dp is not None and dp * tp * pp != world_size):
        if pp == 1:
            shown_dp = f"dp={dp}" if dp is not None else "dp=world size // tp"
            raise ValueError(
                f"process grid needs dp * tp == world size: world size {world_size}, tp={tp}, "
                f"{shown_dp}; valid tp values: {_divisors(world_size)}"
            )
        shown_dp = f"dp={dp}" if dp is not None else "dp=world size // (tp * pp)"
        raise ValueError(
            f"process grid needs dp * pp * tp == world size: world size {world_size}, tp={tp}, pp={pp}, "
            f"{shown_dp}; valid tp * pp values: {_divisors(world_size)}"
        )
    return tp, world_size // (tp * pp), pp


class ProcessGrid:
    """dp x pp x tp grid over `comm` (an mpi4py communicator or a Communicator; default COMM_WORLD).

    `dp` defaults to world size // (tp * pp). Collective over `comm` (it creates communicators):
    tp_comm, dp_comm and pp_comm (one per axis), stage_comm (every rank of this pipeline stage)
    and, when pp > 1, embed_comm (the first and last stage of this pipeline: the tied embedding;
    None on the middle stages).
    """

    def __init__(self, tp: int = 1, dp: int | None = None, comm: Any = None, *, pp: int = 1) -> None:
        base = MPI.COMM_WORLD if comm is None else comm
        base_mpi = base.mpi if isinstance(base, Communicator) else base
        if not isinstance(base_mpi, MPI.Intracomm):
            raise TypeError(
                f"comm must be an mpi4py Intracomm or a Communicator, got {type(base).__name__}"
            )
        # Validation is local and identical on every rank: all raise, none enters a collective.
        self.tp, self.dp, self.pp = _layout(base_mpi.Get_size(), tp, dp, pp)
        self.world = Communicator(base_mpi)
        self.rank: int = self.world.rank
        self.tp_rank: int = self.rank % self.tp
        self.dp_rank: int = (self.rank // self.tp) % self.dp
        self.pp_rank: int = self.rank // (self.tp * self.dp)
        self._split_groups()

    def _split_groups(self) -> None:
        tp, dp, world = self.tp, self.dp, self.world.mpi

        def split(colour: int, key: int) -> MPI.Intracomm:
            # Splitting an Intracomm gives Intracomms; mpi4py's stubs declare Comm.Split -> Comm.
            return cast(MPI.Intracomm, world.Split(colour, key))

        # Colour: the coordinates the group shares; key: the coordinate that varies inside it.
        self.tp_comm = Communicator._adopt(split(self.pp_rank * dp + self.dp_rank, self.tp_rank))
        self.dp_comm = Communicator._adopt(split(self.pp_rank * tp + self.tp_rank, self.dp_rank))
        self.pp_comm = Communicator._adopt(split(self.dp_rank * tp + self.tp_rank, self.pp_rank))
        self.stage_comm = Communicator._adopt(split(self.pp_rank, self.rank))
        self.embed_comm: Communicator | None = None
        if self.pp > 1:
            ends = self.is_first_stage or self.is_last_stage
            colour = self.dp_rank * tp + self.tp_rank if ends else MPI.UNDEFINED
            mpi = split(colour, self.pp_rank)
            if ends:
                self.embed_comm = Communicator._adopt(mpi)
        assert self.tp_comm.size == tp and self.tp_comm.rank == self.tp_rank
        assert self.dp_comm.size == dp and self.dp_comm.rank == self.dp_rank
        assert self.pp_comm.size == self.pp and self.pp_comm.rank == self.pp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def prev_stage(self) -> int | None:
        """pp_comm rank of the previous stage (None on the first)."""
        return None if self.is_first_stage else self.pp_rank - 1

    @property
    def next_stage(self) -> int | None:
        """pp_comm rank of the next stage (None on the last)."""
        return None if self.is_last_stage else self.pp_rank + 1

    def free(self) -> None:
        """Free the communicators (collective)."""
        comms = [self.tp_comm, self.dp_comm, self.pp_comm, self.stage_comm, self.embed_comm, self.world]
        for c in comms:
            if c is not None:
                c.free()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def __repr__(self) -> str:
        if self.pp == 1:
            return (
                f"ProcessGrid(dp={self.dp}, tp={self.tp}, rank={self.rank}, "
                f"dp_rank={self.dp_rank}, tp_rank={self.tp_rank})"
            )
        return (
            f"ProcessGrid(dp={self.dp}, pp={self.pp}, tp={self.tp}, rank={self.rank}, "
            f"dp_rank={self.dp_rank}, pp_rank={self.pp_rank}, tp_rank={self.tp_rank})"
        )
