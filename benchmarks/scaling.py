"""Scaling of the mpisplit GPT training step on this machine: strong, weak and data-parallel.

    python benchmarks/scaling.py               # all three questions, 1 and 2 ranks
    python benchmarks/scaling.py --smoke       # tiny shapes, seconds (CI)

strong: the same model (h1024 preset) at tp=1 on 1 rank and tp=2 on 2 ranks:
        speedup = t(1) / t(2), efficiency = speedup / 2.
weak:   tp=1 at width h (h512 preset, 8 heads) against tp=2 at width 2h (16 heads, same depth,
        batch and vocabulary): each rank's matmul work doubles, so the efficiency is
        (model FLOP/s per rank at tp=2) / (model FLOP/s per rank at tp=1).
dp:     the h512 preset at dp=1 (1 rank) and dp=2 (2 ranks, twice the global batch):
        throughput ratio = tokens/s at dp=2 / tokens/s at dp=1 (ideal 2).

Each configuration runs in its own `mpiexec` job, 1 BLAS thread per rank; times are the
median of the slowest rank's step. Writes results/scaling.json and results/scaling.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common


def _shape(name: str, smoke: bool, wide: bool = False) -> common.ModelShape:
    base = common.TINY if smoke else common.get_shape(name)
    if not wide:
        return base
    # twice the width and twice the heads, everything else equal
    return dataclasses.replace(base, name=base.name + "-x2", n_embd=2 * base.n_embd, n_head=2 * base.n_head)


def configs(smoke: bool) -> list[dict]:
    strong = "h1024"
    small = "h512"
    return [
        {"question": "strong", "label": "tp1 (1 rank)", "ranks": 1, "tp": 1, "shape": _shape(strong, smoke)},
        {"question": "strong", "label": "tp2 (2 ranks)", "ranks": 2, "tp": 2, "shape": _shape(strong, smoke)},
        {"question": "weak", "label": "tp1, width h", "ranks": 1, "tp": 1, "shape": _shape(small, smoke)},
        {"question": "weak", "label": "tp2, width 2h", "ranks": 2, "tp": 2, "shape": _shape(small, smoke, wide=True)},
        {"question": "dp", "label": "dp1 (1 rank)", "ranks": 1, "tp": 1, "shape": _shape(small, smoke)},
        {"question": "dp", "label": "dp2 (2 ranks)", "ranks": 2, "tp": 1, "shape": _shape(small, smoke)},
    ]


def child(args: argparse.Namespace) -> None:
    """Inside mpiexec: time one configuration and write its JSON part."""
    import numpy as np
    from mpi4py import MPI

    import mpisplit as ms

    spec = json.loads(args.spec)
    shape = common.ModelShape(**spec["shape"])
    comm = MPI.COMM_WORLD
    grid = ms.ProcessGrid(tp=spec["tp"])
    model = ms.GPT(ms.GPTConfig(**shape.gpt_config_kwargs()), grid, dtype="float32", seed=0)
    opt = ms.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    rng = np.random.default_rng([0, grid.dp_rank])
    idx = rng.integers(0, shape.vocab_size, (shape.batch, shape.seq))
    tgt = rng.integers(0, shape.vocab_size, (shape.batch, shape.seq))

    def step() -> None:
        loss = model.loss(idx, tgt)
        loss.backward()
        ms.optim.average_gradients(model.parameters(), grid.dp_comm)
        opt.step()
        opt.zero_grad()

    times = common.time_steps(step, comm, args.warmup, args.steps)
    if comm.Get_rank() == 0:
        s = common.summarize(times)
        flops = common.train_flops(shape, shape.batch * grid.dp)
        tokens = shape.batch * shape.seq * grid.dp
        part = {**spec, "times_s": times, **s, "flops": flops, "tokens": tokens,
                "gflops_per_rank": flops / s["median_s"] / 1e9 / comm.Get_size(),
                "tokens_per_s": tokens / s["median_s"]}
        Path(args.part).write_text(json.dumps(part))
    grid.free()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 step: seconds")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.spec:
        child(args)
        return 0
    if args.smoke:
        args.steps, args.warmup = 1, 0
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, cfg in enumerate(configs(args.smoke)):
        part = args.out / f".scaling_part{i}.json"
        spec = json.dumps({**cfg, "shape": dataclasses.asdict(cfg["shape"])})
        rc = common.run_under_mpi(
            cfg["ranks"], [str(Path(__file__).resolve()), "--spec", spec, "--part", str(part),
                           "--steps", str(args.steps), "--warmup", str(args.warmup)],
            threads=1, timeout=args.timeout,
        )
        if rc != 0 or not part.exists():
            print(f"{cfg['question']} {cfg['label']}: failed (exit {rc})", file=sys.stderr)
            return 1
        rows.append(json.loads(part.read_text()))
        part.unlink()
        r = rows[-1]
        print(f"  {r['question']:6s} {r['label']:14s} {r['shape']['name']:10s} {r['median_s'] * 1e3:8.1f} ms  "
              f"{r['gflops_per_rank']:6.1f} GFLOP/s/rank  {r['tokens_per_s']:8.0f} tokens/s", flush=True)

    by = {(r["question"], r["ranks"]): r for r in rows}
    summary = {
        "strong_speedup": by["strong", 1]["median_s"] / by["strong", 2]["median_s"],
        "weak_efficiency": by["weak", 2]["gflops_per_rank"] / by["weak", 1]["gflops_per_rank"],
        "dp_throughput_ratio": by["dp", 2]["tokens_per_s"] / by["dp", 1]["tokens_per_s"],
    }
    summary["strong_efficiency"] = summary["strong_speedup"] / 2
    print(f"strong: speedup {summary['strong_speedup']:.2f} on 2 ranks (efficiency {summary['strong_efficiency']:.2f}); "
          f"weak: efficiency {summary['weak_efficiency']:.2f}; dp=2 vs dp=1 throughput {summary['dp_throughput_ratio']:.2f}")
    out = {"meta": common.result_meta(None, 1), "smoke": args.smoke, "rows": rows, "summary": summary}
    common.write_json(args.out / "scaling.json", out)
    plt = common.pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = [f"{r['question']}\n{r['label']}" for r in rows]
        ax.bar(range(len(rows)), [r["gflops_per_rank"] for r in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)), names, fontsize=7)
        ax.set_ylabel("model GFLOP/s per rank")
        ax.set_title("mpisplit GPT step scaling")
        common.save_figure(fig, args.out / "scaling.png")
    print(f"wrote {args.out / 'scaling.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
