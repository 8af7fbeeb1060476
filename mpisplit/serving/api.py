"""The OpenAI-compatible HTTP front end (starlette), run by uvicorn in the front-end process.

    POST /v1/completions   POST /v1/chat/completions   GET /v1/models   GET /health   GET /metrics
    POST /tokenize   POST /detokenize   GET /tokenizer_info   (serving/tokenize.py)

Nothing here calls MPI: a request is validated, its n choices are submitted to the engine
through the EngineLink (frontend.py), and its events come back on an asyncio queue. A client
that closes its connection cancels its sequences at once (a task waits for the disconnect
message beside the handler; starlette does the same for a stream).
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

from mpisplit.models.chat_template import ChatTemplate
from mpisplit.serving import tokenize
from mpisplit.serving.chat import ChatLayout, validate_chat
from mpisplit.serving.ipc import Choice
from mpisplit.serving.sampling import SamplingParams
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
    """The routes, bound to one engine (a frontend.EngineLink) and one model."""

    def __init__(self, link: Any, model: ModelInfo, api_key: str | None = None,
                 chat_template: ChatTemplate | None = None) -> None:
        self.link, self.model, self.api_key = link, model, api_key
        self.chat_template = chat_template
        self.created = int(time.time())

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/tokenizer_info", self.tokenizer_info, methods=["GET"]),
        ])

    def _authorise(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError("missing or wrong API key (send 'Authorization: Bearer KEY')", status=401,
                           kind="authentication_error")

    async def health(self, request: Request) -> Response:
        ok = bool(await self.link.ask("health"))
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        text = await self.link.ask("metrics")
        if text is None:
            return Response("the engine has stopped\n", status_code=503, media_type="text/plain")
        return Response(text, media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        try:
            self._authorise(request)
        except ApiError as err:
            return error_response(err)
        card = {"id": self.model.name, "object": "model", "created": self.created, "owned_by": "mpisplit",
                "max_model_len": self.model.block_size}
        adapters = [{**card, "id": name, "parent": self.model.name} for name in self.model.adapters]
        return JSONResponse({"object": "list", "data": [card, *adapters]})

    async def tokenize(self, request: Request) -> Response:
        return await self._local(request, lambda body: tokenize.tokenize(body, self.model, self.chat_template))

    async def detokenize(self, request: Request) -> Response:
        return await self._local(request, lambda body: tokenize.detokenize(body, self.model))

    async def tokenizer_info(self, request: Request) -> Response:
        return await self._local(request, lambda _: tokenize.tokenizer_info(self.model, self.chat_template), body=False)

    async def _local(self, request: Request, answer: Callable[[dict], dict], body: bool = True) -> Response:
        """A route the front end answers alone (no engine): the JSON of answer(body), or the 400."""
        try:
            self._authorise(request)
            return JSONResponse(answer(parse_body(await _read_body(request)) if body else {}))
        except ApiError as err:
            return error_response(err)

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
        choices = [Choice(prompt=p, max_tokens=req.max_tokens, sampling=choice_sampling(req.sampling, i),
                          stops=req.stops, logprobs=req.logprobs, prompt_logprobs=req.engine_prompt_logprobs)
                   for p in req.prompts for i in range(req.n)]  # choice index = prompt * n + i
        pending, status, message = await self.link.submit(choices)
        if pending is None:  # 503 stopping, 429 queue full
            kind = "rate_limit_error" if status == 429 else "server_error"
            return error_response(ApiError(message, status=status, kind=kind))
        prompts = [p for p in req.prompts for _ in range(req.n)]
        extra = {"tools": req.tools} if req.tools is not None else {}  # chat only
        name = self.model.adapters[req.sampling.adapter - 1] if req.sampling.adapter else self.model.name
        layout = layout_class(name, req.logprobs is not None,
                              echo=PromptEcho(self.model.tokenizer, prompts, req) if req.echo or req.prompt_logprobs is not None
                              else None, **extra)
        if req.stream:
            return StreamingResponse(self._stream(pending, req, layout), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._collect(request, pending, req, layout)

    async def _collect(self, request: Request, pending: Any, req: CompletionRequest, layout: Any) -> Response:
        watcher = asyncio.create_task(_put_on_disconnect(request, pending.events))
        total = len(req.prompts) * req.n
        pieces: list[list[dict]] = [[] for _ in range(total)]
        left = total
        try:
            while left:
                i, ev = await pending.events.get()
                if i is None:  # the client went away: free the slots at the next engine step
                    self.link.cancel(pending)
                    return Response(status_code=499)
                if "error" in ev:
                    self.link.cancel(pending)
                    return error_response(ApiError(ev["error"], status=ev["status"], kind="server_error"))
                pieces[i].append(ev)
                left -= ev["finish_reason"] is not None
        finally:
            watcher.cancel()
        self.link.close(pending)
        usage = _usage(req, sum(len(ev["token_ids"]) for p in pieces for ev in p))
        return JSONResponse(layout.whole(pieces, usage))

    async def _stream(self, pending: Any, req: CompletionRequest, layout: Any) -> AsyncIterator[bytes]:
        left, tokens = len(req.prompts) * req.n, 0
        try:
            for i in range(left):
                for chunk in layout.opening(i):
                    yield _sse(chunk)
            while left:
                i, ev = await pending.events.get()
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
                self.link.cancel(pending)
            else:
                self.link.close(pending)


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


class PromptEcho:
    """What a completion shows of its prompt: the text (`echo`), its logprobs in OpenAI's layout
    (echo with logprobs: the first token's entry null) and vLLM's `prompt_logprobs`."""

    def __init__(self, tokenizer: Any, prompts: list[list[int]], req: CompletionRequest) -> None:
        self.tokenizer, self.prompts = tokenizer, prompts
        self.echo, self.logprobs, self.vllm = req.echo, req.logprobs, req.prompt_logprobs

    def _text(self, token: int) -> str:
        return str(token) if self.tokenizer is None else self.tokenizer.decode([token])

    def text(self, index: int) -> str:
        return self.tokenizer.decode(self.prompts[index]) if self.echo else ""

    def openai_logprobs(self, index: int, entries: list) -> dict:
        """tokens, token_logprobs, top_logprobs and text_offset of the prompt's tokens."""
        prompt = self.prompts[index]
        tokens = [self._text(t) for t in prompt]
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        k = self.logprobs or 0
        top = [None] + [{self._text(i): w for i, w in alts[:k]} for _, _, _, alts in entries]
        return {"tokens": tokens, "token_logprobs": [None] + [v for _, v, _, _ in entries],
                "top_logprobs": top, "text_offset": offsets}

    def vllm_logprobs(self, entries: list) -> list:
        """vLLM's prompt_logprobs: null, then {id: {logprob, rank, decoded_token}} per token."""
        k = self.vllm or 0
        out: list = [None]
        for token, value, rank, alts in entries:
            entry = {str(i): {"logprob": w, "rank": r + 1, "decoded_token": self._text(i)}
                     for r, (i, w) in enumerate(alts[:k])}
            entry[str(token)] = {"logprob": value, "rank": rank, "decoded_token": self._text(token)}
            out.append(entry)
        return out


class TextLayout:
    """/v1/completions' answer and stream events (object "text_completion"); `echo`: what each
    choice shows of its prompt (PromptEcho), before its own text and logprobs."""

    def __init__(self, model: str, with_logprobs: bool, echo: PromptEcho | None = None) -> None:
        self.with_logprobs, self.echo = with_logprobs, echo
        self.head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                     "created": int(time.time()), "model": model}

    def opening(self, index: int) -> list[dict]:
        if self.echo is None or not self.echo.echo:
            return []
        return [{**self.head, "choices": [_choice(index, [], False, self.echo.text(index))]}]

    def chunks(self, ev: dict, index: int) -> list[dict]:
        return [{**self.head, "choices": [self._one(index, [ev], streamed=True)]}]

    def whole(self, pieces: list[list[dict]], usage: dict) -> dict:
        choices = [self._one(i, p, streamed=False) for i, p in enumerate(pieces)]
        return {**self.head, "choices": choices, "usage": usage}

    def _one(self, index: int, pieces: list[dict], streamed: bool) -> dict:
        e = self.echo
        text = "" if e is None or streamed else e.text(index)
        choice = _choice(index, pieces, self.with_logprobs, text)
        entries = pieces[0].get("prompt_logprobs") if pieces else None
        if e is None or entries is None:
            return choice
        if e.echo and choice["logprobs"] is not None:  # the prompt's entries first
            own, prompt = choice["logprobs"], e.openai_logprobs(index, entries)
            shift = len(e.text(index))
            own["text_offset"] = [o + shift for o in own["text_offset"]]
            choice["logprobs"] = {k: prompt[k] + own[k] for k in prompt}
        if e.vllm is not None:
            choice["prompt_logprobs"] = e.vllm_logprobs(entries)
        return choice

    def usage_chunk(self, usage: dict) -> dict:
        return {**self.head, "choices": [], "usage": usage}


def _choice(index: int, pieces: list[dict], with_logprobs: bool, echo: str = "") -> dict:
    logprobs: dict[str, list] | None = None
    if with_logprobs:
        logprobs = {k: [] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        for p in pieces:
            for k in logprobs:
                logprobs[k] += p["logprobs"][k]
    return {"index": index, "text": echo + "".join(p["text"] for p in pieces), "logprobs": logprobs,
            "finish_reason": pieces[-1]["finish_reason"] if pieces else None,
            "token_ids": [t for p in pieces for t in p["token_ids"]]}


def _usage(req: CompletionRequest, completion_tokens: int) -> dict:
    n = sum(len(p) for p in req.prompts)
    return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens}
