"""Tensor-parallel text generation from a checkpoint.

    mpirun -n 2 mpisplit generate --ckpt out --prompt "The "
    mpirun -n 4 mpisplit generate --ckpt out/step-00000600 --prompt "def" --temperature 0.8 --top-k 20
    mpisplit generate --hf gpt2-folder --prompt-ids 464,3290 --max-new-tokens 20

Every rank holds its slab of each weight and caches the keys and values of its
own heads; the checkpoint may have been saved at any TP degree (its files' sha256 checked by
the ranks that read them). Generation ends at the model's end-of-sequence ids (a folder's
config.json / generation_config.json, a checkpoint's meta) unless --ignore-eos; the printed
text leaves the eos token out, the printed ids keep it. Rank 0 prints.
"""

from __future__ import annotations

import argparse

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, OSError)


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="an mpisplit run folder (its latest checkpoint) or one step folder")
    src.add_argument("--gguf", metavar="FILE", help="a llama.cpp GGUF file (llama, qwen2): each rank keeps its slices "
                     "of the matrices in their quantized blocks on the CPU")
    src.add_argument("--hf", help="a Hugging Face folder (config.json, model.safetensors, a tokenizer) of GPT-2 "
                     "or the Llama family (llama, qwen2, mistral)")
    p.add_argument("--prompt", default=None,
                   help="prompt text (a character-level checkpoint, or a folder with a tokenizer)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids (models without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; otherwise sample")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same on every rank)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: the world size)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--dequantize", action="store_true",
                   help="--gguf: dequantize every matrix to --dtype instead of keeping the file's blocks")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate all --max-new-tokens, past the model's end-of-sequence ids")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="cap the context (rotary models: the Llama family declares 8k-128k positions)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    import numpy as np
    from mpi4py import MPI

    from mpisplit.runtime.errors import agree, install_abort_on_exception
    from mpisplit.serving.loading import load_on_ranks

    world = MPI.COMM_WORLD
    install_abort_on_exception(world)
    with agree(world):
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        if (args.prompt is None) == (args.prompt_ids is None):
            raise ValueError("give exactly one of --prompt and --prompt-ids")
    grid, model, tokenizer, eos = load_on_ranks(world, args, "mpisplit generate")
    cfg = model.config
    with agree(world):
        if args.prompt is not None:
            if tokenizer is None:
                raise ValueError("this model has no tokenizer: pass --prompt-ids")
            prompt = tokenizer.encode(args.prompt)
        else:
            try:
                prompt = np.array([int(t) for t in args.prompt_ids.split(",") if t.strip()], dtype=np.int64)
            except ValueError:
                raise ValueError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        if prompt.size == 0:
            raise ValueError("the prompt is empty")
        if prompt.size > cfg.block_size:
            raise ValueError(f"the prompt has {prompt.size} tokens; the model's context is {cfg.block_size}")
        if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
            raise ValueError(f"prompt ids must lie in [0, {cfg.vocab_size})")

    ids = model.generate(
        prompt[None, :], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
        use_cache=not args.no_cache, eos_token_ids=() if args.ignore_eos else eos,
    )[0]
    if grid.rank == 0:
        if tokenizer is not None and args.prompt is not None:
            ended = len(ids) > len(prompt) and int(ids[-1]) in eos and not args.ignore_eos
            print(tokenizer.decode(ids[:-1] if ended else ids), flush=True)  # the eos token's text left out
        else:
            print(",".join(str(int(i)) for i in ids), flush=True)
    grid.free()
    return 0

