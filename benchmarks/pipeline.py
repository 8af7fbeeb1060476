"""Pipeline, sequence parallelism and recomputation: bubble, activation memory, step time.

    mpiexec -n 2 python benchmarks/pipeline.py --out benchmarks/results     # about a minute
    mpiexec -n 2 python benchmarks/pipeline.py --smoke --out /tmp/x          # seconds (tests)

bubble     pp=2, m = 1, 4, 8: the share of the step each stage spends waiting for the other
           (StageLink.wait_seconds / step time, both stages averaged) against (p-1)/(m+p-1).
memory     bytes the autograd graph keeps for backward per layer and rank (one micro-batch;
           the difference between n_layer = 2 and 1), for: no parallelism, tp=2, tp=2 + sequence
           parallel, + selective recomputation, full recomputation; as a multiple of s*b*h
           bytes-per-element, against the per-layer formulas of DESIGN.md.
steptime   one training step (forward, backward, AdamW) of the same model at pp=2 and at tp=2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpisplit.models.config import GPTConfig
from mpisplit.models.gpt import GPT
from mpisplit.parallel.grid import ProcessGrid
from mpisplit.training.optim import AdamW
from mpisplit.training.step import StepRunner

WORLD = MPI.COMM_WORLD


def _cfg(a: argparse.Namespace, layers: int | None = None, dropout: float = 0.0) -> GPTConfig:
    return GPTConfig(vocab_size=65, block_size=a.seq, n_layer=layers or a.layers, n_head=a.heads,
                     n_embd=a.hidden, dropout=dropout)


def _batch(a: argparse.Namespace, rows: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 65, size=(2, rows, a.seq))


def _timed_steps(model: GPT, grid: ProcessGrid, a: argparse.Namespace, m: int) -> tuple[float, float]:
    """Median step seconds and the mean share of it spent waiting on pipeline neighbours."""
    runner = StepRunner(model, grid, m)
    opt = AdamW(model.parameters(), lr=1e-4)
    x, y = _batch(a, a.rows * m)
    times, waits = [], []
    for i in range(a.steps + 1):
        if runner.link is not None:
            runner.link.reset_stats()
        grid.world.barrier()
        t0 = time.perf_counter()
        runner.forward_backward(x, y)
        opt.step()
        opt.zero_grad()
        grid.world.barrier()
        dt = time.perf_counter() - t0
        if i:  # the first step warms the allocator up
            times.append(dt)
            waits.append(runner.link.wait_seconds / dt if runner.link is not None else 0.0)
    share = float(np.mean(WORLD.allgather(float(np.median(waits)))))
    return float(np.median(times)), share


def bubble(a: argparse.Namespace) -> list[dict]:
    rows = []
    with ProcessGrid(tp=1, pp=2) as grid:
        model = GPT(_cfg(a), grid, dtype="float32", seed=0)
        for m in (1, 4, 8):
            step, share = _timed_steps(model, grid, a, m)
            rows.append({"pp": 2, "m": m, "step_s": step, "measured_bubble": share,
                         "formula_bubble": 1 / (m + 1)})
    return rows


def _kept_bytes(loss) -> int:
    """Bytes of the arrays the graph behind `loss` keeps for backward (each array once)."""
    seen, total, stack, visited = set(), 0, [loss], set()
    while stack:
        t = stack.pop()
        if id(t) in visited or t._ctx is None:
            continue
        visited.add(id(t))
        for arr in t._ctx.saved:
            if hasattr(arr, "nbytes") and id(arr) not in seen:
                seen.add(id(arr))
                total += arr.nbytes
        stack.extend(t._ctx.inputs)
    return total


def _per_layer(grid: ProcessGrid, a: argparse.Namespace, **kw) -> int:
    x, y = _batch(a, a.rows)
    kept = []
    for layers in (1, 2):
        model = GPT(_cfg(a, layers, dropout=0.1), grid, dtype="float32", seed=0, **kw)
        kept.append(_kept_bytes(model.loss(x, y)))
    return kept[1] - kept[0]


def memory(a: argparse.Namespace) -> list[dict]:
    s, b, h, heads, t = a.seq, a.rows, a.hidden, a.heads, 2
    unit = s * b * h  # elements of one (s, b, h) activation
    ratio = heads * s / h
    formulas = {  # DESIGN.md per layer, bytes for 16-bit activations and 1-byte masks, in units of sbh
        "none": 34 + 5 * ratio, "tp2": 10 + 24 / t + 5 * ratio / t, "tp2+sp": (34 + 5 * ratio) / t,
        "tp2+sp+selective": 34 / t, "full": 2,
    }
    measured = {}
    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as alone:
        if WORLD.rank == 0:
            measured["none"] = _per_layer(alone, a)
            measured["full"] = _per_layer(alone, a, recompute="full")
    with ProcessGrid(tp=2) as grid:
        for name, kw in (("tp2", {}), ("tp2+sp", {"sequence_parallel": True}),
                         ("tp2+sp+selective", {"sequence_parallel": True, "recompute": "selective"})):
            value = _per_layer(grid, a, **kw)
            if WORLD.rank == 0:
                measured[name] = value
    measured = WORLD.bcast(measured, root=0)
    return [{"layout": k, "bytes_per_layer": measured[k], "per_sbh": measured[k] / unit,
             "per_sbh_float32_elements": measured[k] / (4 * unit), "paper_16bit_per_sbh": formulas[k]}
            for k in formulas]


def steptime(a: argparse.Namespace) -> list[dict]:
    rows = []
    for name, kw, m in (("pp=2", {"pp": 2, "tp": 1}, 4), ("tp=2", {"tp": 2}, 4)):
        with ProcessGrid(**kw) as grid:
            step, _ = _timed_steps(GPT(_cfg(a), grid, dtype="float32", seed=0), grid, a, m)
            rows.append({"layout": name, "micro_batches": m, "step_s": step})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one step (for tests)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rows", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    if WORLD.size != 2:
        raise SystemExit("run under mpiexec -n 2")
    if a.smoke:
        a.layers, a.hidden, a.seq, a.rows, a.steps = 2, 16, 8, 2, 1
    result = {"command": " ".join(["mpiexec -n 2 python", *sys.argv]), "load_average": os.getloadavg()[0],
              "shape": {"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "seq": a.seq, "rows": a.rows},
              "bubble": bubble(a), "memory": memory(a), "steptime": steptime(a)}
    if WORLD.rank == 0:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "pipeline.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
