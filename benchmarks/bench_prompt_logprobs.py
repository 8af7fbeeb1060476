"""What asking for prompt logprobs costs when the prompt's prefix is cached: SmolLM2-135M-Instruct,
a prompt whose first `--prefix` tokens are in the prefix cache (a request read them before).

    python benchmarks/bench_prompt_logprobs.py --prefix 256 --tail 16 --repeats 5

A request that asks for its prompt's logprobs (echo with logprobs, or prompt_logprobs) reads its
whole prompt again: the logprobs of a cached prefix were never kept. Measured here, in one
process and alternating, the time to the first token of three requests for the same prompt:
the cached prefix reused (plain), the whole prompt read (prefix cache off for it: the same work
without logprobs), and with prompt logprobs (the whole prompt read, and a log-softmax and top
alternatives per prompt position).
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


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=None, help="the model (default: the tests' SmolLM2 cache)")
    p.add_argument("--prefix", type=int, default=256, help="cached prompt tokens")
    p.add_argument("--tail", type=int, default=16, help="prompt tokens after the cached prefix")
    p.add_argument("--top", type=int, default=1, help="top alternatives per prompt token")
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args()


def first_token_s(engine, spec) -> float:
    start = time.perf_counter()
    engine.add(spec)
    while not engine.step():
        pass
    seconds = time.perf_counter() - start
    engine.remove(spec.rid)
    return seconds


def main() -> int:
    args = parse_args()
    import numpy as np
    from mpi4py import MPI

    from mpisplit.serving.engine import Engine, SequenceSpec
    from mpisplit.serving.sampling import SamplingParams

    world = MPI.COMM_WORLD
    grid, model, _, eos = common.smollm2_on_ranks(args.gguf, max_model_len=1024)
    rng = np.random.default_rng(0)
    prefix = rng.integers(100, 40000, args.prefix).tolist()
    cached = Engine(model, 2, eos_token_ids=eos)
    uncached = Engine(model, 2, eos_token_ids=eos, prefix_cache=False)
    greedy = SamplingParams(temperature=0.0)
    first_token_s(cached, SequenceSpec(0, [*prefix, 7], 1, greedy))  # the prefix is now cached
    times: dict[str, list[float]] = {"plain (prefix reused)": [], "whole prompt read": [], "prompt logprobs": []}
    for r in range(args.repeats):
        tail = rng.integers(100, 40000, args.tail).tolist()
        prompt = [*prefix, *tail]
        times["plain (prefix reused)"].append(first_token_s(cached, SequenceSpec(10 + r, prompt, 1, greedy)))
        times["whole prompt read"].append(first_token_s(uncached, SequenceSpec(10 + r, prompt, 1, greedy)))
        times["prompt logprobs"].append(first_token_s(cached, SequenceSpec(100 + r, prompt, 1, greedy,
                                                                          prompt_logprobs=args.top)))
    if world.Get_rank() == 0:
        info = common.machine_info()
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med["plain (prefix reused)"]
        print(json.dumps({"cpu": info["cpu"], "cores": info["cores"], "load": info["load_average_1_5_15min"],
                          "ranks": world.Get_size(), "prefix": args.prefix, "tail": args.tail,
                          "ttft_ms": {k: 1e3 * v for k, v in med.items()},
                          "over_plain": {k: v / base for k, v in med.items()}}, indent=1), flush=True)
    grid.free()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
