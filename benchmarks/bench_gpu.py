"""GPU benchmark: mpisplit training steps on one GPU against cuBLAS and PyTorch; device-buffer
collectives between two ranks.

--part compute (one process): the measured cuBLAS float16 matmul ceiling (CuPy, n = 4096 and
8192, best of 10 CUDA-event-timed products); for hidden 1024 and 2048 at tp=1: one mpisplit
training step with float16 mixed precision (forward, backward, unscale + overflow check,
clip, AdamW on float32 masters, copy back, one host read of the loss), the same step of a
PyTorch eager GPT of the same architecture (torch.autocast float16, GradScaler, fused AdamW,
clip_grad_norm_), their times (median of --reps after --warmup, the device synchronised after
each step), model FLOP/s (benchmarks/common.train_flops: 3 x forward matmul FLOPs), MFU
against the measured ceiling, and mpisplit / PyTorch. Also the float32 step of both at h1024.

--part comm (2 ranks): in-place all-reduce of float32 device arrays, 4 KiB to 64 MiB, on
every device path available (staged always; CUDA-aware MPI when reported; NCCL when the ranks
have GPUs of their own) and of host arrays for reference: time per call (max over ranks,
median), algorithmic bandwidth bytes/t and bus bandwidth 2 (p-1)/p x algbw.

--part nccl-probe (2 ranks): whether NCCL accepts this job's ranks (it refuses two ranks on one
GPU); prints what it said.

  python benchmarks/bench_gpu.py --part compute --out /tmp/bench_gpu.json
  mpiexec -n 2 python benchmarks/bench_gpu.py --part comm --out /tmp/bench_gpu_comm.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.common import ModelShape

# GPU-sized shapes: batch x sequence = 8192 (h1024) and 4096 (h2048) tokens per step.
SHAPES = {
    "h1024": ModelShape("h1024", vocab_size=8192, block_size=512, n_layer=4, n_head=16, n_embd=1024,
                        batch=16, seq=512),
    "h2048": ModelShape("h2048", vocab_size=8192, block_size=512, n_layer=4, n_head=16, n_embd=2048,
                        batch=8, seq=512),
}
LR, BETAS, WD, CLIP = 3e-4, (0.9, 0.95), 0.1, 1.0


def _batch(shape: ModelShape, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    toks = np.random.default_rng(seed).integers(0, shape.vocab_size, size=(shape.batch, shape.seq + 1))
    return np.ascontiguousarray(toks[:, :-1]), np.ascontiguousarray(toks[:, 1:])


def _time(step: Any, sync: Any, warmup: int, reps: int) -> dict[str, float]:
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": reps}


# ---- compute -----------------------------------------------------------------------------------


def matmul_ceiling(cp: Any, sizes: tuple[int, ...] = (4096, 8192), reps: int = 10) -> dict[str, Any]:
    """Best float16 (n, n) @ (n, n) TFLOP/s through CuPy (cuBLAS, float32 accumulation)."""
    rows = []
    for n in sizes:
        a = cp.random.standard_normal((n, n), dtype=cp.float32).astype(cp.float16)
        b = cp.random.standard_normal((n, n), dtype=cp.float32).astype(cp.float16)
        c = cp.empty((n, n), dtype=cp.float16)
        for _ in range(3):
            cp.matmul(a, b, out=c)
        best = math.inf
        for _ in range(3):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            for _ in range(reps):
                cp.matmul(a, b, out=c)
            end.record()
            end.synchronize()
            best = min(best, cp.cuda.get_elapsed_time(start, end) / 1e3 / reps)
        rows.append({"n": n, "tflops": 2 * n**3 / best / 1e12, "seconds": best})
        del a, b, c
    cp.get_default_memory_pool().free_all_blocks()
    return {"rows": rows, "tflops": max(r["tflops"] for r in rows)}


def mpisplit_step(shape: ModelShape, amp: str | None) -> tuple[Any, Any]:
    """(step function, cleanup) for an mpisplit GPT at tp=1 on this GPU."""
    import cupy as cp
    from mpi4py import MPI

    import mpisplit as ms
    from mpisplit.parallel.gpu import use_gpu
    from mpisplit.training.amp import MixedPrecision

    grid = ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    use_gpu(grid)
    cfg = ms.GPTConfig(**shape.gpt_config_kwargs())
    master = ms.GPT(cfg, grid, seed=0, device="gpu")
    net, mp = master, None
    if amp is not None:
        net = ms.GPT(cfg, grid, init=False, device="gpu")
        mp = MixedPrecision(net, master, amp, grid.world)
    opt = ms.optim.AdamW(master.parameters(), lr=LR, betas=BETAS, weight_decay=WD)
    x, y = _batch(shape)

    def step() -> float:
        loss = net.loss(x, y)
        if mp is None:
            loss.backward()
            ms.optim.clip_grad_norm(master.parameters(), CLIP, grid.tp_comm)
            opt.step()
            opt.zero_grad()
        else:
            mp.backward(loss)
            mp.step(opt, tp_comm=grid.tp_comm, max_norm=CLIP)
        return float(ms.to_numpy(loss.data))

    def cleanup() -> None:
        nonlocal master, net, mp, opt
        del master, net, mp, opt
        grid.free()
        cp.get_default_memory_pool().free_all_blocks()

    return step, cleanup


def torch_step(shape: ModelShape, amp: str | None) -> tuple[Any, Any]:
    """(step function, cleanup) for the same GPT in PyTorch eager on this GPU."""
    import torch
    import torch.nn.functional as F

    dev = torch.device("cuda", torch.cuda.current_device())
    h, V, H = shape.n_embd, shape.vocab_size, shape.n_head

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.ln_2 = torch.nn.LayerNorm(h), torch.nn.LayerNorm(h)
            self.c_attn, self.attn_proj = torch.nn.Linear(h, 3 * h), torch.nn.Linear(h, h)
            self.c_fc, self.mlp_proj = torch.nn.Linear(h, 4 * h), torch.nn.Linear(4 * h, h)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, T, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).view(B, T, 3, H, h // H).unbind(2)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, h))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = torch.nn.Embedding(V, h)
            self.wpe = torch.nn.Embedding(shape.block_size, h)
            self.h = torch.nn.ModuleList(Block() for _ in range(shape.n_layer))
            self.ln_f = torch.nn.LayerNorm(h)
            for p in self.parameters():
                if p.dim() == 2:
                    torch.nn.init.normal_(p, std=0.02)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            x = self.wte(idx) + self.wpe.weight[: idx.shape[1]]
            for block in self.h:
                x = block(x)
            return self.ln_f(x) @ self.wte.weight.t()  # tied head

    model = GPT().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=amp is not None)
    x, y = (torch.from_numpy(a).to(dev) for a in _batch(shape))
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, None: torch.float32}[amp]

    def step() -> float:
        with torch.autocast("cuda", dtype=dtype, enabled=amp is not None):
            loss = F.cross_entropy(model(x).view(-1, V).float(), y.view(-1))
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def cleanup() -> None:
        nonlocal model, opt
        del model, opt
        torch.cuda.empty_cache()

    return step, cleanup


def part_compute(args: argparse.Namespace) -> dict[str, Any]:
    import cupy as cp

    out: dict[str, Any] = {"meta": common.result_meta(None, None)}
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    out["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    out["cupy"] = cp.__version__
    ceiling = matmul_ceiling(cp)
    out["matmul_ceiling_fp16"] = ceiling
    print(f"cuBLAS float16 matmul ceiling: {ceiling['tflops']:.1f} TFLOP/s {ceiling['rows']}", flush=True)
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError as exc:
        torch = None
        out["torch"] = f"unavailable: {exc}"
    cp_sync = cp.cuda.Device().synchronize
    rows = []
    plan = [(s, "float16") for s in args.shapes] + [(args.shapes[0], None)]
    for name, amp in plan:
        shape = SHAPES[name]
        row: dict[str, Any] = {
            "shape": name, "precision": amp or "float32", "tokens": shape.batch * shape.seq,
            "params": shape.n_params(), "train_flops": common.train_flops(shape),
        }
        for impl, make, sync in (
            ("mpisplit", mpisplit_step, cp_sync),
            ("torch", torch_step, (lambda: torch.cuda.synchronize()) if torch is not None else None),
        ):
            if sync is None:
                row[impl] = {"error": "PyTorch not installed"}
                continue
            try:
                step, cleanup = make(shape, amp)
                try:
                    t = _time(step, sync, args.warmup, args.reps)
                    t["loss"] = step()
                finally:
                    cleanup()
                t["tflops"] = row["train_flops"] / t["median_s"] / 1e12
                t["mfu"] = t["tflops"] / ceiling["tflops"]
                row[impl] = t
            except Exception as exc:  # noqa: BLE001 - reported; the other implementations still run
                row[impl] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        if "median_s" in row["mpisplit"] and "median_s" in row.get("torch", {}):
            row["mpisplit_over_torch"] = row["mpisplit"]["median_s"] / row["torch"]["median_s"]
        rows.append(row)
        _print_row(row)
    out["steps"] = rows
    return out


def _print_row(row: dict[str, Any]) -> None:
    parts = [f"{row['shape']} {row['precision']}: {row['tokens']} tokens, {row['train_flops'] / 1e12:.2f} TFLOP/step"]
    for impl in ("mpisplit", "torch"):
        r = row.get(impl, {})
        if "median_s" in r:
            parts.append(f"{impl} {r['median_s'] * 1e3:.1f} ms ({r['tflops']:.1f} TFLOP/s, MFU {r['mfu']:.1%})")
        else:
            parts.append(f"{impl} failed: {r.get('error')}")
    if "mpisplit_over_torch" in row:
        parts.append(f"mpisplit/torch {row['mpisplit_over_torch']:.2f}")
    print("; ".join(parts), flush=True)


# ---- collectives ---------------------------------------------------------------------------------


def part_comm(args: argparse.Namespace) -> dict[str, Any] | None:
    import cupy as cp
    from mpi4py import MPI

    from mpisplit.parallel.comm import Communicator
    from mpisplit.parallel.gpu import use_gpu
    from mpisplit.runtime.device import mpi_cuda_support

    world = MPI.COMM_WORLD
    probe = Communicator(world)
    binding = use_gpu(probe, comm="auto")
    paths = ["staged"] + (["mpi"] if binding.cuda_aware else []) + (["nccl"] if "nccl" in binding.paths.values() else [])
    probe.free()
    p = world.Get_size()
    sizes = [2**k for k in range(12, 27, 2)]  # 4 KiB .. 64 MiB
    results: dict[str, Any] = {
        "meta": common.result_meta(world, None), "binding": binding.summary(),
        "cuda_aware": mpi_cuda_support(), "ranks": p, "paths": {},
    }
    for name in ["host"] + paths:
        comm = Communicator(world)
        if name != "host":
            use_gpu(comm, comm=name)
        rows = []
        for nbytes in sizes:
            n = nbytes // 4
            x = np.ones(n, dtype=np.float32) if name == "host" else cp.ones(n, dtype=cp.float32)
            reps = max(3, min(50, (64 << 20) // nbytes))

            def call(x: Any = x, comm: Any = comm, device: bool = name != "host") -> None:
                comm.allreduce_(x)
                if device:
                    cp.cuda.get_current_stream().synchronize()

            for _ in range(2):
                call()
            times = []
            for _ in range(reps):
                world.Barrier()
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            t = statistics.median(max(ts) for ts in zip(*world.allgather(times)))
            algbw = nbytes / t
            rows.append({"bytes": nbytes, "seconds": t, "algbw_GBps": algbw / 1e9, "busbw_GBps": algbw * 2 * (p - 1) / p / 1e9})
        comm.free()
        results["paths"][name] = rows
        if world.Get_rank() == 0:
            best = max(rows, key=lambda r: r["busbw_GBps"])
            print(f"{name}: allreduce of {sizes[0]} B {rows[0]['seconds'] * 1e6:.0f} us; "
                  f"best bus bandwidth {best['busbw_GBps']:.2f} GB/s at {best['bytes'] >> 20} MiB", flush=True)
    return results if world.Get_rank() == 0 else None


def part_nccl_probe(args: argparse.Namespace) -> dict[str, Any] | None:
    import cupy as cp
    from mpi4py import MPI

    from mpisplit.parallel.comm import Communicator
    from mpisplit.parallel.device_paths import NcclPath
    from mpisplit.parallel.gpu import use_gpu

    world = MPI.COMM_WORLD
    c = Communicator(world)
    report: dict[str, Any] = {}
    try:
        use_gpu(c, comm="nccl")
        report["use_gpu_nccl"] = "accepted"
    except ValueError as exc:
        report["use_gpu_nccl"] = f"refused: {exc}"
    # Ask NCCL itself, past mpisplit's check (a shared GPU is what it is expected to refuse).
    try:
        path = NcclPath(c)
        x = cp.full(4, float(c.rank + 1), dtype=cp.float32)
        path.allreduce(c, x, x, "sum")
        expected = c.size * (c.size + 1) / 2
        report["nccl_direct"] = f"accepted; allreduce gave {x.get().tolist()} (expected {expected} each)"
        path.close()
    except Exception as exc:  # noqa: BLE001 - whatever NCCL says is the finding
        report["nccl_direct"] = f"{type(exc).__name__}: {exc}"
    everyone = world.allgather(report)
    c.free()
    if world.Get_rank() == 0:
        for r, rep in enumerate(everyone):
            print(f"rank {r}: {rep}", flush=True)
        return {"ranks": everyone}
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["compute", "comm", "nccl-probe"], default="compute")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["h1024", "h2048"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write (rank 0)")
    args = ap.parse_args()
    part = {"compute": part_compute, "comm": part_comm, "nccl-probe": part_nccl_probe}[args.part]
    result = part(args)
    if result is not None and args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
