"""GPT training step: mpisplit vs the raw NumPy floor vs PyTorch, per preset and DP x TP layout.

Default mode (timing): for each preset and each layout -- 1 rank (tp=1), 2 ranks dp=2 x tp=1,
2 ranks tp=2 -- times one full training step (forward, backward, DP gradient average, AdamW) of
every available implementation in the same MPI job, interleaved step by step, warm-up first,
median of --steps, each step the slowest rank's time. Reports step time, model FLOP/s
(GPT spec formula; a dp=2 step processes twice the tokens), MFU = model FLOP/s / (matmul
ceiling per rank x ranks), with the ceiling measured in the same job (float32 matmul, all
ranks at once, same threads), and the ratios mpisplit/raw, mpisplit/torch, torch/raw.

--comm: one mpisplit step with the communicators' counters reset, compared call by call and
byte by byte with the GPT spec's analytic counts (every ratio must be exactly 1.00).
--memory: peak RSS per rank of each implementation (one process per implementation) against
the analytic bytes of parameters + gradients + AdamW moments + saved activations.

  python benchmarks/bench_gpt.py                       # all presets, all layouts
  python benchmarks/bench_gpt.py --presets h256 h512 --steps 5
  python benchmarks/bench_gpt.py --comm                # mpisplit's collectives vs the spec
  python benchmarks/bench_gpt.py --memory --presets h1024
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, raw_gpt
from benchmarks.common import ModelShape

IMPLS = ("mpisplit", "raw", "torch")
ADAMW = raw_gpt.AdamWConfig()  # lr 3e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1


# ---- which implementations exist here ---------------------------------------------------------


def load_mpisplit() -> tuple[Any | None, str]:
    """(the mpisplit module, "") when its GPT API is importable, else (None, why not)."""
    try:
        import mpisplit as ms

        for attr in ("GPT", "GPTConfig", "ProcessGrid", "optim", "to_numpy"):
            getattr(ms, attr)
        ms.optim.AdamW  # noqa: B018
    except (ImportError, AttributeError) as e:
        return None, f"{type(e).__name__}: {e}"
    return ms, ""


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def layouts_for(world: int) -> list[tuple[int, int]]:
    """(dp, tp) pairs with dp * tp == world: pure DP first, pure TP last."""
    return [(world // tp, tp) for tp in range(1, world + 1) if world % tp == 0]


def layout_name(ranks: int, dp: int, tp: int) -> str:
    if ranks == 1:
        return "1 rank"
    return f"dp{dp} x tp{tp}"


# ---- one implementation's training step -------------------------------------------------------


class Impl:
    """A built model with `step()` (one training step) and `first_loss`."""

    name: str
    step: Callable[[], Any]
    first_loss: float | None = None
    note: str = ""

    def free(self) -> None:
        pass


class RawImpl(Impl):
    name = "raw"

    def __init__(self, shape: ModelShape, comm: Any, tp: int, dtype: str) -> None:
        self.model = raw_gpt.RawGPT(shape, comm, tp=tp, dtype=dtype, adamw=ADAMW)
        idx, tgt = raw_gpt.make_batch(shape, seed=self.model.dp_rank)
        self.step = lambda: self.model.train_step(idx, tgt)
        self.first_loss = None

    def free(self) -> None:
        self.model.free()


class TorchImpl(Impl):
    name = "torch"

    def __init__(self, shape: ModelShape, comm: Any, tp: int, dtype: str, threads: int) -> None:
        import torch

        from benchmarks import torch_gpt

        self.trainer = torch_gpt.TorchTrainer(shape, comm, tp, dtype=dtype, adamw=ADAMW,
                                              threads=threads)
        idx, tgt = raw_gpt.make_batch(shape, seed=self.trainer.groups.dp_rank)
        ti, tt = torch.from_numpy(idx), torch.from_numpy(tgt)
        self.step = lambda: self.trainer.train_step(ti, tt)
        self.note = f"AdamW {self.trainer.adamw_impl}"


def _dp_sync_callable(ms: Any, model: Any, grid: Any) -> tuple[Callable[[], Any] | None, str]:
    """The library's data-parallel gradient average: `ms.optim.average_gradients(params,
    dp_comm)`, or a method of that kind on the model; None when neither exists (the optimizer
    is then assumed to do it, and the --comm mode shows whether it did)."""
    fn = getattr(ms.optim, "average_gradients", None)
    if callable(fn):
        params = list(model.parameters())
        return (lambda: fn(params, grid.dp_comm)), "optim.average_gradients"
    for name in ("allreduce_gradients", "average_gradients", "sync_gradients"):
        meth = getattr(model, name, None)
        if callable(meth):
            return meth, f"model.{name}()"
    return None, "in optimizer step (assumed)"


class MpisplitImpl(Impl):
    name = "mpisplit"

    def __init__(self, ms: Any, shape: ModelShape, comm: Any, tp: int, dtype: str) -> None:
        self.ms = ms
        self.grid = ms.ProcessGrid(tp=tp, comm=comm)
        cfg = ms.GPTConfig(**shape.gpt_config_kwargs())
        self.model = ms.GPT(cfg, self.grid, dtype=dtype, seed=0)
        params = list(self.model.parameters())
        # the same update as raw and torch: decay on every parameter
        kw = {"lr": ADAMW.lr, "betas": (ADAMW.beta1, ADAMW.beta2), "eps": ADAMW.eps,
              "weight_decay": ADAMW.weight_decay}
        try:
            self.opt = ms.optim.AdamW(params, decay_filter=lambda p: True, **kw)
        except TypeError:  # an AdamW without a decay filter: its own choice of decayed params
            self.opt = ms.optim.AdamW(params, **kw)
        sync, self.note = _dp_sync_callable(ms, self.model, self.grid)
        if self.grid.dp == 1:
            sync, self.note = None, ""
        self.idx, self.tgt = raw_gpt.make_batch(shape, seed=self.grid.dp_rank)

        def step() -> Any:
            loss = self.model.loss(self.idx, self.tgt)
            loss.backward()
            if sync is not None:
                sync()
            self.opt.step()
            self.opt.zero_grad()
            return loss

        self.step = step

    def local_param_count(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.model.parameters())

    def free(self) -> None:
        self.grid.free()


def build(name: str, ms: Any, shape: ModelShape, comm: Any, tp: int, dtype: str,
          threads: int) -> Impl:
    if name == "raw":
        return RawImpl(shape, comm, tp, dtype)
    if name == "torch":
        return TorchImpl(shape, comm, tp, dtype, threads)
    return MpisplitImpl(ms, shape, comm, tp, dtype)


# ---- analytic sizes ---------------------------------------------------------------------------


def local_param_count(shape: ModelShape, tp: int) -> int:
    """Parameters one TP rank holds (padded vocabulary rows included)."""
    total = 0
    for _, gshape, kind, _ in raw_gpt.param_specs(shape):
        n = int(np.prod(gshape))
        if kind == "vocab":
            n = raw_gpt.padded_vocab(shape.vocab_size, tp) // tp * shape.n_embd
        elif kind != "rep":
            n //= tp
        total += n
    return total


def analytic_comm(shape: ModelShape, dp: int, tp: int, itemsize: int) -> dict[str, dict]:
    """The GPT spec's collectives of one training step, per communicator and kind.

    TP: embedding 1 + per block 2 forward + 2 backward + head backward 1 allreduces of (B,T,h),
    plus the cross-entropy's 3 allreduces of (B,T) (max, exp-sums, target logits).
    DP: one allreduce of all local gradients. Nothing else, and nothing on a size-1 group.
    """
    zero = {k: {"calls": 0, "bytes": 0} for k in ("allreduce", "allgather", "reduce_scatter",
                                                   "bcast")}
    tp_counts = json.loads(json.dumps(zero))
    dp_counts = json.loads(json.dumps(zero))
    N, h, L = shape.batch * shape.seq, shape.n_embd, shape.n_layer
    if tp > 1:
        big = 4 * L + 2
        tp_counts["allreduce"] = {"calls": big + 3,
                                  "bytes": big * N * h * itemsize + 3 * N * itemsize}
    if dp > 1:
        dp_counts["allreduce"] = {"calls": 1, "bytes": local_param_count(shape, tp) * itemsize}
    return {"tp": tp_counts, "dp": dp_counts}


def analytic_memory(shape: ModelShape, tp: int, itemsize: int) -> dict[str, int]:
    """Bytes per rank: parameters, gradients, two AdamW moments, and the activations backward
    needs at minimum (per block: LN1 and LN2 normalised inputs, attention and MLP inputs,
    q, k, v, softmax, attention output, fc output, gelu output; head: LN_f input and output,
    the local logits)."""
    B, T, h, L, H = shape.batch, shape.seq, shape.n_embd, shape.n_layer, shape.n_head
    N = B * T
    vl = raw_gpt.padded_vocab(shape.vocab_size, tp) // tp
    per_block = 4 * N * h + 12 * N * h // tp + B * (H // tp) * T * T + 2 * N
    acts = L * per_block + 2 * N * h + N * vl
    p = local_param_count(shape, tp)
    return {"params": p * itemsize, "grads": p * itemsize, "adamw": 2 * p * itemsize,
            "activations": acts * itemsize,
            "total": (4 * p + acts) * itemsize}


# ---- child processes (inside mpiexec) ---------------------------------------------------------


def measure_ceiling(comm: Any, smoke: bool, dtype: str) -> dict[str, float | None]:
    """Matmul GFLOP/s per rank: measured now, all ranks at once (mean over ranks), and the
    best of floors.json at the same threads per rank, if any. MFU uses the larger: other work
    on the machine can only lower a measurement, never raise it."""
    sizes = [128] if smoke else [1024, 2048]
    comm.Barrier()
    best = max(common.matmul_gflops(n, np.dtype(dtype), repeats=1 if smoke else 5)
               for n in sizes)
    job = float(np.mean(comm.allgather(best)))
    floors = None
    path = common.RESULTS_DIR / "floors.json"
    if not smoke and path.exists():
        f = json.loads(path.read_text())
        if (f.get("device") == "cpu" and not f.get("smoke")
                and f["meta"].get("threads_per_rank") == common.threads_in_effect()):
            floors = f["ceiling_gflops_per_rank"].get(dtype)
    return {"job": job, "floors": floors, "used": max(job, floors or 0.0)}


def child_timing(args: argparse.Namespace, comm: Any) -> dict:
    ms, why = load_mpisplit()
    have_torch = torch_available()
    threads = common.threads_in_effect()
    if have_torch:
        import torch

        torch.set_num_threads(threads)
    world, rank = comm.Get_size(), comm.Get_rank()
    ceilings = measure_ceiling(comm, args.smoke, args.dtype)
    ceiling = ceilings["used"]
    rows = []
    for preset in args.presets:
        shape = common.get_shape(preset)
        for dp, tp in layouts_for(world):
            if shape.n_head % tp:
                continue
            names = [n for n in args.impls
                     if (n != "mpisplit" or ms is not None) and (n != "torch" or have_torch)]
            # all implementations resident at once only if their memory fits the budget
            est = 16 * local_param_count(shape, tp) * world * len(names)
            interleave = est <= args.mem_budget_gb * 2**30
            times: dict[str, list[float]] = {}
            notes: dict[str, str] = {}
            groups = [names] if interleave else [[n] for n in names]
            for group in groups:
                impls = {n: build(n, ms, shape, comm, tp, args.dtype, threads) for n in group}
                notes.update({n: i.note for n, i in impls.items() if i.note})
                times.update(common.time_interleaved(
                    {n: i.step for n, i in impls.items()}, comm, args.warmup, args.steps))
                for i in impls.values():
                    i.free()
                del impls
                gc.collect()
            flops = common.train_flops(shape, shape.batch * dp)
            row: dict[str, Any] = {
                "preset": preset, "n_embd": shape.n_embd, "n_layer": shape.n_layer,
                "n_head": shape.n_head, "vocab": shape.vocab_size, "batch": shape.batch,
                "seq": shape.seq, "ranks": world, "dp": dp, "tp": tp, "threads": threads,
                "layout": layout_name(world, dp, tp), "tokens": shape.batch * shape.seq * dp,
                "flops": flops, "ceiling_gflops_per_rank": ceiling,
                "ceiling_job_gflops": ceilings["job"], "ceiling_floors_gflops": ceilings["floors"],
                "mode": "interleaved" if interleave else "sequential", "notes": notes,
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "load_average_1min": os.getloadavg()[0],  # > ranks: other work competed
            }
            for n in IMPLS:
                t = times.get(n)
                s = common.summarize(t) if t else None
                row[f"{n}_s"] = s["median_s"] if s else None
                row[f"{n}_min_s"] = s["min_s"] if s else None
                row[f"{n}_times"] = t
                row[f"{n}_gflops"] = flops / s["median_s"] / 1e9 if s else None
                row[f"{n}_mfu"] = (flops / s["median_s"] / 1e9 / (ceiling * world)) if s else None
            rows.append(row)
            if rank == 0:
                print(f"  {preset} {row['layout']}: " + ", ".join(
                    f"{n} {row[f'{n}_s'] * 1e3:.0f} ms" for n in IMPLS if row[f"{n}_s"]),
                    flush=True)
    return {"rows": rows, "mpisplit_missing": why, "torch_missing": not have_torch}


def child_comm(args: argparse.Namespace, comm: Any) -> dict:
    ms, why = load_mpisplit()
    if ms is None:
        return {"error": f"mpisplit GPT not importable: {why}"}
    world = comm.Get_size()
    checks, dp_sync = [], {}
    for preset in args.presets:
        shape = common.get_shape(preset)
        for dp, tp in layouts_for(world):
            if (dp == 1 and tp == 1) or shape.n_head % tp:
                continue
            impl = MpisplitImpl(ms, shape, comm, tp, args.dtype)
            if impl.note:
                dp_sync[f"dp{dp} x tp{tp}"] = impl.note
            impl.step()  # a first step may set things up lazily; count the second
            comms = {"tp": impl.grid.tp_comm, "dp": impl.grid.dp_comm}
            for c in comms.values():
                c.reset_stats()
            impl.step()
            measured = {k: c.stats() for k, c in comms.items()}
            expected = analytic_comm(shape, dp, tp, np.dtype(args.dtype).itemsize)
            for cname in ("tp", "dp"):
                for kind, exp in expected[cname].items():
                    got = measured[cname].get(kind, {"calls": 0, "bytes": 0})
                    for what in ("calls", "bytes"):
                        e, g = exp[what], got[what]
                        ratio = 1.0 if e == g == 0 else (g / e if e else float("inf"))
                        if e == 0 and g == 0 and kind != "allreduce":
                            continue  # nothing expected, nothing seen: not worth a row
                        checks.append({"preset": preset, "dp": dp, "tp": tp, "comm": cname,
                                       "kind": kind, "what": what, "measured": g,
                                       "analytic": e, "ratio": ratio, "ok": g == e})
            impl.free()
            del impl
            gc.collect()
    return {"checks": checks, "dp_sync": dp_sync}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _warm_mpi(comm: Any) -> int:
    """RSS that MPI's own buffers add on the first all-reduces of a step's message sizes (up to
    the 4 MiB pieces a large one goes in): a fixed cost per process, not the model's; taken
    before the baseline for every implementation alike. Returns the bytes it added."""
    from mpi4py import MPI

    if comm.Get_size() == 1:
        return 0
    before = _rss_now()
    dup = comm.Dup()
    for nbytes in (1 << 12, 1 << 16, 1 << 19, 1 << 22):
        buf = np.zeros(nbytes // 4, np.float32)
        for _ in range(2):
            dup.Allreduce(MPI.IN_PLACE, buf)
    del buf
    dup.Free()
    gc.collect()
    return max(0, _rss_now() - before)


def child_memory(args: argparse.Namespace, comm: Any) -> dict:
    """One implementation, one preset, one layout: peak RSS after a few steps."""
    ms, why = load_mpisplit()
    name, shape = args.impl, common.get_shape(args.presets[0])
    dp, tp = (int(x) for x in args.layout.split(","))
    if name == "mpisplit" and ms is None:
        return {"error": f"mpisplit GPT not importable: {why}"}
    threads = common.threads_in_effect()
    if name == "torch":
        import torch

        torch.set_num_threads(threads)
    runtime_rss = 0
    if name == "mpisplit":  # numba and its compiled kernels: a fixed cost per process, not the model's
        before = _rss_now()
        from mpisplit import kernels

        kernels.warm_up(args.dtype)
        runtime_rss = _rss_now() - before
    mpi_rss = _warm_mpi(comm)
    gc.collect()
    base_now, base_peak = _rss_now(), _rss_peak()
    impl = build(name, ms, shape, comm, tp, args.dtype, threads)
    for _ in range(2 if args.smoke else 3):
        impl.step()
    peak = _rss_peak()
    per_rank = comm.allgather({"base_rss": base_now, "base_peak": base_peak, "peak": peak,
                               "delta": peak - max(base_now, base_peak), "kernels_rss": runtime_rss,
                               "mpi_rss": mpi_rss})
    impl.free()
    return {"impl": name, "preset": shape.name, "dp": dp, "tp": tp, "ranks": comm.Get_size(),
            "per_rank": per_rank,
            "analytic": analytic_memory(shape, tp, np.dtype(args.dtype).itemsize)}


def child_main(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if args.comm:
        part = child_comm(args, comm)
    elif args.memory:
        part = child_memory(args, comm)
    else:
        part = child_timing(args, comm)
    if comm.Get_rank() == 0:
        part["meta"] = common.result_meta(comm, common.threads_in_effect())
        common.write_json(args.part, part)


# ---- parent: launch, merge, report ------------------------------------------------------------


def _launch(args: argparse.Namespace, ranks: int, extra: list[str]) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "part.json"
        argv = [str(Path(__file__).resolve()), *args.passthrough, "--part", str(part), *extra]
        rc = common.run_under_mpi(ranks, argv, threads=args.threads, timeout=args.timeout)
        if rc != 0 or not part.exists():
            print(f"child with {ranks} rank(s) failed (exit {rc})", file=sys.stderr)
            return None
        return json.loads(part.read_text())


def report_timing(args: argparse.Namespace) -> int:
    rows, parts = [], []
    for ranks in args.ranks:
        print(f"{ranks} rank(s), {args.threads} thread(s) per rank ...", flush=True)
        part = _launch(args, ranks, [])
        if part is None:
            return 1
        parts.append(part)
        rows += part["rows"]
    for r in rows:
        ms_s, raw_s, t_s = r["mpisplit_s"], r["raw_s"], r["torch_s"]
        r["mpisplit_over_raw"] = ms_s / raw_s if ms_s and raw_s else None
        r["mpisplit_over_torch"] = ms_s / t_s if ms_s and t_s else None
        r["torch_over_raw"] = t_s / raw_s if t_s and raw_s else None
        # the same ratios from the fastest step of each (less sensitive to other load)
        ms_m, raw_m, t_m = r["mpisplit_min_s"], r["raw_min_s"], r["torch_min_s"]
        r["mpisplit_over_raw_min"] = ms_m / raw_m if ms_m and raw_m else None
        r["mpisplit_over_torch_min"] = ms_m / t_m if ms_m and t_m else None
        r["torch_over_raw_min"] = t_m / raw_m if t_m and raw_m else None
    path = args.out / "bench_gpt.json"
    if args.update and path.exists():
        # keep the earlier rows of the presets/layouts this run did not measure
        measured = {(r["preset"], r["ranks"], r["dp"], r["tp"]) for r in rows}
        rows += [r for r in json.loads(path.read_text())["rows"]
                 if (r["preset"], r["ranks"], r["dp"], r["tp"]) not in measured]
    order = {p: i for i, p in enumerate([*common.PRESETS, common.TINY.name])}
    rows.sort(key=lambda r: (order.get(r["preset"], 99), r["ranks"], -r["dp"]))
    table = [{
        "preset": r["preset"], "layout": r["layout"],
        "raw ms": r["raw_s"] * 1e3 if r["raw_s"] else None,
        "torch ms": r["torch_s"] * 1e3 if r["torch_s"] else None,
        "mpisplit ms": r["mpisplit_s"] * 1e3 if r["mpisplit_s"] else None,
        "raw MFU": r["raw_mfu"], "torch MFU": r["torch_mfu"], "mpisplit MFU": r["mpisplit_mfu"],
        "ms/raw": r["mpisplit_over_raw"], "ms/torch": r["mpisplit_over_torch"],
        "torch/raw": r["torch_over_raw"],
        "ms/raw best": r["mpisplit_over_raw_min"], "torch/raw best": r["torch_over_raw_min"],
    } for r in rows]
    print()
    print(common.format_table(table, list(table[0]) if table else ["preset"]))
    print("(ms = mpisplit; ratios of medians, 'best' = ratios of the fastest steps)")
    missing = parts[0]["mpisplit_missing"] if parts else ""
    if missing:
        print(f"\nmpisplit columns missing: {missing}")
    if parts and parts[0]["torch_missing"]:
        print("torch columns missing: torch is not importable")
    ceilings = {f"{p['rows'][0]['ranks']} rank(s)": p["rows"][0]["ceiling_gflops_per_rank"]
                for p in parts if p["rows"]}
    print(f"MFU ceiling ({args.dtype} matmul GFLOP/s per rank, max of this job's measurement "
          "and floors.json): " + ", ".join(f"{k}: {v:.1f}" for k, v in ceilings.items()))
    result = {"meta": common.result_meta(None, args.threads), "smoke": args.smoke,
              "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup,
              "mpisplit_missing": missing, "rows": rows,
              "children": [p.get("meta") for p in parts]}
    common.write_json(path, result)
    png = plot_timing(rows, args.out / "bench_gpt.png")
    print(f"wrote {path}" + (f" and {png}" if png else " (no matplotlib: no PNG)"))
    return 0


def plot_timing(rows: list[dict], path: Path) -> Path | None:
    plt = common.pyplot()
    if plt is None or not rows:
        return None
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"raw": "o-", "torch": "s--", "mpisplit": "^-."}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for li, lay in enumerate(layouts):
        for impl in IMPLS:
            pts = [(presets.index(r["preset"]), r[f"{impl}_s"], r[f"{impl}_mfu"])
                   for r in rows if r["layout"] == lay and r[f"{impl}_s"]]
            if not pts:
                continue
            x = [p[0] for p in pts]
            kw = {"color": colors[li % len(colors)], "label": f"{impl}, {lay}"}
            ax1.plot(x, [p[1] for p in pts], styles[impl], **kw)
            ax2.plot(x, [100 * p[2] for p in pts], styles[impl], **kw)
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(presets)), presets)
        ax.set_xlabel("preset (hidden size)")
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("training step time (s, median)")
    ax1.set_title("step time (lower is better)")
    ax2.set_ylabel("MFU (% of float32 matmul ceiling x ranks)")
    ax2.set_title("model FLOP utilisation")
    ax2.legend(fontsize=7, ncol=2)
    return common.save_figure(fig, path)


def report_comm(args: argparse.Namespace) -> int:
    part = _launch(args, args.np, ["--comm"])
    if part is None:
        return 1
    if "error" in part:
        print(part["error"])
        common.write_json(args.out / "bench_gpt_comm.json", part)
        return 2
    checks = part["checks"]
    shown = [{**c, "ratio": f"{c['ratio']:.2f}"} for c in checks]
    print(common.format_table(shown, ["preset", "dp", "tp", "comm", "kind", "what", "measured",
                                       "analytic", "ratio", "ok"]))
    ok = all(c["ok"] for c in checks)
    print("\nall collectives match the spec exactly" if ok else "\nMISMATCH with the spec")
    common.write_json(args.out / "bench_gpt_comm.json", {"ok": ok, **part})
    return 0 if ok else 1


def report_memory(args: argparse.Namespace) -> int:
    results = []
    names = [n for n in args.impls if n != "torch" or torch_available()]
    for preset in args.presets:
        shape = common.get_shape(preset)
        for ranks in args.ranks:
            for dp, tp in layouts_for(ranks):
                if shape.n_head % tp:
                    continue
                for name in names:
                    part = _launch(args, ranks, ["--memory", "--impl", name, "--layout",
                                                 f"{dp},{tp}", "--presets", preset])
                    if part is None:
                        return 1
                    if "error" in part:
                        print(f"{name}: {part['error']}")
                        continue
                    results.append(part)
    table = []
    for r in results:
        worst = max(r["per_rank"], key=lambda x: x["delta"])
        a = r["analytic"]
        table.append({"preset": r["preset"], "layout": layout_name(r["ranks"], r["dp"], r["tp"]),
                      "impl": r["impl"], "peak MiB": worst["peak"] / 2**20,
                      "model MiB": worst["delta"] / 2**20,
                      "analytic MiB": a["total"] / 2**20,
                      "p+g+adam MiB": (a["params"] + a["grads"] + a["adamw"]) / 2**20,
                      "acts MiB": a["activations"] / 2**20,
                      "model/analytic": worst["delta"] / a["total"],
                      "kernels MiB": worst.get("kernels_rss", 0) / 2**20,
                      "MPI MiB": worst.get("mpi_rss", 0) / 2**20})
    print(common.format_table(table, list(table[0]) if table else ["preset"]))
    print("\nmodel MiB = peak RSS minus the RSS before the model was built (worst rank); kernels MiB ="
          " what importing numba and loading the fused kernels added before that baseline; MPI MiB ="
          " what MPI's buffers added on first all-reduces of 4 KiB-4 MiB, also before it (every impl)")
    common.write_json(args.out / "bench_gpt_memory.json",
                      {"meta": common.result_meta(None, args.threads), "results": results,
                       "table": table})
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=None,
                    help="presets (default: all for timing, h256 for --comm, "
                         "h256 h1024 for --memory)")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2],
                    help="world sizes to run; each runs every dp x tp layout (default 1 2)")
    ap.add_argument("--np", type=int, default=2, help="ranks for --comm (default 2)")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS/OpenMP threads per rank (default 1: one core per rank)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--mem-budget-gb", type=float, default=6.0,
                    help="above this estimate (all ranks) implementations are timed one after "
                         "another instead of interleaved (default 6)")
    ap.add_argument("--timeout", type=float, default=1800.0,
                    help="seconds before an MPI job is killed (default 1800)")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    ap.add_argument("--update", action="store_true",
                    help="merge into an existing bench_gpt.json: replace only the rows measured "
                         "now (run the presets one at a time)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 step: seconds")
    ap.add_argument("--comm", action="store_true", help="collective counts vs the spec")
    ap.add_argument("--memory", action="store_true", help="peak RSS vs analytic bytes")
    # internal: set by the parent for its MPI children
    ap.add_argument("--part", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--layout", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.presets is None:
        args.presets = (["h256"] if args.comm else ["h256", "h1024"] if args.memory
                        else list(common.PRESETS))
    if args.smoke:
        args.presets, args.steps, args.warmup = [common.TINY.name], 1, 1
    for p in args.presets:
        common.get_shape(p)  # ValueError naming the preset before anything starts
    if args.part is not None:
        if not common.in_mpi_child():
            sys.exit("--part is internal: run the script without it")
        child_main(args)
        return
    # what the children get: every option except the parent-only ones
    args.passthrough = [
        *(["--presets", *args.presets] if not args.memory else []),
        "--impls", *args.impls, "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--dtype", args.dtype, "--mem-budget-gb", str(args.mem_budget_gb),
        *(["--smoke"] if args.smoke else []),
    ]
    if args.comm:
        sys.exit(report_comm(args))
    if args.memory:
        sys.exit(report_memory(args))
    sys.exit(report_timing(args))


if __name__ == "__main__":
    main()
