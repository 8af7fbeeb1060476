"""Ways to move a data-parallel gradient block on one node, timed against each other in one job:
MPI's all-reduce in pieces, the library's all-reduce (what the unsharded optimizer calls), and
the sharded optimizer's reduce-scatter + all-gather, as MPI's collectives and as the library's
ring of point-to-point exchanges in place.

    mpiexec -n 2 python benchmarks/bench_reduce_scatter.py [--mib 204] [--reps 5] [--piece-mib 4]

Every variant runs on the same float32 block (51M elements by default: the hidden-1024 model of
bench_shard_optimizer.py), in pieces of --piece-mib like the library's collectives, variants
interleaved, each repetition after a barrier; the time is the slowest rank's, the median over
--reps. Each variant's reduced values are checked against the all-reduce's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpisplit.parallel.comm import Communicator


def allreduce(comm: Communicator, x: np.ndarray, step: int) -> None:
    flat = x.reshape(-1)
    for lo in range(0, flat.size, step * comm.size):
        comm.mpi.Allreduce(MPI.IN_PLACE, flat[lo: lo + step * comm.size])


def library_allreduce(comm: Communicator, x: np.ndarray, step: int) -> None:
    """Communicator.allreduce_ of the whole block (a ring in place above
    HOST_RING_ALLREDUCE_MIN_BYTES, MPI's Allreduce below it)."""
    comm.allreduce_(x)


def mpi_collectives(comm: Communicator, x: np.ndarray, step: int) -> None:
    """MPI's collectives: each piece packed and Reduce_scatter_block'ed, then an in-place
    Allgatherv with displacements (what Communicator's rows collectives did before the ring)."""
    dp, r, m = comm.size, comm.rank, x.shape[1]
    for lo in range(0, m, step):
        cols = slice(lo, min(lo + step, m))
        comm.mpi.Reduce_scatter_block(x[:, cols].copy(), x[r, cols], op=MPI.SUM)
    for lo in range(0, m, step):
        n = min(lo + step, m) - lo
        comm.mpi.Allgatherv(MPI.IN_PLACE, [x.reshape(-1), ([n] * dp, [q * m + lo for q in range(dp)]), MPI.FLOAT])


def ring(comm: Communicator, x: np.ndarray, step: int) -> None:
    """The library's rows collectives (Communicator.reduce_scatter_rows_ / allgather_rows_: a
    ring of Sendrecv steps in place)."""
    for lo in range(0, x.shape[1], step):
        comm.reduce_scatter_rows_(x, slice(lo, lo + step))
    for lo in range(0, x.shape[1], step):
        comm.allgather_rows_(x, slice(lo, lo + step))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=float, default=204.0)
    ap.add_argument("--piece-mib", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    comm = Communicator(MPI.COMM_WORLD)
    dp = comm.size
    m = int(args.mib * 2**20 / 4) // dp
    step = max(1, int(args.piece_mib * 2**20 / 4) // dp)
    rng = np.random.default_rng(comm.rank)
    base = (rng.integers(-64, 64, (dp, m)) / 8).astype(np.float32)  # exact sums in any order
    want = base.copy()
    allreduce(comm, want, step)
    variants = {"allreduce": allreduce, "library allreduce_": library_allreduce,
                "MPI reduce_scatter+allgather": mpi_collectives, "ring (library)": ring}
    for name, fn in variants.items():  # check: every row is the sum (the all-gather made it so)
        x = base.copy()
        fn(comm, x, step)
        assert np.array_equal(x, want), name
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.reps):
        for name, fn in variants.items():
            x = base.copy()
            comm.mpi.Barrier()
            t0 = time.perf_counter()
            fn(comm, x, step)
            times[name].append(comm.mpi.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    if comm.rank == 0:
        print(f"{dp} ranks, {dp * m * 4 / 2**20:.0f} MiB float32 block, pieces of {args.piece_mib:g} MiB, "
              f"median of {args.reps} interleaved")
        ref = statistics.median(times["allreduce"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:>26}: {1000 * med:8.1f} ms  ({med / ref:.3f} of the all-reduce)")


if __name__ == "__main__":
    main()
