"""Hardware floors: matmul FLOP/s per rank (the MFU ceiling) and MPI collective latency/bandwidth.

Matmul: square (n,n)@(n,n) products, best of several, all ranks at once (as they run in a TP
step), per rank; NumPy float32/float64 on the CPU, or CuPy float16/float32 with `--device gpu`.
Collectives over the world communicator, 8 B .. 64 MiB (float32 buffers, powers of 4 plus the
top size): Allreduce, Allgather, Reduce_scatter_block. Size = the full array (allreduce: the
buffer; allgather: the gathered result; reduce_scatter: the input). Algorithmic bandwidth =
size / time; bus bandwidth = algbw * 2(p-1)/p for allreduce and * (p-1)/p for the others
(the bytes each rank's link must carry in a ring, comparable across p).

  python benchmarks/floors.py                 # 2 ranks, CPU
  python benchmarks/floors.py --np 1 --device gpu --sizes 1024 2048 4096 8192
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

COLLECTIVES = ("allreduce", "allgather", "reduce_scatter")
MIB = 1 << 20


def message_sizes(max_bytes: int) -> list[int]:
    """8 B, 32 B, ... (x4) up to max_bytes, plus max_bytes itself."""
    sizes, s = [], 8
    while s < max_bytes:
        sizes.append(s)
        s *= 4
    return sizes + [max_bytes]


def bus_factor(op: str, p: int) -> float:
    return 2.0 * (p - 1) / p if op == "allreduce" else (p - 1) / p


# ---- matmul -----------------------------------------------------------------------------------


def cpu_matmul_rows(comm: Any, sizes: list[int], dtypes: list[str], repeats: int) -> list[dict]:
    rows = []
    for dt in dtypes:
        for n in sizes:
            comm.Barrier()
            g = common.matmul_gflops(n, np.dtype(dt), repeats=repeats, seed=comm.Get_rank())
            per_rank = comm.allgather(g)
            rows.append({"device": "cpu", "dtype": dt, "n": n,
                         "gflops": statistics.mean(per_rank), "per_rank": per_rank})
    return rows


def gpu_matmul_rows(comm: Any, sizes: list[int], dtypes: list[str], repeats: int) -> list[dict]:
    """CuPy matmul timed with CUDA events on the null stream (includes no host transfer)."""
    import cupy as cp

    ndev = cp.cuda.runtime.getDeviceCount()
    cp.cuda.Device(comm.Get_rank() % ndev).use()
    rows = []
    for dt in dtypes:
        for n in sizes:
            a = cp.random.standard_normal((n, n), dtype=cp.float32).astype(dt)
            b = cp.random.standard_normal((n, n), dtype=cp.float32).astype(dt)
            c = cp.empty((n, n), dtype=dt)
            cp.matmul(a, b, out=c)
            cp.cuda.Stream.null.synchronize()
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            inner = max(1, int(2e12 // (2 * n**3)))  # ~ a few ms of work per timing
            best = float("inf")
            comm.Barrier()
            for _ in range(repeats):
                start.record()
                for _ in range(inner):
                    cp.matmul(a, b, out=c)
                stop.record()
                stop.synchronize()
                best = min(best, cp.cuda.get_elapsed_time(start, stop) / 1e3 / inner)
            g = 2.0 * n**3 / best / 1e9
            per_rank = comm.allgather(g)
            rows.append({"device": "gpu", "dtype": dt, "n": n,
                         "gflops": statistics.mean(per_rank), "per_rank": per_rank})
            del a, b, c
    return rows


# ---- collectives ------------------------------------------------------------------------------


def collective_rows(comm: Any, sizes: list[int], trials: int, target_s: float) -> list[dict]:
    from mpi4py import MPI

    p = comm.Get_size()
    rows = []
    for op in COLLECTIVES:
        for nbytes in sizes:
            count = max(p, (nbytes // 4) // p * p)  # float32 elements, a multiple of p
            full = np.ones(count, np.float32)
            block = np.ones(count // p, np.float32)
            if op == "allreduce":
                def run(full: np.ndarray = full) -> None:
                    comm.Allreduce(MPI.IN_PLACE, full, op=MPI.SUM)
            elif op == "allgather":
                def run(full: np.ndarray = full, block: np.ndarray = block) -> None:
                    comm.Allgather(block, full)
            else:
                def run(full: np.ndarray = full, block: np.ndarray = block) -> None:
                    comm.Reduce_scatter_block(full, block, op=MPI.SUM)
            # iterations per trial: enough for ~target_s, agreed on by all ranks
            comm.Barrier()
            t0 = time.perf_counter()
            run()
            once = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            iters = int(min(10_000, max(3, target_s / max(once, 1e-7))))
            per_op = []
            for _ in range(trials):
                comm.Barrier()
                t0 = time.perf_counter()
                for _ in range(iters):
                    run()
                per_op.append((time.perf_counter() - t0) / iters)
            t = statistics.median(common.max_over_ranks(comm, per_op))
            size = count * 4
            alg = size / t / 1e9
            rows.append({"op": op, "bytes": size, "time_us": t * 1e6, "iters": iters,
                         "algbw_GBps": alg, "busbw_GBps": alg * bus_factor(op, p)})
    return rows


# ---- output -----------------------------------------------------------------------------------


def plot(result: dict, path: Path) -> Path | None:
    plt = common.pyplot()
    if plt is None:
        return None
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.2))
    for dt in sorted({r["dtype"] for r in result["matmul"]}):
        rs = [r for r in result["matmul"] if r["dtype"] == dt]
        ax1.plot([r["n"] for r in rs], [r["gflops"] for r in rs], "o-",
                 label=f"{rs[0]['device']} {dt}")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("matrix size n  ((n,n)@(n,n))")
    ax1.set_ylabel("GFLOP/s per rank")
    ax1.set_title(f"matmul, {result['meta']['world_size']} ranks at once, "
                  f"{result['meta']['threads_per_rank']} thread(s) each")
    ax1.legend()
    ax1.grid(alpha=0.3)
    if result["collectives"]:
        for op in COLLECTIVES:
            rs = [r for r in result["collectives"] if r["op"] == op]
            ax2.plot([r["bytes"] for r in rs], [r["busbw_GBps"] for r in rs], "o-", label=op)
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xlabel("message size (bytes, full array)")
        ax2.set_ylabel("bus bandwidth (GB/s)")
        ax2.set_title(f"MPI collectives, {result['meta']['world_size']} ranks")
        ax2.legend()
        ax2.grid(alpha=0.3)
        for op in COLLECTIVES:
            rs = [r for r in result["collectives"] if r["op"] == op]
            ax3.plot([r["bytes"] for r in rs], [r["time_us"] for r in rs], "o-", label=op)
        ax3.set_xscale("log", base=2)
        ax3.set_yscale("log")
        ax3.set_xlabel("message size (bytes, full array)")
        ax3.set_ylabel("time per call (us, slowest rank)")
        ax3.set_title("latency")
        ax3.legend()
        ax3.grid(alpha=0.3)
    else:
        for ax in (ax2, ax3):
            ax.set_axis_off()
        ax2.text(0.5, 0.5, "1 rank: no collectives", ha="center")
    return common.save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="matmul sizes n (default 256 512 1024 2048; gpu 1024..8192)")
    ap.add_argument("--dtypes", nargs="+", default=None,
                    help="matmul dtypes (default cpu: float32 float64; gpu: float16 float32)")
    ap.add_argument("--repeats", type=int, default=5, help="matmul timings, best kept")
    ap.add_argument("--max-bytes", type=int, default=64 * MIB,
                    help="largest collective message (default 64 MiB)")
    ap.add_argument("--trials", type=int, default=5, help="collective trials, median kept")
    common.add_common_args(ap, default_np=2)
    args = ap.parse_args()
    common.relaunch_if_needed(args.np, args.threads, args.timeout)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    gpu = args.device == "gpu"
    sizes = args.sizes or ([1024, 2048, 4096, 8192] if gpu else [256, 512, 1024, 2048])
    dtypes = args.dtypes or (["float16", "float32"] if gpu else ["float32", "float64"])
    repeats, trials, max_bytes, target = args.repeats, args.trials, args.max_bytes, 0.05
    if args.smoke:
        sizes, repeats, trials, max_bytes, target = [64, 128], 1, 1, 32 * 1024, 0.001

    matmul = (gpu_matmul_rows if gpu else cpu_matmul_rows)(comm, sizes, dtypes, repeats)
    coll = collective_rows(comm, message_sizes(max_bytes), trials, target) \
        if comm.Get_size() > 1 else []
    if comm.Get_rank() != 0:
        return
    ceiling = {dt: max(r["gflops"] for r in matmul if r["dtype"] == dt) for dt in dtypes}
    result = {
        "meta": common.result_meta(comm, common.threads_in_effect()),
        "device": args.device,
        "smoke": args.smoke,
        "ceiling_gflops_per_rank": ceiling,
        "matmul": matmul,
        "collectives": coll,
    }
    print(f"matmul per rank ({comm.Get_size()} ranks at once, "
          f"{common.threads_in_effect()} thread(s) each), GFLOP/s:")
    print(common.format_table(
        [{"dtype": r["dtype"], "n": r["n"], "GFLOP/s": r["gflops"],
          "per rank": " ".join(f"{g:.1f}" for g in r["per_rank"])} for r in matmul],
        ["dtype", "n", "GFLOP/s", "per rank"]))
    if coll:
        print(f"\ncollectives, world of {comm.Get_size()} ranks:")
        print(common.format_table(
            [{"op": r["op"], "bytes": r["bytes"], "time_us": r["time_us"],
              "algbw GB/s": r["algbw_GBps"], "busbw GB/s": r["busbw_GBps"]} for r in coll],
            ["op", "bytes", "time_us", "algbw GB/s", "busbw GB/s"]))
    out_json = common.write_json(args.out / "floors.json", result)
    png = plot(result, args.out / "floors.png")
    print(f"\nwrote {out_json}" + (f" and {png}" if png else " (no matplotlib: no PNG)"))


if __name__ == "__main__":
    main()
