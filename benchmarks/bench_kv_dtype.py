"""The paged KV cache in float32 against float16 and bfloat16 (`mpisplit serve --kv-cache-dtype`).

SmolLM2-135M-Instruct (the Q4_1 file, weights kept in their blocks, float32 arithmetic), through
the server's forward (serving/batch.py forward_segments) and its paged cache, one thread:

  bytes      KV bytes per token of context (30 layers x 3 KV heads x 64 x keys and values)
  decode     tokens/s of greedy decoding, 64 new tokens after a 512-token context, 1 and 8
             sequences at once (the attention kernel reads every cached position each token)
  quality    a held-out text (this repository's README, 1024 tokens) read in chunks of 16:
             perplexity, and 200 tokens drawn greedily with the float32 cache, scored with each
             cache: the largest log-probability difference and the positions whose greedy choice
             differs

  python benchmarks/bench_kv_dtype.py [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks import common

BLOCK = 16
FORMATS = (None, "float16", "bfloat16")


def _cache(model, name: str | None, positions: int, sequences: int = 1):
    from mpisplit.serving.kv_format import kv_format
    from mpisplit.serving.kv_pool import PagedKV

    per = -(-positions // BLOCK)
    kv = PagedKV(model, per * sequences, BLOCK, kv_format(name, model.dtype))
    return kv, [tuple(range(s * per, (s + 1) * per)) for s in range(sequences)]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    return z - np.logaddexp.reduce(z, axis=-1, keepdims=True)


def scores(model, name: str | None, ids: np.ndarray, chunk: int = 16) -> np.ndarray:
    """log-softmax rows (len(ids), V) of ids read `chunk` tokens a pass through a cache of `name`."""
    from mpisplit.serving.batch import Segment, forward_segments

    kv, (blocks,) = _cache(model, name, len(ids))
    rows = []
    for lo in range(0, len(ids), chunk):
        part = ids[lo: lo + chunk]
        _, every = forward_segments(model, part, [Segment(blocks, lo, len(part))], kv, batch_invariant=False,
                                    every_row=[True])
        rows.append(_log_softmax(every[0]))
    return np.concatenate(rows)


def decode_rate(model, name: str | None, sequences: int, context: int = 512, new: int = 64) -> float:
    """Greedy tokens/s of `sequences` sequences decoding `new` tokens after `context` prompt tokens."""
    from mpisplit.serving.batch import Segment, forward_segments

    kv, tables = _cache(model, name, context + new, sequences)
    rng = np.random.default_rng(sequences)
    last = []
    for blocks in tables:  # the prompts, one at a time, in chunks of 256
        ids = rng.integers(0, model.config.vocab_size, context)
        for lo in range(0, context, 256):
            logits = forward_segments(model, ids[lo: lo + 256], [Segment(blocks, lo, len(ids[lo: lo + 256]))], kv,
                                      batch_invariant=False)
        last.append(int(logits[0].argmax()))
    start = time.perf_counter()
    for t in range(new):
        segs = [Segment(blocks, context + t, 1) for blocks in tables]
        last = [int(z.argmax()) for z in forward_segments(model, np.array(last), segs, kv, batch_invariant=False)]
    return sequences * new / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="BLAS and numba threads")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = p.parse_args()
    common.limit_threads(args.threads)
    import numba
    from mpi4py import MPI

    import mpisplit as ms
    from mpisplit import kernels
    from mpisplit.models.hf import load_tokenizer
    from mpisplit.serving.kv_pool import PagedKV

    numba.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from _smollm2 import smollm2_gguf

    path = smollm2_gguf()
    grid = ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    model = ms.GPT.from_pretrained(path, grid, dtype="float32", keep_quantized=True, max_model_len=2048)
    model.eval()
    kernels.warm_up(np.float32)
    tok = load_tokenizer(str(path), model.config.vocab_size)
    text = np.array(tok.encode((ROOT / "README.md").read_text())[:1024], dtype=np.int64)
    base = scores(model, None, text)
    drawn = list(text[:16])
    kv, (blocks,) = _cache(model, None, 216)
    from mpisplit.serving.batch import Segment, forward_segments

    logits = forward_segments(model, np.array(drawn), [Segment(blocks, 0, 16)], kv, batch_invariant=False)
    for t in range(200):
        drawn.append(int(logits[0].argmax()))
        logits = forward_segments(model, np.array(drawn[-1:]), [Segment(blocks, 16 + t, 1)], kv, batch_invariant=False)
    drawn_ids = np.array(drawn)
    ref = scores(model, None, drawn_ids)[15:-1]
    picked = drawn_ids[16:]
    rows = []
    for name in FORMATS:
        lp = base if name is None else scores(model, name, text)
        got = ref if name is None else scores(model, name, drawn_ids)[15:-1]
        rates = {s: max(decode_rate(model, name, s) for _ in range(2)) for s in (1, 8)}
        rows.append({
            "kv_dtype": name or "float32",
            "bytes_per_token": PagedKV.block_bytes(model, BLOCK, _cache(model, name, 1)[0].fmt) // BLOCK,
            "decode_1": rates[1], "decode_8": rates[8],
            "perplexity": float(np.exp(-lp[np.arange(len(text) - 1), text[1:]].mean())),
            "max_logprob_diff": float(np.abs(got[np.arange(200), picked] - ref[np.arange(200), picked]).max()),
            "greedy_differs": int((got.argmax(axis=1) != picked).sum()),
        })
    for row in rows:
        row["ppl_ratio"] = f"{row['perplexity'] / rows[0]['perplexity']:.7f}"
    print(common.format_table(rows, ["kv_dtype", "bytes_per_token", "decode_1", "decode_8", "perplexity", "ppl_ratio",
                                     "max_logprob_diff", "greedy_differs"]))
    info = common.machine_info()
    out = common.write_json(args.out / "bench_kv_dtype.json", {"machine": info, "threads": args.threads, "rows": rows})
    print(f"-> {out} ({info['cpu']})")
    grid.free()
    return 0


if __name__ == "__main__":
    sys.exit(main())
