"""Decoding a Llama-3-8B-shaped model kept in Q4_0 blocks at tp 1 and 2, against llama.cpp on the
same file, and a model of tensor-parallel decode over 2-8 nodes.

The file: Llama-3-8B's shapes (32 layers, hidden 4096, 32 query and 8 key/value heads of 128, MLP
14336, vocabulary 128256, untied head) with random Q4_0 blocks (fp16 scales of a weight's size,
random nibbles), written once with the `gguf` package (4.3 GiB; it fits this 24 GB machine only
quantized: float32 would take 32 GB). Random weights decode as fast as trained ones: every token
reads every block once.

  measured   mpisplit (weights kept in blocks, float32 activations, the server's forward and
             paged cache) at tp 1 (one rank, one thread) and tp 2 (two ranks, one thread each):
             load seconds, resident memory per rank, decode tokens/s (greedy, after a 16-token
             prompt); llama.cpp's llama-bench (tg) at -t 1 and -t 2 when --llama-bench is given
  model      per token at tp p: every rank reads 1/p of the blocks (t1 / p, t1 measured at tp 1)
             and the ranks meet in 2 all-reduces a layer of the hidden state (4096 float32) and
             one all-gather of the logits (128256 float32), each a ring: 2 (p - 1) alpha +
             2 (p - 1) / p * bytes / bandwidth (all-gather: half of that), for 1 and 10 Gbit/s
             links (alpha 50 and 20 us: MPI over TCP)

  python benchmarks/bench_tp_decode.py [--gguf PATH] [--llama-bench PATH] [--tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks import common

SHAPE = {"layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 8, "inter": 14336, "vocab": 128256, "ctx": 8192}
DEFAULT = Path(os.environ.get("MPISPLIT_CACHE", Path.home() / ".cache" / "mpisplit")) / "llama3-8b-shape.Q4_0.gguf"
LINKS = {"1 Gbit/s": (50e-6, 1e9 / 8), "10 Gbit/s": (20e-6, 10e9 / 8)}


def _tensors() -> list[tuple[str, tuple[int, int] | tuple[int]]]:
    h, kv, inter, V = SHAPE["hidden"], SHAPE["kv_heads"] * 128, SHAPE["inter"], SHAPE["vocab"]
    out: list = [("token_embd.weight", (V, h))]
    for i in range(SHAPE["layers"]):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (h,)), (b + "attn_q.weight", (h, h)), (b + "attn_k.weight", (kv, h)),
                (b + "attn_v.weight", (kv, h)), (b + "attn_output.weight", (h, h)), (b + "ffn_norm.weight", (h,)),
                (b + "ffn_gate.weight", (inter, h)), (b + "ffn_up.weight", (inter, h)), (b + "ffn_down.weight", (h, inter))]
    return out + [("output_norm.weight", (h,)), ("output.weight", (V, h))]


def write_file(path: Path) -> None:
    """The random Q4_0 file, one tensor at a time (never all of it in memory)."""
    import gguf

    sys.path.insert(0, str(ROOT / "tests"))
    from _gguf_files import CONTROL, add_shape, gpt2_vocab

    tokens, types, merges = gpt2_vocab()
    tokens = tokens + [f"tok{i}" for i in range(SHAPE["vocab"] - len(tokens))]
    types = types + [1] * (SHAPE["vocab"] - len(types))
    w = gguf.GGUFWriter(str(path), arch="llama")
    add_shape(w, {**SHAPE, "eps": 1e-5, "theta": 500000.0})
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_merges(merges)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(len(CONTROL) - 1)
    q4 = gguf.GGMLQuantizationType.Q4_0
    for name, shape in _tensors():
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            w.add_tensor_info(name, (shape[0], shape[1] // 32 * 18), np.dtype(np.uint8), shape[0] * shape[1] // 32 * 18,
                              raw_dtype=q4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shape in _tensors():
        if len(shape) == 1:
            w.write_tensor_data((1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            continue
        blocks = rng.integers(0, 256, (shape[0], shape[1] // 32, 18), dtype=np.uint8)
        scale = rng.uniform(2e-3, 2e-2, (shape[0], shape[1] // 32)).astype(np.float16)
        blocks[:, :, :2] = scale.view(np.uint8).reshape(shape[0], -1, 2)
        w.write_tensor_data(blocks.reshape(shape[0], -1))
    w.close()


def child(args: argparse.Namespace) -> None:
    """Under mpiexec: load at tp = the world size and decode; rank 0 writes one JSON line."""
    from mpi4py import MPI

    import mpisplit as ms
    from mpisplit import kernels
    from mpisplit.runtime.backend import limit_blas_threads
    from mpisplit.serving.batch import Segment, forward_segments
    from mpisplit.serving.kv_pool import PagedKV

    comm = MPI.COMM_WORLD
    limit_blas_threads(comm)
    start = time.perf_counter()
    grid = ms.ProcessGrid(tp=comm.Get_size())
    model = ms.GPT.from_pretrained(args.gguf, grid, dtype="float32", keep_quantized=True, max_model_len=256)
    model.eval()
    kernels.warm_up(np.float32)
    comm.Barrier()
    load_s = time.perf_counter() - start
    kv = PagedKV(model, 16, 16)
    blocks = tuple(range(16))
    ids = np.arange(16) * 977 % SHAPE["vocab"]
    last = int(forward_segments(model, ids, [Segment(blocks, 0, 16)], kv, batch_invariant=False)[0].argmax())
    times = []
    for t in range(args.tokens):
        comm.Barrier()
        t0 = time.perf_counter()
        last = int(forward_segments(model, np.array([last]), [Segment(blocks, 16 + t, 1)], kv,
                                    batch_invariant=False)[0].argmax())
        times.append(time.perf_counter() - t0)
    rss = comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, root=0)
    if comm.rank == 0:
        row = {"tp": comm.Get_size(), "load_s": load_s, "token_ms": 1e3 * float(np.median(times[1:])),
               "tokens_per_s": 1.0 / float(np.median(times[1:])), "max_rss_mib_per_rank": max(rss),
               "kept_mib": model.quantized_report["bytes"] / 2**20}
        with open(args.row, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    grid.free()


def llama_bench(binary: str, path: Path, threads: int, tokens: int) -> float:
    out = subprocess.run([binary, "-m", str(path), "-p", "0", "-n", str(tokens), "-t", str(threads), "-o", "json"],
                         capture_output=True, text=True, timeout=1200, check=True)
    return float(json.loads(out.stdout)[0]["avg_ts"])


def model_rows(t1: float) -> list[dict]:
    """Modelled ms per token at tp p over links of the given latency and bandwidth."""
    h, V, L = SHAPE["hidden"], SHAPE["vocab"], SHAPE["layers"]
    rows = []
    for link, (alpha, bw) in LINKS.items():
        for p in (1, 2, 4, 8):
            reduce = 2 * L * (2 * (p - 1) * alpha + 2 * (p - 1) / p * h * 4 / bw)
            gather = (p - 1) * alpha + (p - 1) / p * V * 4 / bw
            ms_token = 1e3 * (t1 / p + (reduce + gather if p > 1 else 0.0))
            rows.append({"link": link, "p": p, "compute_ms": 1e3 * t1 / p, "comm_ms": 1e3 * (reduce + gather) if p > 1 else 0.0,
                         "token_ms": ms_token, "tokens_per_s": 1e3 / ms_token,
                         "bytes_per_rank_per_token": int((2 * L * 2 * (p - 1) / p * h + (p - 1) / p * V) * 4)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, default=DEFAULT, help="the file (written first when missing)")
    p.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench binary, for its rate on the file")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    if not args.gguf.is_file():
        print(f"writing {args.gguf} ...", flush=True)
        args.gguf.parent.mkdir(parents=True, exist_ok=True)
        write_file(args.gguf)
    rows_file = args.out / "bench_tp_decode.rows"
    args.out.mkdir(parents=True, exist_ok=True)
    rows_file.unlink(missing_ok=True)
    for tp in (1, 2):
        code = common.run_under_mpi(tp, [__file__, "--child", "--gguf", str(args.gguf), "--tokens", str(args.tokens),
                                         "--row", str(rows_file)], threads=1, timeout=1800)
        if code:
            raise SystemExit(f"tp {tp} failed ({code})")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    rows_file.unlink()
    peer = {t: llama_bench(args.llama_bench, args.gguf, t, args.tokens) for t in (1, 2)} if args.llama_bench else {}
    for row in rows:
        row["llama_cpp_tokens_per_s"] = peer.get(row["tp"])
    print(common.format_table(rows, ["tp", "load_s", "token_ms", "tokens_per_s", "llama_cpp_tokens_per_s",
                                     "max_rss_mib_per_rank", "kept_mib"]))
    model = model_rows(rows[0]["token_ms"] / 1e3)
    print(common.format_table(model, ["link", "p", "compute_ms", "comm_ms", "token_ms", "tokens_per_s",
                                      "bytes_per_rank_per_token"]))
    info = common.machine_info()
    out = common.write_json(args.out / "bench_tp_decode.json",
                            {"machine": info, "file_bytes": args.gguf.stat().st_size, "measured": rows, "model": model})
    print(f"-> {out} ({info['cpu']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
