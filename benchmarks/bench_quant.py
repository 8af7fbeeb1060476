"""Weights in GGUF's quantized blocks against float32 weights: products and decoding.

  products   x (N, K) @ W.T for SmolLM2-135M's matrix shapes, N = 1..16 rows: the fused kernel
             (kernels/quant_blocks.py), dequantize-then-BLAS, and BLAS on float32 weights; the
             crossover sets nn/quantized.py's FUSED_MAX_ROWS
  decode     SmolLM2-135M-Instruct (Q4_1 file, tests/_smollm2.py) greedy, 64 new tokens after a
             16-token prompt, batch 1 and 8: tokens/s with the matrices kept quantized and
             dequantized to float32, and the bytes of each model's weights
  quality    the same model both ways, float32, every product through the cache in chunks of 16
             tokens (the block kernels' path when kept): perplexity of a held-out text (this
             repository's README, 1024 tokens), and 200 tokens drawn greedily by the kept model,
             scored by both: the largest log-probability difference and the positions where the
             dequantized model's greedy choice differs

  python benchmarks/bench_quant.py [--threads 1] [--decode-only | --quality-only]
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

SHAPES = {"q/o (576 x 576)": (576, 576), "gate/up (1536 x 576)": (1536, 576), "down (576 x 1536)": (576, 1536),
          "head (49152 x 576)": (49152, 576)}


def _best(fn, reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def products() -> list[dict]:
    import gguf

    from mpisplit.kernels.quant_blocks import block_matmul, dequantize_rows

    rows = []
    rng = np.random.default_rng(0)
    for kind in ("Q4_1", "Q8_0"):
        for label, (r, k) in SHAPES.items():
            w = rng.standard_normal((r, k)).astype(np.float32)
            blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind])
            wt = np.ascontiguousarray(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind]).T)
            for n in (1, 2, 4, 8, 16, 32, 64):
                x = rng.standard_normal((n, k)).astype(np.float32)
                blas = _best(lambda x=x, wt=wt: x @ wt)
                fused = _best(lambda x=x, b=blocks, kd=kind: block_matmul(x, b, kd))
                tiled = _best(lambda x=x, b=blocks, kd=kind, k=k: x @ dequantize_rows(b, kd, k).T)
                rows.append({"kind": kind, "shape": label, "n": n, "blas_f32_ms": blas * 1e3, "fused_ms": fused * 1e3,
                             "dequant_blas_ms": tiled * 1e3, "fused_vs_f32": blas / fused})
    return rows


def decode(tokens: int = 64) -> list[dict]:
    from mpi4py import MPI

    sys.path.insert(0, str(ROOT / "tests"))
    from _smollm2 import smollm2_gguf

    import mpisplit as ms

    path = smollm2_gguf()
    grid = ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    out = []
    for keep in (True, False):
        model = ms.GPT.from_pretrained(path, grid, dtype="float32", keep_quantized=keep, max_model_len=256)
        # the weights' bytes: blocks where kept, float32 elsewhere (a kept matrix's float array is
        # never written, so it takes no memory)
        weight_bytes = sum(p.quantized.nbytes if p.quantized is not None else p.data.nbytes
                           for p in model.parameters())
        for batch in (1, 8):
            idx = np.random.default_rng(1).integers(0, 49152, size=(batch, 16))
            t = _best(lambda idx=idx, m=model: m.generate(idx, tokens), reps=3)
            out.append({"weights": "quantized" if keep else "float32", "batch": batch,
                        "tokens_per_s": batch * tokens / t, "weights_mib": weight_bytes / 2**20})
        del model
    grid.free()
    return out


def _scores(model, ids: np.ndarray, chunk: int = 16) -> np.ndarray:
    """float64 log-softmax rows (len(ids), V) of ids through the KV cache, `chunk` tokens a pass."""
    import mpisplit as ms
    from mpisplit.parallel.mappings import gather_from_tp

    caches, rows = model.new_caches(1), []
    with ms.no_grad():
        for lo in range(0, len(ids), chunk):
            h = model.hidden_states(ids[None, lo: lo + chunk], caches)
            z = gather_from_tp(model.head.logits(h), model.grid.tp_comm).data[0, :, : model.config.vocab_size]
            z = np.asarray(z, dtype=np.float64)
            rows.append(z - np.logaddexp.reduce(z, axis=1, keepdims=True))
    return np.concatenate(rows)


def quality(tokens: int = 200, text_tokens: int = 1024) -> dict:
    from mpi4py import MPI

    sys.path.insert(0, str(ROOT / "tests"))
    from _smollm2 import smollm2_gguf

    import mpisplit as ms
    from mpisplit.models.hf import load_tokenizer

    path = smollm2_gguf()
    grid = ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    models = {keep: ms.GPT.from_pretrained(path, grid, dtype="float32", keep_quantized=keep, max_model_len=2048)
              for keep in (True, False)}
    tok = load_tokenizer(str(path), models[True].config.vocab_size)
    text = np.array(tok.encode((ROOT / "README.md").read_text())[:text_tokens], dtype=np.int64)
    out: dict = {"text_tokens": len(text)}
    for keep, model in models.items():
        lp = _scores(model, text)
        out["ppl_kept" if keep else "ppl_dequantized"] = float(np.exp(-lp[np.arange(len(text) - 1), text[1:]].mean()))
    prompt = text[:16]
    drawn = models[True].generate(prompt[None], tokens)[0]
    a, b = (_scores(models[k], drawn)[len(prompt) - 1: -1] for k in (True, False))
    picked = drawn[len(prompt):]
    out["max_logprob_diff"] = float(np.abs(a[np.arange(tokens), picked] - b[np.arange(tokens), picked]).max())
    out["greedy_disagreements"] = int((b.argmax(axis=1) != picked).sum())
    out["ppl_ratio"] = out["ppl_kept"] / out["ppl_dequantized"]
    grid.free()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="BLAS and numba threads")
    p.add_argument("--decode-only", action="store_true", help="skip the products")
    p.add_argument("--quality-only", action="store_true", help="only the perplexity and log-probability comparison")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = p.parse_args()
    common.limit_threads(args.threads)
    import numba

    numba.set_num_threads(args.threads)
    if args.quality_only:
        q = quality()
        print(q)
        common.write_json(args.out / "bench_quant_quality.json", {"machine": common.machine_info(), "quality": q})
        return 0
    prods = [] if args.decode_only else products()
    print(common.format_table(prods, ["kind", "shape", "n", "blas_f32_ms", "fused_ms", "dequant_blas_ms", "fused_vs_f32"]))
    dec = decode()
    print(common.format_table(dec, ["weights", "batch", "tokens_per_s", "weights_mib"]))
    info = common.machine_info()
    out = common.write_json(args.out / "bench_quant.json", {"machine": info, "threads": args.threads,
                                                             "products": prods, "decode": dec})
    print(f"-> {out} ({info['cpu']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
