"""`mpisplit serve --gguf` against llama.cpp's `llama-server` on the same GGUF file and cores.

    python benchmarks/bench_vs_llamacpp.py --llama-server PATH [--gguf FILE] [--tokens 128]

Both servers answer OpenAI /v1/completions with greedy text; each configuration runs alone:
llama.cpp with -t 1 and -t 2 (-np 16 slots); mpisplit at tp 1 with one and two threads
(MPISPLIT_BLAS_THREADS) and at tp 3 (--tp-ranks: SmolLM2's 9 heads split in three, one thread a
rank, sharing the two-thread row's cores). Per configuration:

  decode tokens/s, one stream  (N - 1) / (time of an N-token answer - time of a 1-token answer)
  16 streams, tokens/s         16 concurrent N-token answers: their tokens / wall time
  time to first token          a 1-token answer to a short prompt (~20 tokens), median of 5
  prompt tokens/s              a 1-token answer to a ~400-token prompt: prompt tokens / time
  resident memory              VmRSS summed over the server's processes, after the runs

Every answer runs to N tokens (`ignore_eos`, which both servers take). The model: the cached
SmolLM2-135M-Instruct Q4_1 file (tests/_smollm2.py) unless --gguf. llama.cpp is built from the
`llama-cpp-python` source distribution (benchmarks/README.md, "llama.cpp"); nothing is downloaded
here. Writes results/bench_vs_llamacpp.json and prints the table with the CPU model.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks import common
from benchmarks.bench_serve import stop_server

SHORT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
LONG = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 30)


_SENT = iter(range(1 << 30))


def _post(url: str, prompt: str, tokens: int) -> tuple[float, int]:
    """(seconds, completion tokens) of one greedy answer; the prompt starts with a number of its
    own, so that neither server answers from its cache of earlier prompts."""
    import httpx

    body = {"model": "m", "prompt": f"{next(_SENT)} {prompt}", "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - start, int(r.json()["usage"]["completion_tokens"])


def _prompt_tokens(url: str, prompt: str) -> int:
    import httpx

    r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": f"{next(_SENT)} {prompt}", "max_tokens": 1},
                   timeout=600)
    r.raise_for_status()
    return int(r.json()["usage"]["prompt_tokens"])


def _rss_mib(root: int) -> float:
    """VmRSS of a process and all its descendants (mpiexec's launcher and the ranks), in MiB."""
    parent = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, total = {root}, 0
    for _ in range(8):  # depth: mpiexec, its proxy, the ranks
        tree |= {pid for pid, up in parent.items() if up in tree}
    for pid in tree:
        try:
            total += sum(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                         if line.startswith("VmRSS:"))
        except OSError:
            continue
    return total / 1024


def measure(url: str, tokens: int, streams: int) -> dict:
    _post(url, SHORT, 8)  # warm-up
    first = statistics.median(_post(url, SHORT, 1)[0] for _ in range(5))
    whole, got = min((_post(url, SHORT, tokens) for _ in range(3)), key=lambda r: r[0])
    if got != tokens:
        raise RuntimeError(f"asked for {tokens} tokens, got {got}")
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        done = list(pool.map(lambda _: _post(url, SHORT, tokens)[1], range(streams)))
    many = sum(done) / (time.perf_counter() - start)
    n_long = _prompt_tokens(url, LONG)
    long_s = min(_post(url, LONG, 1)[0] for _ in range(3))
    return {"decode_tok_s": (tokens - 1) / (whole - first), "streams_tok_s": many, "ttft_ms": first * 1e3,
            "prompt_tok_s": n_long / long_s, "prompt_tokens": n_long}


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


def start(kind: str, gguf: Path, threads: int, llama_server: Path, max_len: int,
          tp_ranks: int) -> tuple[subprocess.Popen, str]:
    port = common.free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    if kind == "llama.cpp":
        cmd = [str(llama_server), "-m", str(gguf), "-t", str(threads), "-np", "16", "-c", str(16 * max_len),
               "--host", "127.0.0.1", "--port", str(port)]
    else:
        ranks = tp_ranks if kind == "mpisplit tp" else 1
        if kind == "mpisplit threads":
            env["MPISPLIT_BLAS_THREADS"] = str(threads)
        cmd = [common.mpiexec_path(), "-n", str(ranks), sys.executable, "-m", "mpisplit.serve", "--gguf", str(gguf),
               "--max-model-len", str(max_len), "--max-batch", "16", "--port", str(port), "--model-name", "m"]
    log = Path(tempfile.gettempdir()) / f"bench_vs_llamacpp.{port}.log"
    with log.open("w") as out:  # the server writes to its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url)
    except RuntimeError as exc:
        stop_server(proc)
        raise RuntimeError(f"{exc}: {' '.join(cmd)}\n{log.read_text()[-3000:]}") from None
    return proc, url


CONFIGS = [("llama.cpp", 1), ("mpisplit threads", 1), ("llama.cpp", 2), ("mpisplit threads", 2), ("mpisplit tp", 2)]
TP_RANKS = 3  # "mpisplit tp" by default: SmolLM2's 9 heads split over 3 ranks, one thread each


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-server", type=Path, required=True, help="llama.cpp's llama-server binary")
    p.add_argument("--gguf", type=Path, default=None, help="the model (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per answer")
    p.add_argument("--streams", type=int, default=16, help="concurrent answers in the streams row")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--tp-ranks", type=int, default=TP_RANKS, help="ranks of the 'mpisplit tp' row (they share the "
                   "row's cores)")
    p.add_argument("--only", choices=sorted({k for k, _ in CONFIGS}), nargs="+", default=None)
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = p.parse_args(argv)
    if args.gguf is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from _smollm2 import smollm2_gguf

        args.gguf = smollm2_gguf()
    info = common.machine_info()
    print(f"CPU: {info['cpu']} ({info['cores']} cores), load {info['load_average_1_5_15min']}", flush=True)
    rows = []
    for kind, threads in CONFIGS:
        if args.only and kind not in args.only:
            continue
        proc, url = start(kind, args.gguf, threads, args.llama_server, args.max_model_len, args.tp_ranks)
        try:
            row = {"server": kind, "threads": threads, **measure(url, args.tokens, args.streams),
                   "rss_mib": _rss_mib(proc.pid)}
        finally:
            stop_server(proc)
        rows.append(row)
        print(row, flush=True)
    peer = {r["threads"]: r for r in rows if r["server"] == "llama.cpp"}
    for r in rows:
        ref = peer.get(r["threads"])
        if ref is not None and r is not ref:
            r["x_decode"] = r["decode_tok_s"] / ref["decode_tok_s"]
            r["x_streams"] = r["streams_tok_s"] / ref["streams_tok_s"]
            r["x_ttft"] = r["ttft_ms"] / ref["ttft_ms"]
            r["x_rss"] = r["rss_mib"] / ref["rss_mib"]
    print(common.format_table(rows, ["server", "threads", "decode_tok_s", "streams_tok_s", "ttft_ms", "prompt_tok_s",
                                     "rss_mib", "x_decode", "x_streams", "x_ttft", "x_rss"]))
    out = common.write_json(args.out / "bench_vs_llamacpp.json",
                            {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    print(f"-> {out} ({info['cpu']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
