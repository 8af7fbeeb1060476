"""Putting a server together on every rank: the model's engine, the control channel, and on
rank 0 the controller and the HTTP front end (uvicorn in a process of its own, relay.py).

    serve(model, tokenizer, ServeOptions(port=8000))   # collective; returns when shut down

SIGTERM (or SIGINT) on rank 0 stops admitting, lets the requests in flight finish (at most
`drain_s` seconds, then cancels them), stops every rank and returns 0.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpisplit import kernels
from mpisplit.serving.batch import check_batch_invariance
from mpisplit.serving.channel import SHUTDOWN, ControlChannel
from mpisplit.serving.controller import Controller, follow
from mpisplit.serving.engine import Engine
from mpisplit.serving.kv_format import kv_format
from mpisplit.serving.kv_pool import kv_blocks
from mpisplit.serving.liveness import Liveness
from mpisplit.serving.metrics import ServerMetrics
from mpisplit.serving.relay import FrontendConfig, FrontendRelay
from mpisplit.serving.validation import ModelInfo

SWITCH_INTERVAL_S = 2e-4


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the line "serving on http://HOST:PORT" says which)
    max_batch: int = 16
    max_queue: int = 64
    prefill_chunk: int = 256
    api_key: str | None = None
    model_name: str = "mpisplit"
    drain_s: float = 10.0
    eos_token_ids: tuple[int, ...] = ()  # the model's, from the loading code; a sequence ends at one
    batch_invariant: bool = False  # 8-row BLAS calls: a request's bits independent of the batch
    max_batched_tokens: int | None = None  # tokens fed per engine step (decodes first); None: no limit
    chat_template: Any = None  # a templates.ChatTemplate; None: /v1/chat/completions answers 400
    kv_cache_memory: int | float | None = None  # bytes per rank, a fraction of the available, None: default
    kv_block_size: int = 16
    kv_cache_dtype: str | None = None  # float16 / bfloat16: 16-bit keys and values (kv_format.py); None: the model's
    prefix_cache: bool = True
    adapters: tuple[str, ...] = ()  # the names of the LoRA adapters attached to the model (attach_served_adapters)
    collective_timeout: float = 300.0  # seconds a lost rank may go unnoticed (serving/liveness.py); 0: off
    heartbeat_dir: str | None = None  # the watchdog's folder (shared by the ranks: reports name them all)


def serve(model: Any, tokenizer: Any, opts: ServeOptions) -> int:
    """Serve `model` until SIGTERM; collective over the model's grid. Returns 0 (RuntimeError, after
    the other ranks have stopped, when the HTTP front end died)."""
    model.eval()
    kernels.warm_up(model.dtype)  # compiled (or loaded) now, not during the first request
    invariant = check_batch_invariance(model) if opts.batch_invariant else True  # collective
    fmt = kv_format(opts.kv_cache_dtype, model.dtype)
    blocks = kv_blocks(model, opts.kv_block_size, opts.kv_cache_memory, opts.max_batch, model.config.block_size, fmt)
    engine = Engine(model, opts.max_batch, opts.prefill_chunk, opts.eos_token_ids,
                    max_batched_tokens=opts.max_batched_tokens, batch_invariant=opts.batch_invariant,
                    kv_blocks=blocks, kv_block_size=opts.kv_block_size, prefix_cache=opts.prefix_cache,
                    tokenizer=tokenizer, kv_format=fmt)
    channel = ControlChannel(model.grid.world)
    liveness = Liveness(channel.comm, opts.collective_timeout, opts.heartbeat_dir)
    if channel.rank != 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 leads the shutdown
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        follow(engine, channel, liveness)
        liveness.stop()
        channel.free()
        return 0
    info = ModelInfo(opts.model_name, model.config.vocab_size, model.config.block_size, tokenizer,
                     kv_tokens=blocks * opts.kv_block_size, eos_token_ids=tuple(opts.eos_token_ids),
                     adapters=tuple(opts.adapters))
    metrics = ServerMetrics(opts.max_batch)
    metrics.observe_cache(engine)
    controller = Controller(engine, channel, tokenizer, metrics, opts.max_queue, opts.drain_s, liveness)
    try:
        relay = FrontendRelay(controller, FrontendConfig(opts.host, opts.port, info, opts.api_key, opts.chat_template))
    except BaseException:
        channel.send(SHUTDOWN)
        raise
    controller.flush = relay.flush
    # The relay's thread needs the GIL once per request (submit, cancel, /metrics), never per
    # token; with the default 5 ms switch interval each of those would wait up to 5 ms for
    # the engine thread's time slice.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: controller.stopping.set())
    if not invariant:
        print("warning: this machine's BLAS gives a sequence different bits alone and in a batch; "
              "greedy outputs may depend on the batch", file=sys.stderr, flush=True)
    print(f"serving {opts.model_name!r} on http://{opts.host}:{relay.port} (pid {os.getpid()}, "
          f"{channel.size} rank{'s' if channel.size > 1 else ''})", flush=True)
    try:
        controller.run()
    finally:
        relay.stop()
        liveness.stop()
    channel.free()
    if relay.lost:
        raise RuntimeError(relay.lost)
    print("server stopped", flush=True)
    sys.stdout.flush()
    return 0


def default_model_name(source: str | Path) -> str:
    path = Path(source).resolve()
    return path.parent.name if path.name.startswith("step-") else path.name
