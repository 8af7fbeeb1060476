"""Perplexity of a text under a model, from all its tensor-parallel ranks.

    mpirun -n 2 mpisplit eval --hf smollm2-folder --ppl wiki.txt
    mpisplit eval --ckpt out --ppl notes.txt --json

Windows as lm-eval's rolling loglikelihood: the text's tokens are predicted in disjoint runs of
the model's context length; the first run starts from the model's first end-of-sequence id (so
the first token is scored too; without one the first token is context only), each later run
sees the context-length tokens before it. Rank 0 prints the tokens scored, the summed
log-likelihood, the token perplexity, bits per byte (of the text's UTF-8) and word perplexity
(words split on whitespace), the three lm-eval reports for such a task.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, OSError)


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="an mpisplit run folder (its latest checkpoint) or one step folder")
    src.add_argument("--gguf", metavar="FILE", help="a llama.cpp GGUF file (llama, qwen2)")
    src.add_argument("--hf", help="a Hugging Face folder of GPT-2 or the Llama family")
    p.add_argument("--ppl", metavar="FILE", required=True, help="a UTF-8 text file")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: the world size)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--max-model-len", type=int, default=None, help="the window length (default: the model's context)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    return p.parse_args(argv)


def rolling_windows(tokens: list[int], prefix: int | None, length: int) -> Iterator[tuple[list[int], int]]:
    """(input ids, how many of the last positions are scored) per window: input position j
    predicts input j + 1, the tokens' own next; every token scored once (the first only given
    `prefix`)."""
    if prefix is not None:
        tokens = [prefix, *tokens]
    done = 1  # tokens[0] is context only
    while done < len(tokens):
        end = min(len(tokens), done + length)
        start = max(0, end - length - 1)
        yield tokens[start:end], end - done
        done = end


def score(model: Any, windows: Iterator[tuple[list[int], int]]) -> tuple[float, int]:
    """(sum of log p of the scored tokens, their count), the same on every TP rank."""
    import numpy as np

    from mpisplit.autograd.tensor import no_grad

    total, count = 0.0, 0
    for ids, scored in windows:
        x = np.array([ids[:-1]], dtype=np.int64)
        y = np.array([ids[1:]], dtype=np.int64)
        y[0, : len(ids) - 1 - scored] = -100  # context positions are not scored
        with no_grad():
            mean = float(np.asarray(model.loss(x, y).data))
        total -= mean * scored
        count += scored
    return total, count


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    from mpi4py import MPI

    from mpisplit.runtime.errors import agree, install_abort_on_exception
    from mpisplit.serving.loading import load_on_ranks

    world = MPI.COMM_WORLD
    install_abort_on_exception(world)
    with agree(world):
        text = Path(args.ppl).read_text(encoding="utf-8")
    grid, model, tokenizer, eos = load_on_ranks(world, args)
    with agree(world):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer: it cannot read a text")
        tokens = [int(t) for t in tokenizer.encode(text)]
        if len(tokens) < 2 and not eos:
            raise ValueError(f"{args.ppl} holds {len(tokens)} token(s): nothing to score")
    prefix = int(eos[0]) if eos else None
    total, count = score(model, rolling_windows(tokens, prefix, model.config.block_size))
    if grid.rank == 0:
        _report(args, text, total, count)
    grid.free()
    return 0


def _report(args: argparse.Namespace, text: str, total: float, count: int) -> None:
    nbytes, words = len(text.encode("utf-8")), len(re.split(r"\s+", text))
    out = {"file": args.ppl, "tokens": count, "loglikelihood": total,
           "perplexity": math.exp(-total / count), "bits_per_byte": -total / (nbytes * math.log(2)),
           "word_perplexity": math.exp(-total / words), "bytes": nbytes, "words": words}
    if args.json:
        print(json.dumps(out), flush=True)
        return
    print(f"{args.ppl}: {count} tokens scored, log-likelihood {total:.6f}", flush=True)
    print(f"perplexity {out['perplexity']:.6f}, bits per byte {out['bits_per_byte']:.6f}, "
          f"word perplexity {out['word_perplexity']:.6f} ({nbytes} bytes, {words} words)", flush=True)
