"""Decoding under a burst of long prompts: the inter-token latency of running streams while
prompts of 2000 tokens arrive, with and without a per-step token budget.

    python benchmarks/bench_burst.py                  # writes results/bench_burst.json
    python benchmarks/bench_burst.py --smoke          # seconds: checks that it runs

A real server (`mpiexec -n 1 python -m mpisplit.serve --hf FOLDER`) on a random GPT-2 as wide
as SmolLM2-135M (hidden 576, 9 heads, vocabulary 49152; 4 layers, context 2304). Eight clients
stream greedy completions of 16-token prompts; once each has 20 tokens, eight requests with
2000-token prompts (one token each) arrive together. Reported per server setting: the p50 and
p99 gap between the streams' tokens while the burst is being read, and the same without a
burst; the budget setting is `--max-num-batched-tokens` (None: every prompt chunk every step).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import common
from benchmarks.bench_serve import start_server, stop_server

SHAPES = {"smollm-width": (4, 576, 9, 49152, 2304), "smoke": (2, 32, 4, 64, 320)}


def write_model(folder: Path, shape: str) -> None:
    from mpi4py import MPI

    import mpisplit as ms

    n_layer, n_embd, n_head, vocab, block = SHAPES[shape]
    grid = ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    cfg = ms.GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    ms.GPT(cfg, grid, dtype="float32", seed=0).save_pretrained(folder)
    grid.free()


def stream(url: str, prompt: list[int], max_tokens: int, stamps: list[float], started: threading.Event,
           done: threading.Event) -> None:
    """Stream a completion, stamping each token; stop reading (which cancels it) once `done`."""
    import httpx

    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=900) as client, client.stream("POST", url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
                if len(stamps) == 20:
                    started.set()
            if done.is_set():
                break


def run(url: str, vocab: int, streams: int, tokens: int, burst: int, burst_len: int) -> dict:
    import httpx

    rng = np.random.default_rng(0)
    stamps: list[list[float]] = [[] for _ in range(streams)]
    events = [threading.Event() for _ in range(streams)]
    done = threading.Event()  # with a burst: the streams run until it has been read, however long
    threads = [threading.Thread(target=stream, args=(url, rng.integers(0, vocab, 16).tolist(), tokens, s, e, done))
               for s, e in zip(stamps, events)]
    for t in threads:
        t.start()
    for e in events:
        e.wait(600)
    window = [time.perf_counter(), None]
    if burst:
        def long(i: int) -> None:
            body = {"prompt": rng.integers(0, vocab, burst_len).tolist(), "max_tokens": 1, "temperature": 0}
            httpx.post(url + "/v1/completions", json=body, timeout=900).raise_for_status()
        with concurrent.futures.ThreadPoolExecutor(burst) as pool:
            list(pool.map(long, range(burst)))
    window[1] = time.perf_counter()
    if burst:
        done.set()
    for t in threads:
        t.join()
    # With a burst: the gaps inside its window; without: every gap after a stream's 20th token (a
    # stream may be done before the last one reaches its 20th, so no common window)
    lo, hi = window
    gaps = np.concatenate([np.diff([x for x in s if lo <= x <= hi] if burst else s[19:]) for s in stamps])
    if gaps.size == 0:
        raise RuntimeError(f"no stream drew two tokens in the measured window ({hi - lo:.3f} s)")
    return {"gaps": len(gaps), "itl_ms_p50": float(np.percentile(gaps, 50) * 1e3),
            "itl_ms_p99": float(np.percentile(gaps, 99) * 1e3), "burst_s": window[1] - window[0] if burst else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--settings", nargs="+", default=["256:none", "256:272", "64:80", "32:48"],
                   help="PREFILL_CHUNK:BUDGET pairs (BUDGET none: no --max-num-batched-tokens)")
    p.add_argument("--tokens", type=int, default=400, help="tokens per stream")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "bench_burst.json")
    args = p.parse_args(argv)
    shape = "smoke" if args.smoke else "smollm-width"
    burst_len, tokens = (200, 60) if args.smoke else (2000, args.tokens)
    # With a burst the streams must outlast it whatever the machine's load: they ask for the
    # whole context and are cut when the burst has been read.
    burst_tokens = SHAPES[shape][4] - 16
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    print(f"CPU: {model}; load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        write_model(folder, shape)
        for setting in args.settings:
            chunk, budget = setting.split(":")
            extra = ("--prefill-chunk", chunk) + (() if budget == "none" else ("--max-num-batched-tokens", budget))
            proc, url = start_server(folder, 1, "float32", 16, extra=extra)
            try:
                for burst in (0, 8):
                    row = {"prefill_chunk": int(chunk), "budget": None if budget == "none" else int(budget),
                           "burst": burst, "load": os.getloadavg()[0],
                           **run(url, SHAPES[shape][3], 8, burst_tokens if burst else tokens, burst, burst_len)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            finally:
                stop_server(proc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
