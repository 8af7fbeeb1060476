"""Checking a completion request's JSON before anything reaches the engine.

Each failure is an ApiError naming the field, the value and the limit; the HTTP layer turns
it into {"error": {"message", "type", "param"}} with its status (400 unless said otherwise).
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from typing import Any

from mpisplit.serving.sampling import SamplingParams

MAX_LOGPROBS = 20
MAX_STOPS = 16
IGNORED_WHEN_DEFAULT = {"frequency_penalty": 0, "presence_penalty": 0, "best_of": 1, "echo": False}


class ApiError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know of the served model."""

    name: str
    vocab_size: int
    block_size: int
    tokenizer: Any  # encode/decode, or None: token ids only


@dataclass
class CompletionRequest:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stops: list[str]
    logprobs: int | None
    stream: bool
    include_usage: bool


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _integer(body: dict, key: str, default: Any, low: int | None = None, high: int | None = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"'{key}' must be an integer, got {value!r}", key)
    if low is not None and value < low:
        raise ApiError(f"'{key}' must be >= {low}, got {value}", key)
    if high is not None and value > high:
        raise ApiError(f"'{key}' must be <= {high}, got {value}", key)
    return value


def _number(body: dict, key: str, default: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(f"'{key}' must be a number, got {value!r}", key)
    return float(value)


def _prompt(body: dict, model: ModelInfo) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise ApiError("this model has no tokenizer: send 'prompt' as a list of token ids", "prompt")
        try:
            ids = [int(i) for i in model.tokenizer.encode(prompt)]
        except ValueError as exc:
            raise ApiError(f"'prompt' cannot be encoded: {exc}", "prompt") from None
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < model.vocab_size]
        if bad:
            raise ApiError(f"'prompt' token id {bad[0]} is outside [0, {model.vocab_size})", "prompt")
    else:
        raise ApiError(f"'prompt' must be a string or a list of token ids, got {type(prompt).__name__}", "prompt")
    if not ids:
        raise ApiError("'prompt' is empty (it must have at least one token)", "prompt")
    return ids


def _stops(body: dict, model: ModelInfo) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(f"'stop' must be a non-empty string or a list of them, got {stop!r}", "stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(f"'stop' has {len(stops)} strings; at most {MAX_STOPS}", "stop")
    if model.tokenizer is None:
        raise ApiError("'stop' needs a tokenizer; this model takes and gives token ids only", "stop")
    return stops


def _sampling(body: dict) -> SamplingParams:
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise ApiError(f"'temperature' must be >= 0, got {temperature}", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise ApiError(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    top_k = _integer(body, "top_k", None)
    if top_k is not None and top_k != -1 and top_k < 1:
        raise ApiError(f"'top_k' must be >= 1 (or -1 for all tokens), got {top_k}", "top_k")
    seed = _integer(body, "seed", None, low=0, high=2**63 - 1)
    seed = secrets.randbits(63) if seed is None else seed
    return SamplingParams(temperature=temperature, top_k=None if top_k in (None, -1) else top_k,
                          top_p=top_p, seed=seed)


def _unsupported(body: dict) -> None:
    n = _integer(body, "n", 1)
    if n != 1:
        raise ApiError(f"'n' must be 1 (one choice per request), got {n}", "n")
    for key, default in IGNORED_WHEN_DEFAULT.items():
        if body.get(key, default) not in (default, None):
            raise ApiError(f"'{key}' is not supported (only {default!r}), got {body[key]!r}", key)


def validate_completion(body: dict, model: ModelInfo) -> CompletionRequest:
    """The request as the engine takes it, or ApiError."""
    name = body.get("model")
    if name is not None and name != model.name:
        raise ApiError(f"model {name!r} is not served here; this server serves {model.name!r}", "model")
    _unsupported(body)
    prompt = _prompt(body, model)
    max_tokens = _integer(body, "max_tokens", 16, low=1)
    if len(prompt) + max_tokens > model.block_size:
        raise ApiError(
            f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) is {len(prompt) + max_tokens} "
            f"tokens; the model's context is {model.block_size}", "max_tokens",
        )
    logprobs = _integer(body, "logprobs", None, low=0, high=MAX_LOGPROBS)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(f"'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(f"'stream_options' must be an object, got {options!r}", "stream_options")
    return CompletionRequest(
        prompt=prompt, max_tokens=max_tokens, sampling=_sampling(body), stops=_stops(body, model),
        logprobs=logprobs, stream=stream, include_usage=bool(options.get("include_usage", False)),
    )
