"""Packed rows against one conversation per row: the time to train on the same conversations.

A set of conversations with a chat-like spread of lengths (log-normal, median `--median` tokens,
at most the row length) is trained on in steps of `--batch` rows of `--seq` tokens, three ways,
interleaved in one process, one thread (forward, backward; the optimizer's cost is the same per
step and left out):

    padded   one conversation per row, the rest padding (what training does without --pack)
    packed   the conversations packed by best-fit decreasing, attention within each (--pack)
    causal   the packed rows without their positions: plain causal attention over the whole
             row (wrong for training, shown for the cost of the block-diagonal mask)

Reported: the real-token fraction of the rows, the seconds per pass over all conversations
(median of `--reps`), and packed / padded and packed / causal ratios (same run, same machine).

  python benchmarks/bench_packing.py            # 64 conversations, rows of 512, Llama shape
  python benchmarks/bench_packing.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

FULL = {"vocab": 4096, "hidden": 256, "layers": 4, "heads": 8, "kv": 2, "ffn": 704, "seq": 512, "batch": 4,
        "conversations": 64}
SMOKE = {"vocab": 64, "hidden": 32, "layers": 2, "heads": 4, "kv": 2, "ffn": 48, "seq": 32, "batch": 2,
         "conversations": 8}


def conversations(shape: dict, median: float, seed: int = 0) -> list[np.ndarray]:
    """Token ids of conversations of 2..seq+1 tokens (inputs and the next-token targets)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 0.8, size=shape["conversations"]).astype(int), 2,
                      shape["seq"] + 1)
    return [rng.integers(0, shape["vocab"], size=n) for n in lengths]


def rows(convs: list[np.ndarray], seq: int, packed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, targets (-100 at padding) and positions of the rows holding `convs`."""
    from mpisplit.training.row_packing import best_fit_decreasing

    groups = best_fit_decreasing(np.array([len(c) - 1 for c in convs]), seq) if packed else [[i] for i in
                                                                                           range(len(convs))]
    x = np.zeros((len(groups), seq), dtype=np.int64)
    y = np.full((len(groups), seq), -100, dtype=np.int64)
    pos = np.tile(np.arange(seq), (len(groups), 1))
    for r, members in enumerate(groups):
        at = 0
        for k in members:
            n = len(convs[k]) - 1
            x[r, at:at + n], y[r, at:at + n], pos[r, at:at + n] = convs[k][:-1], convs[k][1:], np.arange(n)
            at += n
        pos[r, at:] = np.arange(seq - at)
    return x, y, pos


def _model(shape: dict) -> Any:
    from mpi4py import MPI

    from mpisplit.models.config import GPTConfig
    from mpisplit.models.gpt import GPT
    from mpisplit.parallel.grid import ProcessGrid
    from mpisplit.training.step import StepRunner

    grid = ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    cfg = GPTConfig.llama(vocab_size=shape["vocab"], block_size=shape["seq"], n_layer=shape["layers"],
                          n_head=shape["heads"], n_embd=shape["hidden"], n_kv_head=shape["kv"],
                          intermediate_size=shape["ffn"])
    model = GPT(cfg, grid, dtype="float32", seed=0)
    return model, StepRunner(model, grid)


def epoch(model: Any, runner: Any, x: np.ndarray, y: np.ndarray, pos: np.ndarray | None, batch: int) -> None:
    """Forward and backward over every row, `batch` rows a step."""
    count = int((y != -100).sum())
    for lo in range(0, len(x), batch):
        runner.forward_backward(x[lo:lo + batch], y[lo:lo + batch], target_count=count,
                                positions=None if pos is None else pos[lo:lo + batch])
        model.zero_grad()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a small model, seconds")
    p.add_argument("--median", type=float, default=None, help="median conversation length (default: seq / 5)")
    p.add_argument("--reps", type=int, default=3, help="timed passes per case (after one warm-up pass)")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = p.parse_args()
    shape = SMOKE if args.smoke else FULL
    common.limit_threads(1)
    from mpi4py import MPI

    from mpisplit import kernels

    kernels.warm_up(np.float32)
    convs = conversations(shape, args.median or shape["seq"] / 5)
    padded, packed = rows(convs, shape["seq"], False), rows(convs, shape["seq"], True)
    model, runner = _model(shape)
    b = shape["batch"]
    cases = {"padded": lambda: epoch(model, runner, *padded[:2], None, b),
             "packed": lambda: epoch(model, runner, *packed, b),
             "causal": lambda: epoch(model, runner, *packed[:2], None, b)}
    times = {k: common.summarize(v) for k, v in common.time_interleaved(cases, MPI.COMM_SELF, 1, args.reps).items()}
    real = int(sum(len(c) - 1 for c in convs))
    fill = {"padded": real / padded[0].size, "packed": real / packed[0].size}
    ratios = {"packed/padded": times["packed"]["median_s"] / times["padded"]["median_s"],
              "packed/causal": times["packed"]["median_s"] / times["causal"]["median_s"]}
    print(f"{len(convs)} conversations, {real} tokens: {len(padded[0])} padded rows ({fill['padded']:.0%} real), "
          f"{len(packed[0])} packed rows ({fill['packed']:.0%} real) of {shape['seq']}")
    for name, t in times.items():
        print(f"{name:7s} {t['median_s']:8.3f} s a pass  ({real / t['median_s']:8.0f} tokens/s)")
    print(f"packed / padded time: {ratios['packed/padded']:.2f}x; packed / causal (the mask's cost): "
          f"{ratios['packed/causal']:.2f}x")
    out = common.write_json(args.out / "bench_packing.json", {
        "machine": common.machine_info(), "shape": shape, "tokens": real, "rows": {"padded": len(padded[0]),
                                                                                  "packed": len(packed[0])},
        "fill": fill, "times": times, "ratios": ratios})
    print(f"-> {out} ({common.machine_info()['cpu']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
