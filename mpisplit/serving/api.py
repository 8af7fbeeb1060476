"""The OpenAI-compatible HTTP front end (starlette), run by uvicorn in a thread of rank 0.

    POST /v1/completions   POST /v1/chat/completions   GET /v1/models   GET /health   GET /metrics

Nothing here calls MPI: a request is validated, handed to the Controller (n choices: n
sequences), and its events come back through an asyncio queue fed from the engine thread. A
client that closes its connection cancels its sequences at once (a task waits for the
disconnect message beside the handler; starlette does the same for a stream).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mpisplit.serving.chat import ChatLayout, validate_chat
from mpisplit.serving.controller import Controller, Submission
from mpisplit.serving.sampling import SamplingParams
from mpisplit.serving.templates import ChatTemplate
from mpisplit.serving.validation import (
    ApiError,
    CompletionRequest,
    ModelInfo,
    parse_body,
    validate_completion,
)

MAX_BODY_BYTES = 1 << 20


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(f"the request body has {declared} bytes; the limit is {MAX_BODY_BYTES}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class CompletionsApp:
    """The routes, bound to one controller and one model."""

    def __init__(self, controller: Controller, model: ModelInfo, api_key: str | None = None,
                 chat_template: ChatTemplate | None = None) -> None:
        self.controller, self.model, self.api_key = controller, model, api_key
        self.chat_template = chat_template
        self.created = int(time.time())

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ])

    def _authorise(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError("missing or wrong API key (send 'Authorization: Bearer KEY')", status=401,
                           kind="authentication_error")

    async def health(self, request: Request) -> Response:
        ok = self.controller.alive and not self.controller.stopping.is_set()
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(self.controller.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        try:
            self._authorise(request)
        except ApiError as err:
            return error_response(err)
        card = {"id": self.model.name, "object": "model", "created": self.created, "owned_by": "mpisplit",
                "max_model_len": self.model.block_size}
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, lambda body: validate_completion(body, self.model), TextLayout)

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(
            request, lambda body: validate_chat(body, self.model, self.chat_template), ChatLayout)

    async def _complete(self, request: Request, validate: Callable[[dict], CompletionRequest],
                        layout_class: type) -> Response:
        """Validate, submit n sequences and answer in `layout_class`'s layout (TextLayout, ChatLayout)."""
        try:
            self._authorise(request)
            req = validate(parse_body(await _read_body(request)))
        except ApiError as err:
            return error_response(err)
        if req.ignored:
            print(f"warning: fields ignored in a request: {', '.join(req.ignored)}", file=sys.stderr, flush=True)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        subs = [Submission(
            prompt=req.prompt, max_tokens=req.max_tokens, sampling=choice_sampling(req.sampling, i),
            stops=req.stops, logprobs=req.logprobs,
            sink=lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev)),
        ) for i in range(req.n)]
        if not self.controller.alive or self.controller.stopping.is_set():
            return error_response(ApiError("the server is shutting down", status=503, kind="server_error"))
        if not self.controller.submit_all(subs):
            return error_response(ApiError(
                f"the queue is full ({self.controller.max_queue} requests waiting); retry later",
                status=429, kind="rate_limit_error"))
        echo = self.model.tokenizer.decode(req.prompt) if req.echo else ""
        layout = layout_class(self.model.name, req.logprobs is not None, echo=echo)
        if req.stream:
            return StreamingResponse(self._stream(subs, req, layout, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._collect(request, subs, req, layout, events)

    def _cancel(self, subs: list[Submission]) -> None:
        for sub in subs:
            self.controller.cancel(sub.rid)

    async def _collect(self, request: Request, subs: list[Submission], req: CompletionRequest, layout: Any,
                       events: asyncio.Queue) -> Response:
        watcher = asyncio.create_task(_put_on_disconnect(request, events))
        pieces: list[list[dict]] = [[] for _ in subs]
        left = len(subs)
        try:
            while left:
                i, ev = await events.get()
                if i is None:  # the client went away: free the slots at the next engine step
                    self._cancel(subs)
                    return Response(status_code=499)
                if "error" in ev:
                    self._cancel(subs)
                    return error_response(ApiError(ev["error"], status=ev["status"], kind="server_error"))
                pieces[i].append(ev)
                left -= ev["finish_reason"] is not None
        finally:
            watcher.cancel()
        usage = _usage(req, sum(len(ev["token_ids"]) for p in pieces for ev in p))
        return JSONResponse(layout.whole(pieces, usage))

    async def _stream(self, subs: list[Submission], req: CompletionRequest, layout: Any,
                      events: asyncio.Queue) -> AsyncIterator[bytes]:
        left, tokens = len(subs), 0
        try:
            for i in range(len(subs)):
                for chunk in layout.opening(i):
                    yield _sse(chunk)
            while left:
                i, ev = await events.get()
                if "error" in ev:
                    err = ApiError(ev["error"], status=ev["status"], kind="server_error")
                    yield _sse(err.body())
                    break
                tokens += len(ev["token_ids"])
                left -= ev["finish_reason"] is not None
                for chunk in layout.chunks(ev, i):
                    yield _sse(chunk)
            if not left and req.include_usage:
                yield _sse(layout.usage_chunk(_usage(req, tokens)))
            yield b"data: [DONE]\n\n"
        finally:
            if left:  # the client went away (or a choice failed): free the slots
                self._cancel(subs)


async def _put_on_disconnect(request: Request, events: asyncio.Queue) -> None:
    """Wait for the client to close the connection (the body is read: the next ASGI message
    is the disconnect), then wake the waiting handler at once."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    events.put_nowait((None, None))


def choice_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    """Choice `index` of n draws with seed + index (mod 2^63): each reproducible, all different."""
    return replace(sampling, seed=(sampling.seed + index) % 2**63)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class TextLayout:
    """/v1/completions' answer and stream events (object "text_completion"); `echo`: the
    prompt's text, before each choice's."""

    def __init__(self, model: str, with_logprobs: bool, echo: str = "") -> None:
        self.with_logprobs, self.echo = with_logprobs, echo
        self.head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                     "created": int(time.time()), "model": model}

    def opening(self, index: int) -> list[dict]:
        return [{**self.head, "choices": [_choice(index, [], False, self.echo)]}] if self.echo else []

    def chunks(self, ev: dict, index: int) -> list[dict]:
        return [{**self.head, "choices": [_choice(index, [ev], self.with_logprobs)]}]

    def whole(self, pieces: list[list[dict]], usage: dict) -> dict:
        choices = [_choice(i, p, self.with_logprobs, self.echo) for i, p in enumerate(pieces)]
        return {**self.head, "choices": choices, "usage": usage}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self.head, "choices": [], "usage": usage}


def _choice(index: int, pieces: list[dict], with_logprobs: bool, echo: str = "") -> dict:
    logprobs = None
    if with_logprobs:
        logprobs = {k: [] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        for p in pieces:
            for k in logprobs:
                logprobs[k] += p["logprobs"][k]
    return {"index": index, "text": echo + "".join(p["text"] for p in pieces), "logprobs": logprobs,
            "finish_reason": pieces[-1]["finish_reason"] if pieces else None,
            "token_ids": [t for p in pieces for t in p["token_ids"]]}


def _usage(req: CompletionRequest, completion_tokens: int) -> dict:
    n = len(req.prompt)
    return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens}
