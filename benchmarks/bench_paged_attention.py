"""The paged attention kernel against the attention it replaced, on SmolLM2-135M's heads.

    python benchmarks/bench_paged_attention.py            # decode and prefill cases, float32

Per case, one layer's attention for S sequences of context L, T new rows each (T = 1:
decoding; T = 256: a prompt chunk), 9 query heads over 3 key/value heads of 64: the kernel
reading the blocks of the pool (kernels/paged_attention.py, each row by itself in a fixed
order) against the model's attention on each sequence's keys and values already gathered into
contiguous arrays (one BLAS product per sequence and head group, the previous slot cache's
path; the gathering not counted). Best of 15 runs each, interleaved, in one process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import common
from mpisplit.kernels.paged_attention import paged_attention
from mpisplit.nn.gqa import grouped_decode

H, KV, D, BS = 9, 3, 64, 16
CASES = [(16, 200, 1), (16, 600, 1), (64, 200, 1), (1, 256, 256), (1, 512, 256)]


def case(S: int, L: int, T: int, dtype: type, reps: int = 15) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    nb = -(-L // BS)
    vp = rng.standard_normal((S * nb, KV, BS, D)).astype(dtype)
    kp = np.ascontiguousarray(rng.standard_normal((S * nb, KV, BS, D)).astype(dtype).transpose(0, 1, 3, 2))
    tables = np.arange(S * nb).reshape(S, nb)
    q = rng.standard_normal((S * T, H, D)).astype(dtype)
    starts, counts = np.full(S, L - T), np.full(S, T)
    ks = [np.ascontiguousarray(kp[tables[s]].transpose(1, 0, 3, 2).reshape(1, KV, nb * BS, D)[:, :, :L]) for s in range(S)]
    vs = [np.ascontiguousarray(vp[tables[s]].transpose(1, 0, 2, 3).reshape(1, KV, nb * BS, D)[:, :, :L]) for s in range(S)]
    out = np.empty_like(q)
    paged_attention(q, kp, vp, tables, starts, counts, out)  # compiled before timing
    kernel, blas = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        paged_attention(q, kp, vp, tables, starts, counts, out)
        kernel.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = [grouped_decode(q[None, s * T:(s + 1) * T], ks[s], vs[s], L - T) for s in range(S)]
        blas.append(time.perf_counter() - t0)
    err = max(float(np.abs(out[s * T:(s + 1) * T] - ref[s][0]).max()) for s in range(S))
    assert err < 1e-4, err
    return min(kernel), min(blas)


def main() -> None:
    common.limit_threads(1)
    print(f"CPU: {common._cpu_model()}; one layer, float32, 1 BLAS thread, best of 15")
    print(f"{'S':>3} {'L':>4} {'T':>4} {'kernel ms':>10} {'gathered+BLAS ms':>17} {'ratio':>6}")
    for S, L, T in CASES:
        k, b = case(S, L, T, np.float32)
        print(f"{S:>3} {L:>4} {T:>4} {k * 1e3:>10.2f} {b * 1e3:>17.2f} {k / b:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
