"""What structured output costs a decoding step: SmolLM2-135M-Instruct (vocabulary 49152), a
batch of requests constrained by a JSON schema against the same batch unconstrained.

    python benchmarks/bench_guided.py                     # 1 rank, batch 4, 32 tokens each
    mpirun -n 3 python benchmarks/bench_guided.py --batch 8

Measured in one process, alternating the two runs `--repeats` times (the machine is shared):
the engine's step time with the grammar and without (their ratio is the cost the forward pass
does not hide), and the masks alone, replayed for the same tokens outside the engine (one
`fill_next_token_bitmask_par` per step for the whole batch, and the conversion of the bits to a
boolean row per request). Both runs draw exactly `--tokens` tokens per request (ignore_eos; the
schema is an array of bounded strings that never completes sooner), so their steps are the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common

SCHEMA = {"type": "array", "minItems": 64, "items": {"type": "string", "pattern": "^[a-z ]{1,24}$"}}
PROMPT = "<|im_start|>user\nList as many fruits as you can, as JSON.<|im_end|>\n<|im_start|>assistant\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=None, help="the model (default: the tests' SmolLM2 cache)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


def run(engine_cls, model, tok, eos, specs) -> tuple[float, int, dict[int, list[int]]]:
    engine = engine_cls(model, len(specs), eos_token_ids=eos, tokenizer=tok)
    for spec in specs:
        engine.add(spec)
    tokens: dict[int, list[int]] = {s.rid: [] for s in specs}
    for out in engine.step():  # the prompt and the first draw: not a decoding step
        tokens[out.rid].append(out.token)
    steps, start = 0, time.perf_counter()
    while engine.running:
        for out in engine.step():
            tokens[out.rid].append(out.token)
        steps += 1
    return time.perf_counter() - start, steps, tokens


def replay_masks(tok, vocab: int, eos, grammar: str, tokens: dict[int, list[int]]) -> list[float]:
    """Seconds per step of the whole batch's masks (computed and turned into boolean rows)."""
    from mpisplit.serving import guided

    gt = guided.grammar_tokenizer(tok, vocab, eos)
    guides = [guided.Guide(gt, grammar) for _ in tokens]
    worker, seqs, out = guided.MaskWorker(), list(tokens.values()), []
    for step in range(max(len(s) for s in seqs)):
        live = [(g, s[step]) for g, s in zip(guides, seqs) if step < len(s)]
        t = time.perf_counter()
        worker.start([g for g, _ in live])
        masks = worker.result()
        for row in masks:
            gt.allowed(row)
        out.append(time.perf_counter() - t)
        for g, token in live:
            g.take(token)
    worker.close()
    return out


def main() -> int:
    args = parse_args()
    from mpi4py import MPI

    from mpisplit.serving.engine import Engine, SequenceSpec
    from mpisplit.serving.sampling import SamplingParams
    from mpisplit.serving.validation import ModelInfo, validate_completion

    world = MPI.COMM_WORLD
    grid, model, tok, eos = common.smollm2_on_ranks(args.gguf, max_model_len=512)
    info = ModelInfo("m", model.config.vocab_size, model.config.block_size, tok, eos_token_ids=eos)
    body = {"prompt": PROMPT, "max_tokens": args.tokens, "temperature": 0.8, "guided_json": SCHEMA}
    req = validate_completion(body, info)
    grammar = req.sampling.grammar

    def specs(with_grammar: bool) -> list:
        return [SequenceSpec(i, req.prompt, args.tokens, SamplingParams(
            temperature=0.8, seed=i, ignore_eos=True, grammar=grammar if with_grammar else None))
            for i in range(args.batch)]

    plain, guided_s, masks = [], [], []
    for _ in range(args.repeats):
        seconds, steps, _ = run(Engine, model, tok, eos, specs(False))
        plain.append(seconds / steps)
        seconds, steps, drawn = run(Engine, model, tok, eos, specs(True))
        guided_s.append(seconds / steps)
        masks += replay_masks(tok, model.config.vocab_size, eos, grammar, drawn)
    if world.Get_rank() == 0:
        info_ = common.machine_info()
        result = {
            "cpu": info_["cpu"], "cores": info_["cores"], "load": info_["load_average_1_5_15min"],
            "ranks": world.Get_size(), "batch": args.batch, "tokens": args.tokens, "vocab": model.config.vocab_size,
            "step_ms_plain": 1e3 * statistics.median(plain), "step_ms_guided": 1e3 * statistics.median(guided_s),
            "guided_over_plain": statistics.median(guided_s) / statistics.median(plain),
            "mask_ms_median": 1e3 * statistics.median(masks),
            "mask_ms_p90": 1e3 * statistics.quantiles(masks, n=10)[-1],
            "mask_ms_per_request": 1e3 * statistics.median(masks) / args.batch,
        }
        print(json.dumps(result, indent=1), flush=True)
    grid.free()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
