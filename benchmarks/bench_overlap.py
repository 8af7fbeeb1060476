"""The DP gradient reduction overlapped with backward, across two network hosts (as root).

Two hosts made of network namespaces (tests/_hosts.py), each link limited with `tc ... tbf`;
dp 2 with one rank per host, a GPT whose float32 gradient all-reduce over the link takes at
least half of its forward and backward time. Per link rate, medians over interleaved steps:

  compute       forward and backward alone (no DP reduction)
  reduce        the blocking all-reduce of the gradient block alone (optim.average_gradients)
  blocking      a step: backward, then the all-reduce (--overlap-grads off)
  overlapped    a step: the buckets reduced by the helper thread during backward (on)
  Iallreduce    MPI_Iallreduce of the block started before a forward and backward without MPI
                calls, then MPI_Wait: the wait is what MPICH did not move meanwhile
  one host      the blocking step with both ranks on one host (shared memory): the goal is the
                overlapped step across hosts within 1.2x of it

  python benchmarks/bench_overlap.py                  # 1gbit and 10gbit, 3 rounds
  python benchmarks/bench_overlap.py --smoke          # one rate, one round of two steps

Also timed: the helper thread waiting for MPI's pieces in other ways (WAITS: the blocking
Allreduce, an Iallreduce tested at other intervals) than the library's default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks import common

MIB = 1 << 20
# The helper thread's ways of waiting for MPI's piece (comm.POLL_SLEEP_S): a blocking Allreduce,
# or an Iallreduce tested every so many seconds; the library's default runs as "overlapped".
WAITS = {"blocking_call": 0.0, "poll_50us": 5e-5, "poll_200us": 2e-4, "poll_1ms": 1e-3}


def worker(reps: int, rows: int, layers: int, vocab: int) -> dict:
    """Under mpiexec, dp 2: the interleaved timings of the module docstring."""
    from mpi4py import MPI

    from mpisplit.models.config import GPTConfig
    from mpisplit.models.gpt import GPT
    from mpisplit.parallel import comm as comm_module
    from mpisplit.parallel.grid import ProcessGrid
    from mpisplit.training.optim import AdamW, average_gradients
    from mpisplit.training.overlap import GradientOverlap
    from mpisplit.training.step import StepRunner

    world = MPI.COMM_WORLD
    grid = ProcessGrid(tp=1, dp=world.Get_size())
    cfg = GPTConfig(vocab_size=vocab, block_size=128, n_layer=layers, n_head=6, n_embd=384)
    model = GPT(cfg, grid, seed=0)
    opt = AdamW(list(model.parameters()))  # the gradient block
    runner = StepRunner(model, grid)
    x, y = np.random.default_rng(grid.dp_rank).integers(0, cfg.vocab_size, size=(2, rows, 128))
    ov = GradientOverlap(opt.params, grid.dp_comm, [])
    block = opt.params[0].grad_buffer.flat

    def compute() -> None:
        runner.forward_backward(x, y)

    def reduce() -> None:
        for q in opt.params:  # the block as backward leaves it (its values do not matter here)
            q.grad = q.grad_store
        average_gradients(model.parameters(), grid.dp_comm)

    def blocking() -> None:
        compute()
        average_gradients(model.parameters(), grid.dp_comm)

    def overlapped(poll: float) -> Any:
        def step() -> None:
            comm_module.POLL_SLEEP_S = poll  # how the helper thread waits for MPI's piece
            ov.start(1)
            compute()
            ov.finish()
        return step

    def iallreduce() -> float:
        req = grid.dp_comm.mpi.Iallreduce(MPI.IN_PLACE, block, op=MPI.SUM)
        compute()  # no MPI call inside (tp 1, pp 1): only a progress thread would move bytes
        t0 = time.perf_counter()
        req.Wait()
        return time.perf_counter() - t0

    default = comm_module.POLL_SLEEP_S
    kinds = {"compute": compute, "reduce": reduce, "blocking": blocking, "overlapped": overlapped(default),
             **{f"overlapped_{name}": overlapped(poll) for name, poll in WAITS.items() if poll != default}}
    times: dict[str, list[float]] = {k: [] for k in (*kinds, "iallreduce_wait", "overlap_wait")}
    compute()  # warm: the gradient block written once
    for i in range(reps + 1):
        for name, fn in kinds.items():
            world.Barrier()
            t0 = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - t0)
            if name == "overlapped" and i:
                times["overlap_wait"].append(ov.exposed_s)
            model.zero_grad()
        world.Barrier()
        wait = iallreduce()
        if i:
            times["iallreduce_wait"].append(wait)
        model.zero_grad()
    ov.close()
    comm_module.POLL_SLEEP_S = default
    medians = {k: statistics.median(v) for k, v in times.items()}
    slowest = {k: max(world.allgather(v)) for k, v in medians.items()}
    return {**slowest, "gradient_bytes": int(block.nbytes), "parameters": model.num_parameters(),
            "tokens_per_rank": rows * 128, "hosts": sorted(set(world.allgather(os.uname().nodename)))}


def run(hosts: Any, ppn: int, reps: int, rows: int, layers: int, vocab: int) -> dict:
    env = {**os.environ, **hosts.ENV, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1",
           "MPISPLIT_BLAS_THREADS": "1", "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}
    cmd = [common.mpiexec_path(), *hosts.mpiexec_args(2, ppn), sys.executable, __file__, "--worker",
           "--reps", str(reps), "--rows", str(rows), "--layers", str(layers), "--vocab", str(vocab)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median_of(runs: list[dict]) -> dict:
    """Each timing's median over the rounds; the rest from the first."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            out[key] = statistics.median(r[key] for r in runs)
    return out


def show(rate: str, across: dict, one: dict) -> None:
    ms = lambda s: f"{s * 1e3:.0f} ms"
    print(f"--- {rate}: {across['parameters'] / 1e6:.1f} M parameters, {across['gradient_bytes'] / MIB:.1f} MiB "
          f"of gradients, {across['tokens_per_rank']} tokens per rank")
    print(f"  across hosts: compute {ms(across['compute'])}, all-reduce alone {ms(across['reduce'])} "
          f"({across['reduce'] / across['compute']:.2f} of compute)")
    print(f"  step blocking {ms(across['blocking'])}, overlapped {ms(across['overlapped'])} "
          f"(waiting at the end {ms(across['overlap_wait'])}); Iallreduce's wait after compute "
          f"{ms(across['iallreduce_wait'])}")
    waits = ", ".join(f"{name} {ms(across['overlapped_' + name])}" for name in WAITS if "overlapped_" + name in across)
    print(f"  overlapped, the helper waiting otherwise: {waits}")
    print(f"  one host: step {ms(one['blocking'])} (compute {ms(one['compute'])}); overlapped across hosts / "
          f"one host = {across['overlapped'] / one['blocking']:.2f}x, blocking = "
          f"{across['blocking'] / one['blocking']:.2f}x")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"])
    p.add_argument("--reps", type=int, default=3, help="interleaved steps of each kind per job")
    p.add_argument("--rounds", type=int, default=3, help="jobs across the hosts and on one, alternated")
    p.add_argument("--rows", type=int, default=6, help="sequences of 128 tokens per rank and step")
    p.add_argument("--layers", type=int, default=8, help="the GPT's blocks (hidden 384)")
    p.add_argument("--vocab", type=int, default=4096, help="the GPT's vocabulary (tied embedding: its gradient is last)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = p.parse_args()
    if args.worker:
        common.print_from_rank0(worker(args.reps, args.rows, args.layers, args.vocab))
        return 0
    NetHosts = common.net_hosts("bench_overlap")
    if NetHosts is None:
        return 2
    reps = 2 if args.smoke else args.reps
    results = {}
    with NetHosts(2) as hosts:
        for rate in args.rates[:1] if args.smoke else args.rates:
            hosts.shape(rate)
            rounds: dict[str, list[dict]] = {"across": [], "one_host": []}
            for _ in range(1 if args.smoke else args.rounds):  # alternated: the machine's noise shared
                for key, ppn in (("across", 1), ("one_host", 2)):
                    rounds[key].append(run(hosts, ppn, reps, args.rows, args.layers, args.vocab))
            results[rate] = {key: _median_of(runs) for key, runs in rounds.items()}
            show(rate, results[rate]["across"], results[rate]["one_host"])
    out = common.write_json(args.out / "bench_overlap.json", {"machine": common.machine_info(), "results": results})
    print(f"-> {out} ({common.machine_info()['cpu']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
