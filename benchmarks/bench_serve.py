"""Serving throughput and latency: `mpisplit serve` under 1, 4 and 16 concurrent clients.

    python benchmarks/bench_serve.py                      # tp 1 and 2, concurrency 1 4 16
    python benchmarks/bench_serve.py --tp 2 --concurrency 16 --requests 32
    python benchmarks/bench_serve.py --smoke              # seconds: checks that it runs
    python benchmarks/bench_serve.py --smoke --device gpu --no-peer   # the same, served from a GPU
    python benchmarks/bench_serve.py --max-batch 16 --concurrency 16 48 --requests 96 --repeats 3
                                                          # the queue: 3x --max-batch clients
    python benchmarks/bench_serve.py --gguf SmolLM2.gguf --max-model-len 256 --no-peer

For each tp a real server (`mpiexec -n tp python -m mpisplit.serve --hf FOLDER`) is started on
a small random GPT-2 (written to a temporary Hugging Face folder); clients stream greedy
completions of random token-id prompts through httpx. Reported per concurrency: generated
tokens/s over the whole run, time to first token and inter-token latency (p50, p99), and the
ratio of tokens/s to the smallest concurrency (concurrency 1: one request at a time). With
`--repeats R` the levels run R times in turn on the same server, so that load from other jobs
falls on all of them alike; every row is kept, the table shows each level's medians and the
median (and range) of its ratio to the smallest level of the same repeat. `--baseline-src DIR`
serves an older source tree beside this one, the two servers' levels in turn. `--gguf
FILE` serves a GGUF file instead (prompts of random ids below 1000). The clients run in this
process, the server in its own. The peer, when PyTorch and
transformers are installed: transformers' greedy `generate` on the same weights and prompts,
one request at a time, in one process with one thread.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import common

SHAPES = {  # name: (n_layer, n_embd, n_head, vocab, block)
    "small": (4, 128, 4, 512, 256),
    "smoke": (2, 32, 4, 64, 64),
}


def write_model(folder: Path, shape: str, seed: int = 0) -> None:
    from mpi4py import MPI

    import mpisplit as ms

    n_layer, n_embd, n_head, vocab, block = SHAPES[shape]
    grid = ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    cfg = ms.GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    model = ms.GPT(cfg, grid, dtype="float32", seed=seed)
    model.save_pretrained(folder)
    grid.free()


def start_server(folder: Path, tp: int, dtype: str, max_batch: int, timeout: float = 120,
                 device: str = "cpu", comm: str = "auto", extra: tuple[str, ...] = (),
                 source: str = "--hf", src: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`src`: serve the mpisplit package of that source tree instead of this one."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [common.mpiexec_path(), "-n", str(tp), sys.executable, "-m", "mpisplit.serve", source, str(folder),
           "--port", "0", "--dtype", dtype, "--max-batch", str(max_batch), "--max-queue", "1024",
           "--device", device, "--comm", comm, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        found = re.search(r"on (http://[\d.]+:\d+)", line)
        if found:
            return proc, found.group(1)
        if not line and proc.poll() is not None:
            break
    stop_server(proc)
    raise RuntimeError(f"server did not start: {' '.join(cmd)}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def one_request(client: Any, url: str, prompt: list[int], max_tokens: int) -> dict:
    """Stream one greedy completion; times of its first and every later token."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    stamps = []
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                n = len(json.loads(line[6:])["choices"][0]["token_ids"])
                stamps += [time.perf_counter()] * n
    if len(stamps) != max_tokens:
        raise RuntimeError(f"expected {max_tokens} tokens, got {len(stamps)}")
    return {"ttft": stamps[0] - start, "gaps": np.diff(stamps).tolist()}


def run_level(url: str, prompts: list[list[int]], max_tokens: int, concurrency: int) -> dict:
    """`concurrency` clients send the prompts, each starting the next when one ends."""
    import httpx

    clients: queue.Queue = queue.Queue()
    for _ in range(concurrency):  # made before the clock starts: a client costs tens of ms to make
        clients.put(httpx.Client(timeout=600))

    def send(prompt: list[int]) -> dict:
        client = clients.get()
        try:
            return one_request(client, url, prompt, max_tokens)
        finally:
            clients.put(client)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(send, prompts))
    wall = time.perf_counter() - start
    while not clients.empty():
        clients.get().close()
    gaps = np.concatenate([r["gaps"] for r in results]) * 1e3
    ttft = np.array([r["ttft"] for r in results]) * 1e3
    return {
        "concurrency": concurrency, "requests": len(prompts), "tokens": len(prompts) * max_tokens,
        "wall_s": wall, "tokens_per_s": len(prompts) * max_tokens / wall,
        "ttft_ms_p50": float(np.percentile(ttft, 50)), "ttft_ms_p99": float(np.percentile(ttft, 99)),
        "itl_ms_p50": float(np.percentile(gaps, 50)), "itl_ms_p99": float(np.percentile(gaps, 99)),
    }


def peer_transformers(folder: Path, prompts: list[list[int]], max_tokens: int) -> dict | None:
    """transformers' greedy generate, one request at a time; None without PyTorch/transformers."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.set_num_threads(1)
    model = transformers.GPT2LMHeadModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        start = time.perf_counter()
        for p in prompts:
            model.generate(torch.tensor([p]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                           do_sample=False, pad_token_id=0)
        wall = time.perf_counter() - start
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokens_per_s": len(prompts) * max_tokens / wall, "wall_s": wall}


def median_rows(rows: list[dict], lowest: int) -> list[dict]:
    """One row per (server, tp, concurrency): the median of each figure over its repeats, and
    the median over repeats of tokens/s against the lowest concurrency of the same repeat (runs
    next to each other in time, so a change in the machine's load falls on both)."""
    keys = sorted({(r["server"], r["tp"], r["concurrency"]) for r in rows})
    out = []
    for server, tp, c in keys:
        runs = [r for r in rows if (r["server"], r["tp"], r["concurrency"]) == (server, tp, c)]
        row = {k: (float(np.median([r[k] for r in runs])) if isinstance(v, float) else v)
               for k, v in runs[0].items() if k != "repeat"} | {"runs": len(runs)}
        ratios = [r["tokens_per_s"] / b["tokens_per_s"] for r in runs for b in rows
                  if (b["server"], b["tp"], b["concurrency"], b["repeat"]) == (server, tp, lowest, r["repeat"])]
        row["x_vs_lowest_concurrency"] = float(np.median(ratios))
        row["x_range"] = f"{min(ratios):.2f}-{max(ratios):.2f}"
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--shape", choices=list(SHAPES), default="small")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="the server's --device")
    p.add_argument("--comm", choices=["auto", "mpi", "staged", "nccl"], default="auto",
                   help="the server's --comm (GPU collective path)")
    p.add_argument("--max-batch", type=int, default=None, help="the server's --max-batch (default: the largest concurrency)")
    p.add_argument("--repeats", type=int, default=1, help="run the concurrency levels this many times, in turn")
    p.add_argument("--gguf", type=Path, default=None, help="serve this GGUF file instead of a random GPT-2")
    p.add_argument("--max-model-len", type=int, default=None, help="the server's --max-model-len (with --gguf)")
    p.add_argument("--baseline-src", type=Path, default=None,
                   help="also serve from this mpisplit source tree (e.g. `git worktree add DIR COMMIT`), "
                        "both servers up together and their levels run in turn")
    p.add_argument("--no-peer", action="store_true", help="skip the transformers peer")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--smoke", action="store_true", help="tiny model, few requests: checks that it runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.requests, args.max_tokens, args.prompt_len = "smoke", 4, 6, 5
        args.concurrency, args.tp = [c for c in args.concurrency if c <= 4] or [1], args.tp[:1]
    info = common.machine_info()
    print(f"CPU: {info['cpu']} ({info['cores']} cores), load {info['load_average_1_5_15min']}", flush=True)
    max_batch = args.max_batch or max(args.concurrency)
    extra = () if args.max_model_len is None else ("--max-model-len", str(args.max_model_len))
    rows, peer = [], None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bench"
        if args.gguf is None:
            write_model(folder, args.shape)
        vocab = SHAPES[args.shape][3] if args.gguf is None else 1000
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, vocab, size=args.prompt_len).tolist() for _ in range(args.requests)]
        sources = {"this": None} | ({} if args.baseline_src is None else {"baseline": args.baseline_src})
        for tp in args.tp:
            servers = {}
            try:
                for name, src in sources.items():
                    servers[name] = start_server(args.gguf or folder, tp, args.dtype, max_batch, device=args.device,
                                                 comm=args.comm, extra=extra, src=src,
                                                 source="--hf" if args.gguf is None else "--gguf")
                    run_level(servers[name][1], prompts[:2], args.max_tokens, 2)  # warm-up
                for repeat in range(args.repeats):
                    for name, (_, url) in servers.items():
                        for c in args.concurrency:
                            row = {"server": name, "tp": tp, "repeat": repeat,
                                   **run_level(url, prompts, args.max_tokens, c)}
                            rows.append(row)
                            print(json.dumps(row), flush=True)
            finally:
                for proc, _ in servers.values():
                    stop_server(proc)
        if not args.no_peer and args.gguf is None:
            peer = peer_transformers(folder, prompts, args.max_tokens)
    table = median_rows(rows, min(args.concurrency))
    for row in table:
        if peer is not None:
            row["x_vs_transformers"] = row["tokens_per_s"] / peer["tokens_per_s"]
    columns = ["server", "tp", "concurrency", "tokens_per_s", "x_vs_lowest_concurrency", "x_range", "ttft_ms_p50",
               "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99"]
    if peer is not None:
        columns.append("x_vs_transformers")
    print(f"server --max-batch {max_batch}; medians of {args.repeats} run(s) per level")
    print(common.format_table(table, columns))
    print("peer (transformers generate, one at a time):", "not installed" if peer is None else json.dumps(peer))
    if not args.smoke:
        common.write_json(args.out / "bench_serve.json", {"machine": info, "args": vars(args) | {"out": str(args.out)},
                                                          "rows": rows, "table": table, "peer": peer})
    return 0


if __name__ == "__main__":
    sys.exit(main())
