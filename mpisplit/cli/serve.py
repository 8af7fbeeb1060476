"""Serve a model from all its tensor-parallel ranks over an OpenAI-compatible HTTP API.

    mpirun -n 2 mpisplit serve --ckpt out --port 8000
    MPISPLIT_API_KEY=KEY mpirun -n 2 python -m mpisplit.serve --hf gpt2-folder --dtype float64
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "out", "prompt": "The ", "max_tokens": 20, "temperature": 0}'

Rank 0 answers HTTP (POST /v1/completions and /v1/chat/completions, GET /v1/models, /health,
/metrics) and leads the engine; every rank holds its slab of the weights and the keys and
values of its own heads.
SIGTERM drains the requests in flight and exits 0.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, OSError)
API_KEY_ENV = "MPISPLIT_API_KEY"


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    from mpisplit.models.quantize import KINDS as QUANTIZE_KINDS

    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="an mpisplit run folder (its latest checkpoint) or one step folder")
    src.add_argument("--gguf", metavar="FILE", help="a llama.cpp GGUF file (llama, qwen2): each rank keeps its slices "
                                                   "of the Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K matrices in their blocks "
                                                   "(on the CPU, with numba) and dequantizes the rest")
    src.add_argument("--hf", help="a Hugging Face folder of GPT-2 or the Llama family (config.json, model.safetensors, "
                                  "tokenizer.json or vocab.json + merges.txt)")
    p.add_argument("--dequantize", action="store_true",
                   help="--gguf: dequantize every matrix to --dtype instead of keeping the file's blocks (2 to 6 "
                        "times the memory; decoding slower: README, GGUF)")
    p.add_argument("--quantize", choices=sorted(QUANTIZE_KINDS), default=None,
                   help="--hf/--ckpt: quantize the matrices into GGUF's Q8_0 or Q4_0 blocks at load (as a "
                        "GGUF file's are kept; serving only)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: the world size)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="weights and arithmetic")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="where the weights and KV cache live (gpu: one per rank, CuPy)")
    p.add_argument("--comm", choices=["auto", "mpi", "staged", "nccl"], default="auto",
                   help="with --device gpu: the collective path (README, GPUs)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences admitted at once (decoded together)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the longest context of a request (rotary models; default: the model's positions)")
    p.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                   help="KV-cache memory per rank: bytes with a unit (2GiB, 512MiB) or a fraction below 1 of "
                        "the memory available to a rank (default: --max-batch full contexts, at most 0.5 of it)")
    p.add_argument("--kv-cache-dtype", choices=["float16", "bfloat16"], default=None,
                   help="store the KV cache's keys and values in 16 bits (a float32 model's: half the bytes per "
                        "token, twice the tokens in --kv-cache-memory; each rounded to nearest once, when written). "
                        "Default: the model's --dtype")
    p.add_argument("--kv-block-size", type=int, default=16, help="token positions per KV-cache block")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="compute every prompt in full (default: full blocks of earlier prompts are reused)")
    p.add_argument("--collective-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="end the job when a rank has been lost this long: stalled in a step's collective, or "
                        "silent to the keep-alive between steps (0: off)")
    p.add_argument("--heartbeat-dir", default=None, metavar="DIR",
                   help="the collective timeout's heartbeat folder, on a filesystem every rank sees, so that "
                        "its report names the ranks of every host (default: under this host's temporary folder)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait to be admitted; more get HTTP 429")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens of one sequence read per engine step")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens fed per engine step: every decoding sequence's, then whole prompt chunks "
                        "while they fit (a burst of long prompts cannot stall decoding); at least --max-batch "
                        "+ --prefill-chunk, which is the default; 0: no limit")
    p.add_argument("--batch-invariant", action="store_true",
                   help="a request's tokens and logprobs independent of the batch, bit for bit (8-row BLAS "
                        "calls; measured 1.5-3x the matmul time at batch 64)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (visible to every user in the process "
                        f"list: prefer {API_KEY_ENV} or --api-key-file)")
    p.add_argument("--api-key-file", default=None, help="read the API key from the first line of this file")
    p.add_argument("--model-name", default=None, help="the model's name in the API (default: the folder name)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=FOLDER",
                   help="serve a PEFT LoRA adapter folder as the model NAME beside the base model (repeatable); "
                        "requests pick it by their \"model\" field, and requests for different adapters share a batch")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template for /v1/chat/completions (default: the folder's own, if any)")
    return p.parse_args(argv)


def _adapters(given: list[str]) -> list[tuple[str, str]]:
    """--lora NAME=FOLDER values as (name, folder); a name once, a folder that exists."""
    out: list[tuple[str, str]] = []
    for value in given:
        name, sep, folder = value.partition("=")
        if not sep or not name.strip() or not folder:
            raise ValueError(f"--lora takes NAME=FOLDER, got {value!r}")
        if name in (n for n, _ in out):
            raise ValueError(f"--lora names {name!r} twice")
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--lora {name}={folder}: the adapter folder does not exist")
        out.append((name.strip(), folder))
    return out


def _check(args: argparse.Namespace, world_size: int) -> int:
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--prefill-chunk", args.prefill_chunk, 1), ("--port", args.port, 0),
                             ("--kv-block-size", args.kv_block_size, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    least = args.max_batch + args.prefill_chunk  # every decode and one whole chunk always fit
    if args.max_num_batched_tokens is not None and 0 != args.max_num_batched_tokens < least:
        raise ValueError(f"--max-num-batched-tokens must be 0 (no limit) or >= --max-batch + --prefill-chunk "
                         f"({least}), got {args.max_num_batched_tokens}")
    if args.kv_cache_memory is not None:
        from mpisplit.serving.kv_pool import parse_memory

        args.kv_cache_memory = parse_memory(args.kv_cache_memory)
    if args.port > 65535:
        raise ValueError(f"--port must be <= 65535, got {args.port}")
    if args.quantize and args.device == "gpu":
        raise ValueError("quantized blocks (--quantize) are computed on the CPU: not with --device gpu")
    if args.dequantize and args.gguf is None:
        raise ValueError("--dequantize applies to --gguf files")
    if args.kv_cache_dtype is not None:
        from mpisplit.serving.kv_format import kv_format

        kv_format(args.kv_cache_dtype, args.dtype)  # a float32 model's cache only: said before loading
    args.lora = _adapters(args.lora)
    tp = world_size if args.tp is None else args.tp
    if tp <= 0 or world_size % tp:
        raise ValueError(f"--tp {tp} does not divide the world size {world_size}")
    if tp != world_size:
        raise ValueError(f"serving runs one model over all ranks: --tp must equal the world size {world_size}")
    return tp


def api_key(args: argparse.Namespace, environ: dict[str, str]) -> str | None:
    """The key from --api-key, --api-key-file or MPISPLIT_API_KEY (at most one of them), or None."""
    given = [(name, value) for name, value in (
        ("--api-key", args.api_key), ("--api-key-file", args.api_key_file), (API_KEY_ENV, environ.get(API_KEY_ENV)),
    ) if value is not None]
    if len(given) > 1:
        raise ValueError(f"give the API key one way, not {' and '.join(name for name, _ in given)}")
    if not given:
        return None
    name, value = given[0]
    if name == "--api-key-file":
        try:
            lines = Path(value).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--api-key-file {value!r} cannot be read: {exc}") from None
        value = lines[0].strip() if lines else ""
    if not value:
        raise ValueError(f"{name} gives an empty API key")
    return value


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    from mpi4py import MPI

    import mpisplit as ms
    from mpisplit.models.chat_template import load_chat_template
    from mpisplit.models.lora import attach_served_adapters
    from mpisplit.models.peft_adapter import read_adapter
    from mpisplit.parallel.placement import warn_split_tp_groups
    from mpisplit.runtime.errors import agree, install_abort_on_exception
    from mpisplit.serving.loading import keep_gguf_blocks, load_model_and_tokenizer, report_blocks
    from mpisplit.serving.server import ServeOptions, default_model_name, serve

    world = MPI.COMM_WORLD
    install_abort_on_exception(world)
    with agree(world):
        tp = _check(args, world.Get_size())
        key = api_key(args, dict(os.environ))
        try:
            import starlette  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as exc:
            raise ValueError(f"serving needs the 'serve' extra: pip install 'mpisplit[serve]' ({exc})") from None
    # One BLAS thread per rank unless MPISPLIT_BLAS_THREADS says otherwise: a step's matmuls are
    # small, and rank 0's HTTP front end needs a core of its own (measured: 2 BLAS threads on
    # 2 shared cores served 16 clients 3-10x slower).
    ms.limit_blas_threads(world, threads=None if os.environ.get("MPISPLIT_BLAS_THREADS", "").strip() else 1)
    grid = ms.ProcessGrid(tp=tp)
    warn_split_tp_groups(world, grid.tp)
    if args.device == "gpu":
        from mpisplit.parallel.gpu import use_gpu

        binding = use_gpu(grid, comm=args.comm)  # collective; raises on every rank alike
        if world.Get_rank() == 0:
            print(f"mpisplit serve: {binding.summary()}", flush=True)
    model, tokenizer, eos = load_model_and_tokenizer(grid, ckpt=args.ckpt, hf=args.hf, gguf=args.gguf,
                                                     dtype=args.dtype, max_model_len=args.max_model_len,
                                                     quantized=keep_gguf_blocks(args, world.Get_rank(), "mpisplit serve"),
                                                     quantize=args.quantize)
    report_blocks(model, "mpisplit serve", args.dtype, args.quantize)
    model.to(args.device)
    with agree(world):  # after the move: the adapters' slabs are made where the weights are
        if args.lora:
            attach_served_adapters(model, [(*read_adapter(folder), folder) for _, folder in args.lora])
    with agree(world):
        template = load_chat_template(args.hf or args.gguf, args.chat_template)
    opts = ServeOptions(
        host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk, api_key=key, eos_token_ids=eos, batch_invariant=args.batch_invariant,
        max_batched_tokens=(args.max_batch + args.prefill_chunk if args.max_num_batched_tokens is None
                            else args.max_num_batched_tokens or None), chat_template=template,
        kv_cache_memory=args.kv_cache_memory, kv_block_size=args.kv_block_size, prefix_cache=not args.no_prefix_cache,
        kv_cache_dtype=args.kv_cache_dtype,
        model_name=args.model_name or default_model_name(args.ckpt or args.hf or args.gguf),
        adapters=tuple(name for name, _ in args.lora),
        collective_timeout=args.collective_timeout, heartbeat_dir=args.heartbeat_dir,
    )
    code = serve(model, tokenizer, opts)
    grid.free()
    return code
