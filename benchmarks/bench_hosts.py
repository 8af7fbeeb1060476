"""Collectives between separate network hosts, against the alpha-beta cost model (as root).

Two hosts on this machine: network namespaces joined by veth pairs to a bridge (tests/_hosts.py),
each link optionally limited with a token bucket (`tc ... tbf`; no latency can be added here).
For each link rate (unlimited, 10 and 1 Gbit/s):

  alpha, beta   half the round trip of 8-byte and 16 MiB messages between the hosts (ping-pong)
  all-reduce    a float32 sum over ranks of both hosts, 64 KiB .. 64 MiB: MPI's Allreduce (as the
                library calls it, in pieces of 4 MiB) and the library's host ring (parallel/comm.py),
                against the model t = 2(p-1)/p * n/B + 2(p-1) alpha of a ring over p ranks
  step          the collectives of one training step of a dp 2 x tp 2 GPT across the hosts (TP
                inside each host, the gradient all-reduce across): time in collectives per
                communicator, from the Communicator's own counters
  decode        greedy decoding of a 101 M-parameter GPT at tp 2, one rank per host against
                both on one host, batch 1 and 16: time per token, the collectives of a token
                (counted) and their time by the model

  python benchmarks/bench_hosts.py                 # rates unlimited, 10gbit, 1gbit
  python benchmarks/bench_hosts.py --smoke         # one rate, small sizes

Then, from each rate's alpha and beta, the model for 2-64 nodes of the 1B and 8B Llama shapes
(tokens/s per node, the share of a step in the gradient all-reduce; its assumptions in `model`'s
docstring; `--node-tflops`, `--tokens`).
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


def _timed(fn: Any, comm: Any, reps: int) -> float:
    """Median seconds of `reps` calls, each started together (barrier), the slowest rank's."""
    fn()
    times = []
    for _ in range(reps):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return max(comm.allgather(statistics.median(times)))


def worker(sizes: list[int], reps: int) -> dict:
    """Under mpiexec across the hosts: ping-pong, all-reduce (MPI and ring), one training step."""
    from mpi4py import MPI

    from mpisplit.parallel.comm import Communicator

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    last = size - 1  # rank 0 and the last rank: different hosts
    out: dict[str, Any] = {"ranks": size}
    for name, nbytes in (("alpha", 8), ("beta", 16 * MIB)):
        buf = np.zeros(nbytes, dtype=np.uint8)

        def pingpong(buf: np.ndarray = buf) -> None:
            if rank == 0:
                world.Send(buf, last)
                world.Recv(buf, last)
            elif rank == last:
                world.Recv(buf, 0)
                world.Send(buf, 0)

        half = _timed(pingpong, world, reps) / 2
        out[name] = half if name == "alpha" else nbytes / half  # seconds; bytes/s
    comm = Communicator(world)
    rows = []
    for n in sizes:
        x = np.ones(n // 4, dtype=np.float32)
        mpi_s = _timed(lambda x=x: [world.Allreduce(MPI.IN_PLACE, x[s]) for s in
                                    _pieces(x.size, (4 * MIB) // 4)], world, reps)
        ring_s = _timed(lambda x=x: comm._ring_allreduce(x, "sum"), world, reps)
        model = 2 * (size - 1) / size * n / out["beta"] + 2 * (size - 1) * out["alpha"]
        rows.append({"bytes": n, "mpi_s": mpi_s, "ring_s": ring_s, "model_s": model})
    out["allreduce"] = rows
    return out


def _pieces(n: int, step: int) -> list[slice]:
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def step_worker(reps: int) -> dict:
    """One dp 2 x tp 2 training step across the hosts: seconds in collectives per communicator."""
    from mpi4py import MPI

    from mpisplit.models.config import GPTConfig
    from mpisplit.models.gpt import GPT
    from mpisplit.parallel.grid import ProcessGrid
    from mpisplit.training.optim import average_gradients
    from mpisplit.training.step import StepRunner

    grid = ProcessGrid(tp=2, dp=2)
    cfg = GPTConfig(vocab_size=8192, block_size=128, n_layer=4, n_head=8, n_embd=512)
    model = GPT(cfg, grid, seed=0)
    runner = StepRunner(model, grid)
    rng = np.random.default_rng(grid.dp_rank)
    x, y = rng.integers(0, cfg.vocab_size, size=(2, 4, 128))

    def step() -> None:
        runner.forward_backward(x, y)
        average_gradients(model.parameters(), grid.dp_comm)
        model.zero_grad()

    def dp_only() -> None:
        average_gradients(model.parameters(), grid.dp_comm)

    total = _timed(step, MPI.COMM_WORLD, reps)
    runner.forward_backward(x, y)  # gradients to average (again and again: the same bytes)
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    dp_s = _timed(dp_only, MPI.COMM_WORLD, reps)
    return {"step_s": total, "dp_allreduce_s": dp_s, "gradient_bytes": grads,
            "parameters": model.num_parameters()}


def decode_worker(reps: int) -> dict:
    """Greedy decoding at tp 2, one rank per host: seconds per token and, from the Communicator's
    counters, the collectives of one token (each layer's two all-reduces, the head's gather)."""
    from mpi4py import MPI

    from mpisplit.models.config import GPTConfig
    from mpisplit.models.gpt import GPT
    from mpisplit.parallel.grid import ProcessGrid

    grid = ProcessGrid(tp=2, dp=1)
    cfg = GPTConfig(vocab_size=8192, block_size=256, n_layer=8, n_head=16, n_embd=1024)
    model = GPT(cfg, grid, seed=0)
    out, tokens = {}, 16
    for batch in (1, 16):
        idx = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(batch, 16))

        model.generate(idx, 2)
        grid.tp_comm.reset_stats()
        per_token = _timed(lambda idx=idx: model.generate(idx, tokens), MPI.COMM_WORLD, reps) / tokens
        stats = grid.tp_comm.stats()
        runs = reps + 1
        out[str(batch)] = {"s_per_token": per_token, **{
            f"{k}_{field}": stats[k][field] / runs / tokens for k in ("allreduce", "allgather") for field in ("calls", "bytes")}}
    return {"parameters": model.num_parameters(), "decode": out}


def run_rate(hosts: Any, rate: str | None, sizes: list[int], reps: int) -> dict:
    hosts.shape(rate)
    env = {**os.environ, **hosts.ENV, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1",
           "MPISPLIT_BLAS_THREADS": "1"}
    result = {}
    for ppn, key in ((1, "p2"), (2, "p4")):
        cmd = [common.mpiexec_path(), *hosts.mpiexec_args(2 * ppn, ppn), sys.executable, __file__, "--worker",
               "--reps", str(reps), "--bytes", *map(str, sizes)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=True)
        result[key] = json.loads(done.stdout.strip().splitlines()[-1])
    cmd = [common.mpiexec_path(), *hosts.mpiexec_args(4, 2), sys.executable, __file__, "--step-worker",
           "--reps", str(reps)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=True)
    result["step"] = json.loads(done.stdout.strip().splitlines()[-1])
    for ppn, key in ((1, "decode_across"), (2, "decode_one_host")):
        cmd = [common.mpiexec_path(), *hosts.mpiexec_args(2, ppn), sys.executable, __file__, "--decode-worker",
               "--reps", str(reps)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=True)
        result[key] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def show(rate: str, res: dict) -> None:
    p2 = res["p2"]
    print(f"--- link {rate}: alpha {p2['alpha'] * 1e6:.1f} us, beta {p2['beta'] * 8 / 1e9:.2f} Gbit/s "
          f"({p2['beta'] / MIB:.0f} MiB/s)")
    for key in ("p2", "p4"):
        print(f"  all-reduce, {res[key]['ranks']} ranks on 2 hosts:   bytes     MPI     ring    model")
        for r in res[key]["allreduce"]:
            print(f"  {r['bytes'] / MIB:38.2f} MiB {r['mpi_s'] * 1e3:7.2f} {r['ring_s'] * 1e3:7.2f} "
                  f"{r['model_s'] * 1e3:7.2f} ms")
    alpha, beta = res["p2"]["alpha"], res["p2"]["beta"]
    for batch, d in res["decode_across"]["decode"].items():
        one = res["decode_one_host"]["decode"][batch]
        # a 2-rank ring all-reduce: 2 alpha + n / beta; a 2-rank all-gather: alpha + n / (2 beta)
        modelled = (d["allreduce_calls"] * 2 * alpha + d["allreduce_bytes"] / beta
                    + d["allgather_calls"] * alpha + d["allgather_bytes"] / (2 * beta))
        print(f"  decode, tp 2 across the hosts, batch {batch:>2s}: {d['s_per_token'] * 1e3:6.2f} ms per token "
              f"(one host {one['s_per_token'] * 1e3:6.2f}); {d['allreduce_calls']:.0f} all-reduces of "
              f"{d['allreduce_bytes'] / max(d['allreduce_calls'], 1) / 1024:.1f} KiB and {d['allgather_calls']:.0f} "
              f"all-gathers per token: model {modelled * 1e3:.2f} ms of communication")
        d["modelled_comm_s"] = modelled
    s = res["step"]
    print(f"  dp 2 x tp 2 step ({s['parameters'] / 1e6:.1f} M parameters): {s['step_s'] * 1e3:.0f} ms, of which "
          f"the gradient all-reduce across hosts {s['dp_allreduce_s'] * 1e3:.0f} ms "
          f"({s['gradient_bytes'] / MIB:.1f} MiB per rank)")


SHAPES = {"1B": {"params": 1.24e9, "layers": 16, "hidden": 2048},  # Llama-3.2-1B
          "8B": {"params": 8.03e9, "layers": 32, "hidden": 4096}}  # Llama-3.1-8B


def model(alpha: float, beta: float, node_tflops: float, tokens: int) -> list[dict]:
    """Data parallel over N nodes, TP over the tp ranks inside each node (its traffic in shared
    memory, not counted): a step computes 6 P FLOPs per token on `tokens` tokens per node at
    `node_tflops`, and all-reduces the float32 gradients, P/tp per rank, in tp rings that share
    the node's link of `beta` bytes/s: 2(N-1)/N * 4P / beta + 2(N-1) alpha, not overlapped with
    the backward pass (with overlap, up to the backward's 2/3 of the compute hides it)."""
    rows = []
    for name, shape in SHAPES.items():
        compute = 6 * shape["params"] * tokens / (node_tflops * 1e12)
        for n in (2, 4, 8, 16, 32, 64):
            comm = 2 * (n - 1) / n * 4 * shape["params"] / beta + 2 * (n - 1) * alpha
            hidden = min(comm, compute * 2 / 3)
            rows.append({"shape": name, "nodes": n, "compute_s": compute, "comm_s": comm,
                         "tokens_per_s_node": tokens / (compute + comm), "comm_fraction": comm / (compute + comm),
                         "overlapped_tokens_per_s_node": tokens / (compute + comm - hidden)})
    return rows


def show_model(rate: str, rows: list[dict], node_tflops: float, tokens: int) -> None:
    print(f"  model at {rate} per node, {node_tflops:g} TFLOP/s per node, {tokens} tokens per node per step:")
    for r in rows:
        print(f"    {r['shape']:>2s} x {r['nodes']:2d} nodes: compute {r['compute_s']:6.1f} s, gradient all-reduce "
              f"{r['comm_s']:6.1f} s ({r['comm_fraction']:4.0%} of the step), {r['tokens_per_s_node']:7.0f} tokens/s "
              f"per node ({r['overlapped_tokens_per_s_node']:7.0f} overlapped)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--rates", nargs="+", default=["none", "10gbit", "1gbit"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--bytes", nargs="+", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--step-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--decode-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--node-tflops", type=float, default=5.0, help="the model's node: FLOP/s (float32)")
    p.add_argument("--tokens", type=int, default=16384, help="the model's tokens per node per step")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = p.parse_args()
    if args.worker or args.step_worker or args.decode_worker:
        common.print_from_rank0(worker(args.bytes, args.reps) if args.worker else step_worker(args.reps)
                                if args.step_worker else decode_worker(args.reps))
        return 0
    NetHosts = common.net_hosts("bench_hosts")
    if NetHosts is None:
        return 2
    sizes = [4 << 10, MIB] if args.smoke else [4 << 10, 64 << 10, MIB, 4 * MIB, 16 * MIB, 64 * MIB]
    rates = args.rates[:1] if args.smoke else args.rates
    results = {}
    with NetHosts(2) as hosts:
        for rate in rates:
            results[rate] = run_rate(hosts, None if rate == "none" else rate, sizes, 2 if args.smoke else args.reps)
            show(rate, results[rate])
            link = results[rate]["p2"]
            results[rate]["model"] = model(link["alpha"], link["beta"], args.node_tflops, args.tokens)
            show_model(rate, results[rate]["model"], args.node_tflops, args.tokens)
    out = common.write_json(args.out / "bench_hosts.json", {"machine": common.machine_info(), "results": results})
    print(f"-> {out} ({common.machine_info()['cpu']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
