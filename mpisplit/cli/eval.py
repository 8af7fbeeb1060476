"""Perplexity of a text or of a prepared corpus's held-out split, from all tensor-parallel ranks.

    mpirun -n 2 mpisplit eval --hf smollm2-folder --ppl wiki.txt
    mpisplit eval --ckpt out --ppl notes.txt --json
    mpirun -n 4 mpisplit eval --hf gpt2-folder --ppl corpus/     # its val split (mpisplit prepare)

Windows as lm-eval's rolling loglikelihood: the tokens are predicted in disjoint runs of the
model's context length; the first run starts from an end-of-sequence id (the model's first for a
text, the corpus's for a split; so the first token is scored too; without one the first token is
context only), each later run sees the context-length tokens before it. A split is one stream:
its documents, each followed by the corpus's end-of-document token, which is scored too (bytes and
words count the documents' text). Rank 0 prints the tokens scored, the summed log-likelihood, the
token perplexity, bits per byte (of the UTF-8 text) and word perplexity (words split on
whitespace), the three lm-eval reports for such a task; a progress bar on stderr while it scores.
"""

from __future__ import annotations

import argparse
import itertools
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
    p.add_argument("--ppl", metavar="FILE|DIR", required=True,
                   help="a UTF-8 text file, or a corpus folder of mpisplit prepare (its val split)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: the world size)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--max-model-len", type=int, default=None, help="the window length (default: the model's context)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    return p.parse_args(argv)


def rolling_spans(n: int, length: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, scored) per window over a sequence of n tokens whose first is context only:
    input tokens[start:end], position j predicting token start + j + 1; the last `scored` of
    them are scored, every token but the first exactly once."""
    done = 1
    while done < n:
        end = min(n, done + length)
        yield max(0, end - length - 1), end, end - done
        done = end


def rolling_windows(tokens: list[int], prefix: int | None, length: int) -> Iterator[tuple[list[int], int]]:
    """(input ids, how many of the last positions are scored) per window (the first token is
    scored only given `prefix`)."""
    if prefix is not None:
        tokens = [prefix, *tokens]
    for start, end, scored in rolling_spans(len(tokens), length):
        yield tokens[start:end], scored


class Prefixed:
    """A token stream (a prepared split's ShardedTokens) with one token before it, sliceable."""

    def __init__(self, prefix: int, stream: Any) -> None:
        self.prefix, self.stream = prefix, stream

    def __len__(self) -> int:
        return len(self.stream) + 1

    def __getitem__(self, key: slice) -> list[int]:
        lo, hi = key.start, key.stop
        head = [self.prefix] if lo == 0 else []
        return head + [int(t) for t in self.stream[max(lo - 1, 0): hi - 1]]


def score(model: Any, tokens: Any, batch: int = 8, progress: bool = False) -> tuple[float, int]:
    """(sum of log p of the scored tokens, their count) over the rolling windows of `tokens`
    (sliceable; its first token context only), `batch` windows of equal length per forward
    pass; the same on every TP rank."""
    import numpy as np
    from tqdm import tqdm

    from mpisplit.autograd.tensor import no_grad

    spans = list(rolling_spans(len(tokens), model.config.block_size))
    total, count = 0.0, 0
    with tqdm(total=len(spans), unit="window", disable=not progress, desc="scoring") as bar:
        for group in _groups(spans, batch):
            ids = np.array([tokens[start:end] for start, end, _ in group], dtype=np.int64)
            x, y = ids[:, :-1], ids[:, 1:].copy()
            for row, (start, end, scored) in enumerate(group):
                y[row, : end - start - 1 - scored] = -100  # context positions are not scored
            with no_grad():
                mean = float(np.asarray(model.loss(x, y).data))
            scored = sum(g[2] for g in group)
            total -= mean * scored
            count += scored
            bar.update(len(group))
    return total, count


def _groups(spans: list[tuple[int, int, int]], batch: int) -> Iterator[list[tuple[int, int, int]]]:
    """Runs of at most `batch` consecutive windows of the same length."""
    group: list[tuple[int, int, int]] = []
    for span in spans:
        if group and (len(group) == batch or span[1] - span[0] != group[0][1] - group[0][0]):
            yield group
            group = []
        group.append(span)
    if group:
        yield group


def text_source(path: str, tokenizer: Any, eos: tuple[int, ...]) -> tuple[list[int], int, int]:
    """(tokens with the eos prefix when there is one, bytes, words) of a text file."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: it cannot read a text")
    text = Path(path).read_text(encoding="utf-8")
    tokens = [int(t) for t in tokenizer.encode(text)]
    if eos:
        tokens = [int(eos[0]), *tokens]
    if len(tokens) < 2:
        raise ValueError(f"{path} holds {len(tokens)} token(s): nothing to score")
    return tokens, len(text.encode("utf-8")), len(re.split(r"\s+", text))


def split_source(args: argparse.Namespace, vocab_size: int, rank: int, size: int) -> tuple[Any, Any, Any]:
    """(the val stream after the corpus's eos, its document offsets, the manifest) of a prepared
    corpus, its files checked against the manifest and its tokenizer against the model's."""
    import numpy as np

    from mpisplit.data.manifest import check_digests, check_sizes, read_manifest
    from mpisplit.data.tokens import ShardedTokens
    from mpisplit.training.prepared import check_tokenizer

    folder = Path(args.ppl)
    manifest = read_manifest(folder)
    check_sizes(folder, manifest)
    check_digests(folder, manifest, rank, size)
    if args.hf is not None or args.gguf is not None:
        check_tokenizer(manifest, args.hf or args.gguf, "--hf" if args.hf else "--gguf")
    if int(manifest["tokenizer"]["vocab_size"]) > vocab_size:
        raise ValueError(f"{args.ppl} has a vocabulary of {manifest['tokenizer']['vocab_size']} tokens; "
                         f"the model has {vocab_size}")
    val = manifest["val"]
    if not val["tokens"]:
        raise ValueError(f"{args.ppl}: its val split holds no tokens")
    stream = ShardedTokens([folder / sh["file"] for sh in val["shards"]], manifest["dtype"])
    offsets = np.load(folder / val["index"]["file"])
    return Prefixed(int(manifest["tokenizer"]["eos_id"]), stream), offsets, manifest


def split_text_size(stream: Prefixed, offsets: Any, tokenizer: Any) -> tuple[int | None, int | None]:
    """(bytes, words) of a split's documents, decoded without their eos; (None, None) without a
    tokenizer (a checkpoint trained on the corpus carries none)."""
    if tokenizer is None:
        return None, None
    nbytes = words = 0
    for lo, hi in itertools.pairwise(offsets):
        text = tokenizer.decode(stream.stream[int(lo): int(hi) - 1])
        nbytes += len(text.encode("utf-8"))
        words += len(re.split(r"\s+", text))
    return nbytes, words


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    from mpi4py import MPI

    from mpisplit.data.manifest import is_prepared
    from mpisplit.runtime.errors import agree, install_abort_on_exception
    from mpisplit.serving.loading import load_on_ranks

    world = MPI.COMM_WORLD
    install_abort_on_exception(world)
    with agree(world):
        if args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        prepared = is_prepared(args.ppl)
        if not prepared:
            Path(args.ppl).read_bytes()  # a missing or unreadable file fails before the model loads
    grid, model, tokenizer, eos = load_on_ranks(world, args)
    nbytes: int | None
    words: int | None
    with agree(world):
        if prepared:
            tokens, offsets, _ = split_source(args, model.config.vocab_size, world.Get_rank(), world.Get_size())
        else:
            tokens, nbytes, words = text_source(args.ppl, tokenizer, eos)
    total, count = score(model, tokens, args.batch, progress=grid.rank == 0)
    if grid.rank == 0:
        if prepared:
            nbytes, words = split_text_size(tokens, offsets, tokenizer)
        _report(args, total, count, nbytes, words)
    grid.free()
    return 0


def _report(args: argparse.Namespace, total: float, count: int, nbytes: int | None, words: int | None) -> None:
    out = {"file": args.ppl, "tokens": count, "loglikelihood": total, "perplexity": math.exp(-total / count),
           "bits_per_byte": None if not nbytes else -total / (nbytes * math.log(2)),
           "word_perplexity": None if not words else math.exp(-total / words), "bytes": nbytes, "words": words}
    if args.json:
        print(json.dumps(out), flush=True)
        return
    print(f"{args.ppl}: {count} tokens scored, log-likelihood {total:.6f}", flush=True)
    if nbytes is None:
        print(f"perplexity {out['perplexity']:.6f} (no tokenizer: no bytes or words to count)", flush=True)
        return
    print(f"perplexity {out['perplexity']:.6f}, bits per byte {out['bits_per_byte']:.6f}, "
          f"word perplexity {out['word_perplexity']:.6f} ({nbytes} bytes, {words} words)", flush=True)
