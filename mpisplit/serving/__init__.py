"""Serving: the engine loop every rank runs and the OpenAI-compatible front end on rank 0.

    engine.py      sequences in the paged KV cache, one batched step at a time (replicated state)
    blocks.py      block tables, reference counts and the prefix cache; kv_pool.py the blocks' memory
    batch.py       the forward pass over many sequences, attention over each one's blocks
    channel.py     rank 0's header + payload broadcasts, waited for without spinning
    controller.py  rank 0's scheduling, text, stop strings and logprobs; the follower loop
    api.py         the HTTP routes (starlette), validation.py their input checks
    frontend.py    the process that runs them (uvicorn); relay.py its other end on rank 0;
                   ipc.py the messages between the two (one per engine step carries its tokens)
    server.py      the whole server on every rank; loading.py, sampling.py, text.py, metrics.py

Imports models/ and training/ (checkpoints, tokenizers) and below; cli/serve.py drives it.
The HTTP libraries (starlette, uvicorn, prometheus-client) are the `serve` extra.
"""
