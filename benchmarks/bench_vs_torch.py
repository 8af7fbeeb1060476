"""mpisplit against PyTorch eager running transformers' GPT-2, one training step, one thread.

Each case builds one random GPT-2 (no dropout), saves it as a Hugging Face folder, and times a
full step (forward, cross-entropy, backward, AdamW, zero_grad) of
- torch: transformers' GPT2LMHeadModel loaded from the folder, `torch.optim.AdamW`;
- mpisplit: `GPT.from_pretrained` of the same folder, `mpisplit.optim.AdamW` (same
  hyperparameters, decay on every parameter in both);
- mpisplit-fresh (`--fresh`): the same model freshly initialised by `GPT(config, seed=0)`;
- mpisplit-numpy (`--numpy`): `from_pretrained` again with MPISPLIT_KERNELS=numpy (the NumPy
  path instead of the fused kernels), for the kernels' before and after in the same run.

Every framework runs in its own process (one BLAS/OpenMP thread); the processes are alternated
for `--rounds` rounds, in rotating order, and the report gives the median step of each framework
over the rounds and the ratio mpisplit / torch per case. The first-step losses of the two
frameworks are compared as a check that both ran the same model on the same batch.

  python benchmarks/bench_vs_torch.py                  # the three cases, 3 rounds
  python benchmarks/bench_vs_torch.py --rounds 5 --fresh --numpy --cases h1024
  python benchmarks/bench_vs_torch.py --pretrained-vs-fresh   # both models in one process
  python benchmarks/bench_vs_torch.py --profile --cases h1024 h512-v8192   # where mpisplit's step goes
  python benchmarks/bench_vs_torch.py --one-process --cases h1024   # both frameworks in one process
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common


class Case(NamedTuple):
    layers: int
    hidden: int
    heads: int
    batch: int
    seq: int
    vocab: int


CASES: dict[str, Case] = {
    "h256": Case(4, 256, 4, 8, 128, 512),
    "h1024": Case(2, 1024, 16, 4, 128, 512),
    "h512-v8192": Case(4, 512, 8, 4, 256, 8192),
}
LR, BETAS, EPS, WEIGHT_DECAY = 3e-4, (0.9, 0.95), 1e-8, 0.1
FRAMEWORKS = ("torch", "mpisplit", "mpisplit-fresh", "mpisplit-numpy")


def case_flops(name: str) -> float:
    """Model FLOPs of one step: 6 N P for the matmuls with weights plus the attention products."""
    c = CASES[name]
    n = c.batch * c.seq
    weights = c.layers * 12 * c.hidden**2 + c.vocab * c.hidden  # blocks + tied head
    return 6.0 * n * weights + c.layers * 12.0 * c.batch * c.seq**2 * c.hidden


def make_folder(name: str, folder: Path) -> None:
    """A random GPT-2 (seed 0, no dropout) saved in the Hugging Face layout."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    c = CASES[name]
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=c.vocab, n_positions=c.seq, n_embd=c.hidden, n_layer=c.layers, n_head=c.heads,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)


def batch(name: str) -> tuple[Any, Any]:
    import numpy as np

    c = CASES[name]
    rng = np.random.default_rng(1)
    return rng.integers(0, c.vocab, (c.batch, c.seq)), rng.integers(0, c.vocab, (c.batch, c.seq))


# ---- children: one framework, one case, one process ------------------------------------------


def torch_step(name: str, folder: Path) -> tuple[Any, Any]:
    import torch
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(1)
    model = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    idx, tgt = (torch.from_numpy(a) for a in batch(name))
    info = {"torch": torch.__version__, "adamw": "torch.optim.AdamW defaults (for-each off on CPU)"}
    return common.torch_train_step(model, opt, idx, tgt), info


def mpisplit_step(name: str, folder: Path, fresh: bool) -> tuple[Any, Any]:
    import mpisplit as ms

    grid = ms.ProcessGrid(tp=1)
    if fresh:
        c = CASES[name]
        cfg = ms.GPTConfig(vocab_size=c.vocab, block_size=c.seq, n_layer=c.layers, n_head=c.heads, n_embd=c.hidden)
        model = ms.GPT(cfg, grid, dtype="float32", seed=0)
    else:
        model = ms.GPT.from_pretrained(folder, grid, dtype="float32")
    opt = ms.optim.AdamW(list(model.parameters()), lr=LR, betas=BETAS, eps=EPS,
                         weight_decay=WEIGHT_DECAY, decay_filter=lambda p: True)
    idx, tgt = batch(name)
    from mpisplit import kernels

    return common.mpisplit_train_step(model, opt, idx, tgt), {"kernels": kernels.backend_name()}


def child(framework: str, name: str, folder: Path, warmup: int, steps: int) -> dict:
    common.limit_threads(1)
    t0 = time.perf_counter()
    if framework == "torch":
        step, info = torch_step(name, folder)
    else:
        step, info = mpisplit_step(name, folder, fresh=framework == "mpisplit-fresh")
        from mpisplit import kernels

        kernels.warm_up()  # numba's first compilation is a one-off per machine, not a step
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    first_loss = step()
    first_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"framework": framework, "case": name, "first_loss": first_loss, "setup_s": setup_s,
            "first_step_s": first_s, "times_s": times, "median_s": statistics.median(times),
            "cpu": common.machine_info()["cpu"], **info}


def run_child(framework: str, name: str, folder: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, **{k: "1" for k in common.THREAD_ENV_VARS}}
    if framework == "mpisplit-numpy":
        env["MPISPLIT_KERNELS"] = "numpy"
    cmd = [sys.executable, __file__, "--child", framework, "--cases", name, "--folder", str(folder),
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"{framework} {name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _alternate(steps: dict[str, Any], before: dict[str, Any], n: int) -> dict[str, float]:
    """Median seconds of each step, the steps run one after another in rotating order; `before`
    (per key, may be absent) runs just before that key's step (e.g. to switch the kernels)."""
    keys = list(steps)
    for key in keys * 2:  # warm-up
        before.get(key, lambda: None)()
        steps[key]()
    times: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(n):
        for key in keys[i % len(keys):] + keys[: i % len(keys)]:
            before.get(key, lambda: None)()
            t0 = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def pretrained_vs_fresh(name: str, folder: Path, steps: int) -> dict:
    """`from_pretrained` and a fresh model in one process, their steps alternated one by one:
    what differs between the two models themselves, without process-to-process noise."""
    common.limit_threads(1)
    pre, _ = mpisplit_step(name, folder, fresh=False)
    fresh, _ = mpisplit_step(name, folder, fresh=True)
    med = _alternate({"pretrained": pre, "fresh": fresh}, {}, 2 * steps)
    return {"case": name, "pretrained ms": 1000 * med["pretrained"], "fresh ms": 1000 * med["fresh"],
            "pretrained/fresh": med["pretrained"] / med["fresh"]}


def torch_vs_mpisplit_one_process(name: str, folder: Path, steps: int) -> dict:
    """Both frameworks in one process, their steps alternated one by one (one thread each): the
    ratio on a machine whose speed drifts (other jobs), where separate processes are not
    comparable."""
    common.limit_threads(1)
    from mpisplit import kernels

    theirs, _ = torch_step(name, folder)
    mine, _ = mpisplit_step(name, folder, fresh=False)
    kernels.warm_up()
    med = _alternate({"torch": theirs, "mpisplit": mine}, {}, 2 * steps)
    return {"case": name, "torch ms": 1000 * med["torch"], "mpisplit ms": 1000 * med["mpisplit"],
            "mpisplit/torch": med["mpisplit"] / med["torch"], "load": os.getloadavg()[0]}


def kernels_ab(name: str, folder: Path, steps: int) -> dict:
    """One model, its steps alternated with the fused kernels on and off (the NumPy path)."""
    from mpisplit import kernels

    common.limit_threads(1)
    step, _ = mpisplit_step(name, folder, fresh=False)
    kernels.warm_up()
    med = _alternate({"fused": step, "numpy": step},
                     {"fused": lambda: kernels.set_enabled(True), "numpy": lambda: kernels.set_enabled(False)},
                     2 * steps)
    kernels.set_enabled(None)
    return {"case": name, "fused ms": 1000 * med["fused"], "numpy ms": 1000 * med["numpy"],
            "fused/numpy": med["fused"] / med["numpy"]}


def profile_case(name: str, folder: Path, steps: int, top: int = 14) -> dict:
    """mpisplit's step under cProfile (one thread, after warm-up): the functions with the most
    own time, as a share of the profiled steps; what the time of a case goes to."""
    import cProfile
    import pstats

    from mpisplit import kernels

    common.limit_threads(1)
    step, _ = mpisplit_step(name, folder, fresh=False)
    kernels.warm_up()
    for _ in range(2):
        step()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    wall = (time.perf_counter() - t0) / steps
    stats = pstats.Stats(prof).stats
    total = sum(tt for _, _, tt, _, _ in stats.values())
    rows = sorted(((tt, f"{Path(f).name}:{ln}({fn})" if f != "~" else fn, nc)
                   for (f, ln, fn), (_, nc, tt, _, _) in stats.items()), reverse=True)[:top]
    return {"case": name, "step ms": 1000 * wall,
            "top": [{"function": fn, "ms per step": 1000 * tt / steps, "share": tt / total,
                     "calls per step": nc / steps} for tt, fn, nc in rows]}


# ---- parent: rounds, medians, ratios -----------------------------------------------------------


def measure(args: argparse.Namespace, root: Path) -> list[dict]:
    frameworks = ["torch", "mpisplit"] + ["mpisplit-fresh"] * args.fresh + ["mpisplit-numpy"] * args.numpy
    runs = []
    for name in args.cases:
        folder = root / name
        make_folder(name, folder)
        for r in range(args.rounds):
            order = frameworks[r % len(frameworks):] + frameworks[: r % len(frameworks)]
            for fw in order:
                res = run_child(fw, name, folder, args)
                res["round"], res["load_average"] = r, os.getloadavg()[0]
                runs.append(res)
                print(f"  {name:11s} round {r} {fw:15s} {1000 * res['median_s']:8.1f} ms"
                      f"  (load {res['load_average']:.1f})", flush=True)
    return runs


def summarize(runs: list[dict], cases: list[str]) -> list[dict]:
    rows = []
    for name in cases:
        mine = [r for r in runs if r["case"] == name]
        med = {fw: statistics.median(r["median_s"] for r in mine if r["framework"] == fw)
               for fw in {r["framework"] for r in mine}}
        loss = {r["framework"]: r["first_loss"] for r in mine}
        row = {"case": name, "torch ms": 1000 * med["torch"], "mpisplit ms": 1000 * med["mpisplit"],
               "mpisplit/torch": med["mpisplit"] / med["torch"],
               "mpisplit GFLOP/s": case_flops(name) / med["mpisplit"] / 1e9,
               "first-loss diff": f'{abs(loss["mpisplit"] - loss["torch"]):.1e}'}
        if "mpisplit-numpy" in med:
            row["numpy-path ms"] = 1000 * med["mpisplit-numpy"]
            row["fused/numpy"] = med["mpisplit"] / med["mpisplit-numpy"]
        if "mpisplit-fresh" in med:
            row["fresh ms"] = 1000 * med["mpisplit-fresh"]
            row["pretrained/fresh"] = med["mpisplit"] / med["mpisplit-fresh"]
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--fresh", action="store_true", help="also time a freshly initialised mpisplit model")
    p.add_argument("--numpy", action="store_true", help="also time mpisplit without its fused kernels")
    p.add_argument("--pretrained-vs-fresh", action="store_true",
                   help="only compare from_pretrained with a fresh model, in one process")
    p.add_argument("--kernels-ab", action="store_true",
                   help="only compare the fused kernels with the NumPy path, in one process")
    p.add_argument("--one-process", action="store_true",
                   help="only time torch against mpisplit in one process, steps alternated")
    p.add_argument("--profile", action="store_true",
                   help="only profile mpisplit's step of each case (cProfile, one process, one thread)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "bench_vs_torch.json")
    p.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.cases[0], args.folder, args.warmup, args.steps)))
        return
    if args.rounds < 1 or args.steps < 1 or args.warmup < 1:
        p.error("--rounds, --steps and --warmup must be at least 1")
    if args.profile:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.cases:
                make_folder(name, Path(tmp) / name)
                res = profile_case(name, Path(tmp) / name, args.steps)
                print(f"CPU: {common.machine_info()['cpu']}; {name}: {res['step ms']:.0f} ms per step under cProfile")
                print(common.format_table(res["top"], ["function", "ms per step", "share", "calls per step"]))
        return
    if args.pretrained_vs_fresh or args.kernels_ab or args.one_process:
        one = (pretrained_vs_fresh if args.pretrained_vs_fresh else kernels_ab if args.kernels_ab
               else torch_vs_mpisplit_one_process)
        with tempfile.TemporaryDirectory() as tmp:
            rows = []
            for name in args.cases:
                make_folder(name, Path(tmp) / name)
                rows.append(one(name, Path(tmp) / name, args.steps))
        print(f"CPU: {common.machine_info()['cpu']}")
        print(common.format_table(rows, list(rows[0])))
        return
    info = common.machine_info()
    print(f"CPU: {info['cpu']}, {info['cores']} cores, load {info['load_average_1_5_15min'][0]:.1f}; "
          f"{args.rounds} rounds, median of {args.steps} steps after {args.warmup} warm-up", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = measure(args, Path(tmp))
    rows = summarize(runs, args.cases)
    cols = ["case", "torch ms", "mpisplit ms", "mpisplit/torch", "mpisplit GFLOP/s", "first-loss diff"]
    if args.fresh:
        cols += ["fresh ms", "pretrained/fresh"]
    if args.numpy:
        cols += ["numpy-path ms", "fused/numpy"]
    print(common.format_table(rows, cols))
    path = common.write_json(args.out, {**common.result_meta(None, 1), "rows": rows, "runs": runs})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
