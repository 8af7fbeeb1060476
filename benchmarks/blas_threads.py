"""Does `limit_blas_threads` keep ranks that share a node from fighting over the cores?

Three runs of the same (n, n) @ (n, n) float64 NumPy matmul, each an MPI job of its own:

  1 rank, 1 thread          the reference: one core's matmul time
  2 ranks, limited          every rank calls mpisplit.backend.limit_blas_threads(COMM_WORLD):
                            threads = cores // ranks on the node
  2 ranks, unlimited        every rank keeps the BLAS default (one thread per core), the
                            oversubscription that the limit prevents

All ranks of a job start each matmul together (barrier) and time it alone; the reported time
is the median over repetitions of the slowest rank. ratio = time per matmul / reference: with
two ranks on at least two cores, about 1 means each rank got a core to itself.

    python benchmarks/blas_threads.py            # writes benchmarks/results/blas_threads.json
    python benchmarks/blas_threads.py --smoke    # seconds; the numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

# (name, ranks, how each rank sizes its BLAS pool)
CONFIGS = (
    ("1 rank, 1 thread", 1, "1"),
    ("2 ranks, limit_blas_threads", 2, "auto"),
    ("2 ranks, unlimited", 2, "none"),
)


def worker(n: int, reps: int, limit: str, out_file: Path) -> None:
    """One MPI job: size the BLAS pool, time `reps` matmuls per rank, rank 0 writes JSON."""
    from mpi4py import MPI
    from threadpoolctl import threadpool_info

    from mpisplit.runtime.backend import limit_blas_threads

    comm = MPI.COMM_WORLD
    if limit == "auto":
        threads = limit_blas_threads(comm)
    elif limit == "none":
        threads = None  # whatever the BLAS library starts with
    else:
        threads = limit_blas_threads(threads=int(limit))
    blas_threads = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    rng = np.random.default_rng(comm.rank)
    a = rng.standard_normal((n, n))
    b = rng.standard_normal((n, n))
    c = np.empty((n, n))
    times = []
    for i in range(reps + 2):  # two warm-up matmuls: thread pool start, page faults
        comm.Barrier()
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    slowest = common.max_over_ranks(comm, times)
    per_rank_threads = comm.gather(blas_threads)
    if comm.rank == 0:
        out_file.write_text(
            json.dumps(
                {
                    "ranks": comm.size,
                    "limit": limit,
                    "threads_returned_by_limit": threads,
                    "blas_threads_per_rank": per_rank_threads,
                    "times_s": slowest,
                    "median_s": statistics.median(slowest),
                    "min_s": min(slowest),
                }
            )
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1024, help="matrix size (default 1024)")
    parser.add_argument("--reps", type=int, default=20, help="timed matmuls (default 20)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per MPI job")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--smoke", action="store_true", help="n=128, 3 repetitions")
    parser.add_argument("--worker", choices=["1", "auto", "none"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.n, args.reps = 128, 3
    if args.worker:
        worker(args.n, args.reps, args.worker, args.worker_out)
        return 0

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = []
    with tempfile.TemporaryDirectory(prefix="blas_threads_") as tmp:
        for name, ranks, limit in CONFIGS:
            out_file = Path(tmp) / f"{ranks}_{limit}.json"
            argv = [__file__, "--worker", limit, "--worker-out", str(out_file)]
            argv += ["--n", str(args.n), "--reps", str(args.reps)]
            # Thread variables: 1 for the reference; for the others the BLAS default (one
            # thread per core) so that only limit_blas_threads decides.
            env_threads = 1 if limit == "1" else (cores or 1)
            code = common.run_under_mpi(
                ranks,
                argv,
                threads=env_threads,
                timeout=args.timeout,
                extra_env={"MPISPLIT_BLAS_THREADS": ""},
            )
            if code != 0:
                print(f"{name}: MPI job failed with exit code {code}", file=sys.stderr)
                return 1
            rows.append({"config": name, **json.loads(out_file.read_text())})

    reference = rows[0]["median_s"]
    flops = 2.0 * args.n**3
    for row in rows:
        row["ratio_to_1_rank_1_thread"] = row["median_s"] / reference
        row["gflops_per_rank"] = flops / row["median_s"] / 1e9
    print(f"(n={args.n}) float64 matmul, {args.reps} repetitions, {cores} usable cores")
    print(
        common.format_table(
            [
                {
                    "config": r["config"],
                    "BLAS threads/rank": ",".join(
                        str(max(t, default=0)) for t in r["blas_threads_per_rank"]
                    ),
                    "ms/matmul": 1e3 * r["median_s"],
                    "GFLOP/s/rank": r["gflops_per_rank"],
                    "ratio": r["ratio_to_1_rank_1_thread"],
                }
                for r in rows
            ],
            ["config", "BLAS threads/rank", "ms/matmul", "GFLOP/s/rank", "ratio"],
        )
    )
    limited = rows[1]["ratio_to_1_rank_1_thread"]
    print(f"ratio (2 ranks limited / 1 rank 1 thread): {limited:.2f}")
    result = {
        "question": "time per matmul of 2 ranks limited by limit_blas_threads / 1 rank 1 thread",
        "n": args.n,
        "dtype": "float64",
        "reps": args.reps,
        "usable_cores": cores,
        "ratio_limited": limited,
        "ratio_unlimited": rows[2]["ratio_to_1_rank_1_thread"],
        "configs": rows,
        "machine": common.machine_info(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "smoke": args.smoke,
    }
    name = "blas_threads_smoke.json" if args.smoke else "blas_threads.json"
    path = common.write_json(args.out / name, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
