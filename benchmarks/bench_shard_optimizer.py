"""The sharded AdamW (--shard-optimizer) against the unsharded one: optimizer bytes and peak RSS
per rank at dp = 1, 2, 4 for a hidden-1024 GPT, and the step time at dp = 2; in float32, and
(--amp) float32 master weights with float16 compute, where the sharded optimizer also keeps
the master weights of its part only and all-gathers the float16 weights.

Memory: one MPI job per (dp, sharded), each rank building the model and its optimizer and
taking three steps (forward, backward, gradient reduction, clip, update); it reports the
optimizer's state bytes (both moments; under amp the float32 master weights too: the master
model's parameters unsharded, the parts sharded) and the peak RSS minus the RSS before the model
was built (MPI's first-use buffers and the compiled kernels warmed up before that baseline, as
bench_gpt.py --memory does). Goal: sharded state per rank <= 1.05 x (unsharded state / dp).
NumPy has no float16 BLAS (a float16 matmul runs ~250x slower than float32 on the CPU), so the
amp rows run a context of 8 tokens and one sequence per rank: the optimizer's bytes do not
depend on it and the activations are then negligible.

Time: one job at dp = 2 holding two identical models, one with AdamW (all-reduce) and one with
the sharded AdamW (reduce-scatter + all-gather), whose steps alternate (common.time_interleaved):
the ratio sharded / unsharded of the median steps comes from one run. Goal: <= 1.0.

  python benchmarks/bench_shard_optimizer.py            # memory at dp 1, 2, 4 and time at dp 2
  python benchmarks/bench_shard_optimizer.py --amp      # the same with float16 compute
  python benchmarks/bench_shard_optimizer.py --smoke    # a small model, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

# hidden 1024, 4 layers: 51M parameters (float32: 204 MB of weights, 408 MB of moments)
FULL = {"n_layer": 4, "n_embd": 1024, "n_head": 16, "vocab_size": 512, "block_size": 64}
SMOKE = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 64, "block_size": 16}
ROWS_PER_RANK = 2  # sequences per DP rank and step
AMP_SHAPE = {"block_size": 8, "rows": 1}  # float16 matmuls have no BLAS in NumPy: a short step


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Run:
    """A model, its optimizer (sharded or not) and one step of the trainer's sequence; with
    `amp`, float32 master weights and a float16 twin that runs forward and backward."""

    def __init__(self, ms: Any, grid: Any, cfg: dict, sharded: bool, amp: bool = False) -> None:
        from mpisplit.training import optim
        from mpisplit.training.amp import LossScaler, MixedPrecision
        from mpisplit.training.sharded_optim import ShardedAdamW

        self.grid, self.sharded, self.optim = grid, sharded, optim
        self.model = ms.GPT(ms.GPTConfig(**cfg), grid, dtype="float32", seed=0)  # the master under amp
        params = list(self.model.parameters())
        kw = {"lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.1}
        self.opt = ShardedAdamW(params, grid.dp_comm, **kw) if sharded else optim.AdamW(params, **kw)
        self.mp, self.net = None, self.model
        if amp:
            net = ms.GPT(ms.GPTConfig(**cfg), grid, dtype="float32", init=False)
            self.mp = MixedPrecision(net, self.model, "float16", grid.world, scaler=LossScaler(2.0**8))
            self.net = net
            if sharded:
                self.opt.shard_master_weights(self.mp)
        rng = np.random.default_rng(grid.dp_rank)
        t, rows = (AMP_SHAPE["block_size"], AMP_SHAPE["rows"]) if amp else (cfg["block_size"], ROWS_PER_RANK)
        self.x = rng.integers(0, cfg["vocab_size"], (rows, t))
        self.y = rng.integers(0, cfg["vocab_size"], (rows, t))
        self.update_s: list[float] = []
        self.skipped = 0

    def state_bytes(self) -> int:
        if self.sharded:
            return self.opt.state_bytes()
        moments = sum(a.nbytes for arrays in self.opt.state_arrays().values() for a in arrays)
        master = sum(p.data.nbytes for p in self.model.parameters()) if self.mp is not None else 0
        return moments + master

    def step(self) -> float:
        grid, params, mp = self.grid, self.model.parameters(), self.mp
        loss = self.net.loss(self.x, self.y)
        if mp is None:
            loss.backward()
        else:
            mp.backward(loss)
        t0 = time.perf_counter()
        finite = mp is None or mp.unscale_()
        if finite:
            if self.sharded:
                self.opt.reduce_scatter_gradients()
                self.opt.clip_grad_norm(1.0, grid.tp_comm)
            else:
                self.optim.average_gradients(params, grid.dp_comm)
                self.optim.clip_grad_norm(params, 1.0, grid.tp_comm)
            self.opt.step()
            if mp is not None:
                mp.update_model()  # the whole model cast; nothing when sharded (the step wrote it)
        if mp is not None:
            self.skipped += not finite
            mp.update_scale(not finite)
            mp.zero_grad()
        self.update_s.append(time.perf_counter() - t0)  # this rank's DP reduction, clip and update
        self.opt.zero_grad()
        return float(loss.data)


def _warm(comm: Any) -> None:
    """MPI's buffers for the collectives' message sizes and the compiled kernels, before the
    baseline: fixed costs of a process, not of the optimizer."""
    from mpi4py import MPI

    from mpisplit import kernels

    kernels.warm_up("float32")
    if comm.Get_size() > 1:
        for nbytes in (1 << 12, 1 << 16, 1 << 19, 1 << 22):
            buf = np.zeros(nbytes // 4, np.float32)
            for _ in range(2):
                comm.Allreduce(MPI.IN_PLACE, buf)
                comm.Allgather(buf[: buf.size // comm.Get_size()].copy(), buf)
                comm.Reduce_scatter_block(buf.copy(), buf[: buf.size // comm.Get_size()])
    gc.collect()


def child_memory(cfg: dict, sharded: bool, amp: bool) -> dict:
    from mpi4py import MPI

    import mpisplit as ms

    comm = MPI.COMM_WORLD
    ms.limit_blas_threads(comm)
    _warm(comm)
    base_now, base_peak = _rss_now(), _rss_peak()
    grid = ms.ProcessGrid(tp=1, comm=comm)
    run = Run(ms, grid, cfg, sharded, amp)
    losses = [run.step() for _ in range(3)]
    peak = _rss_peak()
    rows = comm.allgather({"state_bytes": run.state_bytes(), "delta_rss": peak - max(base_now, base_peak),
                           "params": sum(p.size for p in run.model.parameters())})
    return {"dp": comm.Get_size(), "sharded": sharded, "amp": amp, "per_rank": rows, "losses": losses,
            "skipped": run.skipped}


def child_time(cfg: dict, warmup: int, reps: int, amp: bool) -> dict:
    from mpi4py import MPI

    import mpisplit as ms

    comm = MPI.COMM_WORLD
    ms.limit_blas_threads(comm)
    grid = ms.ProcessGrid(tp=1, comm=comm)
    runs = {"unsharded": Run(ms, grid, cfg, False, amp), "sharded": Run(ms, grid, cfg, True, amp)}
    times = common.time_interleaved({k: r.step for k, r in runs.items()}, comm, warmup, reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    # the phase that differs: gradient reduction + clip + update (+ all-gather), slowest rank
    update = {k: common.max_over_ranks(comm, r.update_s[-reps:]) for k, r in runs.items()}
    upd = {k: statistics.median(v) for k, v in update.items()}
    return {"dp": comm.Get_size(), "times": times, "median_s": med, "ratio": med["sharded"] / med["unsharded"],
            "update_times": update, "update_median_s": upd, "update_ratio": upd["sharded"] / upd["unsharded"],
            "load_average": os.getloadavg()[0], "skipped": {k: r.skipped for k, r in runs.items()}}


def _child(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    cfg = SMOKE if args.smoke else FULL
    if args.mode == "memory":
        part = child_memory(cfg, args.sharded, args.amp)
    else:
        part = child_time(cfg, 1 if args.smoke else 2, 3 if args.smoke else args.reps, args.amp)
    if MPI.COMM_WORLD.Get_rank() == 0:
        common.write_json(args.part, part)


def _launch(args: argparse.Namespace, ranks: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "part.json"
        argv = [str(Path(__file__).resolve()), "--part", str(part), *(["--smoke"] if args.smoke else []),
                *(["--amp"] if args.amp else []), *extra]
        rc = common.run_under_mpi(ranks, argv, threads=1, timeout=args.timeout)
        if rc != 0 or not part.exists():
            raise SystemExit(f"child with {ranks} rank(s) failed (exit {rc})")
        return json.loads(part.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a small model: checks that it runs")
    ap.add_argument("--amp", action="store_true", help="float32 master weights, float16 compute")
    ap.add_argument("--no-time", action="store_true", help="the memory rows only")
    ap.add_argument("--dps", type=int, nargs="+", default=[1, 2, 4], help="dp sizes of the memory rows")
    ap.add_argument("--reps", type=int, default=8, help="timed steps of each optimizer at dp = 2")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", type=Path, default=None,
                    help=f"folder for bench_shard_optimizer.json (default {common.RESULTS_DIR}; none with --smoke)")
    ap.add_argument("--part", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["memory", "time"], help=argparse.SUPPRESS)
    ap.add_argument("--sharded", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part is not None:
        _child(args)
        return
    memory = {(dp, s): _launch(args, dp, ["--mode", "memory", *(["--sharded"] if s else [])])
              for dp in args.dps for s in (False, True)}
    timing = None if args.no_time else _launch(args, 2, ["--mode", "time", "--reps", str(args.reps)])
    rows = _report(memory, timing)
    result = {"machine": common.machine_info(), "model": SMOKE if args.smoke else FULL, "amp": args.amp,
              "rows_per_rank": AMP_SHAPE["rows"] if args.amp else ROWS_PER_RANK, "memory": rows, "time_dp2": timing}
    out = args.out if args.out is not None else None if args.smoke else common.RESULTS_DIR
    if out is not None:
        name = "bench_shard_optimizer_amp.json" if args.amp else "bench_shard_optimizer.json"
        print(f"wrote {common.write_json(out / name, result)}")


def _report(memory: dict, timing: dict | None) -> list[dict]:
    rows = []
    print(f"{'dp':>3} {'state MiB/rank':>15} {'unsharded':>10} {'x (1/dp)':>9} {'peak RSS MiB':>13} "
          f"{'unsharded':>10} {'ratio':>6}")
    for (dp, sharded), part in sorted(memory.items()):
        if not sharded:
            continue
        plain = memory[dp, False]["per_rank"]
        state = max(r["state_bytes"] for r in part["per_rank"])
        total = max(r["state_bytes"] for r in plain)  # every rank holds it all
        rss, rss_plain = (max(r["delta_rss"] for r in p) for p in (part["per_rank"], plain))
        row = {"dp": dp, "state_bytes": state, "unsharded_state_bytes": total, "of_one_dp_th": state / (total / dp),
               "peak_rss_bytes": rss, "unsharded_peak_rss_bytes": rss_plain, "rss_ratio": rss / rss_plain,
               "loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(part["losses"], memory[dp, False]["losses"]))}
        rows.append(row)
        print(f"{dp:>3} {state / 2**20:>15.1f} {total / 2**20:>10.1f} {row['of_one_dp_th']:>9.4f} "
              f"{rss / 2**20:>13.1f} {rss_plain / 2**20:>10.1f} {row['rss_ratio']:>6.3f}")
    skipped = sum(part.get("skipped", 0) for part in memory.values())
    print(f"steps skipped for float16 overflow: {skipped}")
    if timing is None:
        return rows
    med = timing["median_s"]
    print(f"step at dp 2: sharded {med['sharded']:.3f} s, unsharded {med['unsharded']:.3f} s, "
          f"ratio {timing['ratio']:.3f} (median of {len(timing['times']['sharded'])} interleaved steps)")
    upd = timing["update_median_s"]
    print(f"  of which DP reduction + clip + update: sharded {1000 * upd['sharded']:.1f} ms, unsharded "
          f"{1000 * upd['unsharded']:.1f} ms, ratio {timing['update_ratio']:.3f} (load {timing['load_average']:.1f})")
    return rows


if __name__ == "__main__":
    main()
