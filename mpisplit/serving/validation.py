"""Checking a completion request's JSON before anything reaches the engine.

Each failure is an ApiError naming the field, the value and the limit; the HTTP layer turns
it into {"error": {"message", "type", "param"}} with its status (400 unless said otherwise).
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, replace
from typing import Any

from mpisplit.serving.sampling import SamplingParams

MAX_LOGPROBS = 20
MAX_STOPS = 16
MAX_STOP_TOKEN_IDS = 64
MAX_N = 16
MAX_CHOICES = 64  # prompts x n in one request
MAX_PROMPTS = 64  # prompts in one request (each answered by n choices)
MAX_LOGIT_BIAS = 1024  # entries
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's
PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's presence_penalty and frequency_penalty
REPETITION_RANGE = (0.01, 100.0)  # |logit| * 100 stays finite
# The request fields of /v1/completions this server reads (OpenAI's and vLLM's sampling extras).
COMPLETION_FIELDS = frozenset({
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens",
    "n", "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p",
    "user", "top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids", "min_tokens",
    "prompt_logprobs", "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "structured_outputs",
})
# vLLM's fields that change the output and that this server does not implement: refused unless
# they hold their default (a field nobody knows is ignored, as vLLM ignores it, and logged).
REFUSED_UNLESS_DEFAULT: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""), "use_beam_search": (False,), "length_penalty": (1, 1.0),
    "include_stop_str_in_output": (False,), "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,), "truncate_prompt_tokens": (None,),
    "allowed_token_ids": (None,), "bad_words": (None, []), "logits_processors": (None,),
}


class HugeInteger:
    """A JSON integer with more digits than Python converts (its int-string limit): kept as
    text so that validation can name its field instead of the parser failing the whole body."""

    def __init__(self, digits: str) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {len(self.digits.lstrip('-'))} digits>"


def _parse_int(text: str) -> int | HugeInteger:
    try:
        return int(text)
    except ValueError:
        return HugeInteger(text)


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
    kv_tokens: int | None = None  # the most positions the KV cache holds for one sequence
    eos_token_ids: tuple[int, ...] = ()  # where a sequence ends (GET /tokenizer_info tells them)
    adapters: tuple[str, ...] = ()  # the served LoRA adapters' names (`serve --lora NAME=FOLDER`)

    def adapter(self, name: Any) -> int:
        """0 for the base model (its name, or no "model" field), k for the k-th adapter; ApiError
        (400 naming the field, as for any other bad field) otherwise."""
        if name is None or name == self.name:
            return 0
        if isinstance(name, str) and name in self.adapters:
            return self.adapters.index(name) + 1
        served = ", ".join(repr(n) for n in (self.name, *self.adapters))
        raise ApiError(f"model {name!r} is not served here; this server serves {served}", "model")

    @property
    def limit(self) -> int:
        """The most tokens (prompt + completion) one request may have."""
        return self.block_size if self.kv_tokens is None else min(self.block_size, self.kv_tokens)

    def limit_text(self) -> str:
        if self.limit < self.block_size:
            return (f"the KV cache holds {self.limit} positions a sequence (--kv-cache-memory; "
                    f"the model's context is {self.block_size})")
        return f"the model's context is {self.block_size}"


@dataclass
class CompletionRequest:
    prompts: list[list[int]]  # one or more (a list of strings or of id lists): n choices each
    max_tokens: int
    sampling: SamplingParams
    stops: list[str]
    logprobs: int | None
    stream: bool
    include_usage: bool
    n: int = 1
    echo: bool = False
    ignored: tuple[str, ...] = ()  # unknown fields, ignored as vLLM ignores them
    prompt_logprobs: int | None = None  # vLLM's field: each prompt token's logprob and its top ones
    tools: Any = None  # a tools.ToolSpec: chat answers read tool calls out of the text

    @property
    def prompt(self) -> list[int]:
        return self.prompts[0]

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """The top alternatives the engine keeps per prompt token (echo with logprobs, or
        prompt_logprobs), or None: the prompt's logprobs are not computed."""
        wanted = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs) if k is not None]
        return max(wanted) if wanted else None


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw, parse_int=_parse_int)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # the decoder recurses once per level of nesting
        raise ApiError("the request body is nested too deeply to be a request") from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
    _check_text(body)
    return body


def _check_text(body: dict) -> None:
    """ApiError naming the top-level field of the first string (or key) that is not Unicode
    text: JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer and no UTF-8
    response can carry (the message does not quote it, or the error itself could not be sent)."""
    stack: list[tuple[Any, str | None]] = [(body, None)]
    while stack:
        value, field = stack.pop()
        texts: list[Any] = [value]
        if isinstance(value, dict):
            texts = list(value.keys())
            stack.extend((v, k if field is None else field) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, field) for v in value)
            continue
        for text in texts:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    where = "a field name" if text is not value else (f"'{field}'" if field else "a value")
                    raise ApiError(f"{where} holds a lone surrogate (character {exc.start}): not Unicode text",
                                   field if isinstance(field, str) and field.isascii() else None) from None


def _integer(body: dict, key: str, default: Any, low: int | None = None, high: int | None = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, HugeInteger):
        limit = f"in [{low}, {high}]" if low is not None and high is not None else "a smaller integer"
        raise ApiError(f"'{key}' must be {limit}, got {value!r}", key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"'{key}' must be an integer, got {value!r}", key)
    if low is not None and value < low:
        raise ApiError(f"'{key}' must be >= {low}, got {value}", key)
    if high is not None and value > high:
        raise ApiError(f"'{key}' must be <= {high}, got {value}", key)
    return value


def _as_float(value: Any, key: str) -> float:
    """A finite JSON number as a float, or ApiError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(f"'{key}' must be a number, got {value!r}", key)
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise ApiError(f"'{key}' must be a finite number, got {value!r}", key)
    return out


def _number(body: dict, key: str, default: float, low: float | None = None, high: float | None = None) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    out = _as_float(value, key)
    if (low is not None and out < low) or (high is not None and out > high):
        limit = f"in [{low}, {high}]" if low is not None and high is not None else (
            f">= {low}" if low is not None else f"<= {high}")
        raise ApiError(f"'{key}' must be {limit}, got {value!r}", key)
    return out


def _boolean(body: dict, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(f"'{key}' must be true or false, got {value!r}", key)
    return value


def _prompts(body: dict, model: ModelInfo) -> list[list[int]]:
    """'prompt' as token id lists: a string or an id list is one prompt; a list of strings or of
    id lists is several (one choice per prompt, times n, in order)."""
    prompt = body.get("prompt")
    many = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)
    items: list[Any] = list(prompt) if isinstance(prompt, list) and many else [prompt]
    if len(items) > MAX_PROMPTS:
        raise ApiError(f"'prompt' holds {len(items)} prompts; at most {MAX_PROMPTS} in one request", "prompt")
    return [_one_prompt(p, model) for p in items]


def _one_prompt(prompt: Any, model: ModelInfo) -> list[int]:
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


def _token_ids(value: Any, key: str, vocab_size: int, limit: int) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ApiError(f"'{key}' must be a list of token ids, got {value!r}", key)
    if len(value) > limit:
        raise ApiError(f"'{key}' has {len(value)} ids; at most {limit}", key)
    bad = [t for t in value if not 0 <= t < vocab_size]
    if bad:
        raise ApiError(f"'{key}' token id {bad[0]} is outside [0, {vocab_size})", key)
    return tuple(dict.fromkeys(value))


def _logit_bias(body: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as (id, bias) pairs, ids ascending."""
    raw = body.get("logit_bias")
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ApiError(f"'logit_bias' must be an object of token id -> bias, got {raw!r}", "logit_bias")
    if len(raw) > MAX_LOGIT_BIAS:
        raise ApiError(f"'logit_bias' has {len(raw)} entries; at most {MAX_LOGIT_BIAS}", "logit_bias")
    out: dict[int, float] = {}
    for key, value in raw.items():
        tid = int(key) if key.isascii() and key.isdigit() and len(key) <= 12 else -1
        if not 0 <= tid < vocab_size:
            raise ApiError(f"'logit_bias' key {key[:40]!r} is not a token id in [0, {vocab_size})", "logit_bias")
        bias = _as_float(value, "logit_bias")
        if not LOGIT_BIAS_RANGE[0] <= bias <= LOGIT_BIAS_RANGE[1]:
            raise ApiError(f"'logit_bias' of token {tid} must be in {list(LOGIT_BIAS_RANGE)}, got {value!r}",
                           "logit_bias")
        out[tid] = bias
    return tuple(sorted(out.items()))


def sampling_params(body: dict, vocab_size: int, max_tokens: int) -> SamplingParams:
    """Every sampling field of a completion (or chat) request, checked; the seed drawn when absent."""
    temperature = _number(body, "temperature", 1.0, low=0.0)
    top_p = _number(body, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise ApiError(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    top_k = _integer(body, "top_k", None)
    if top_k is not None and top_k != -1 and top_k < 1:
        raise ApiError(f"'top_k' must be >= 1 (or -1 for all tokens), got {top_k}", "top_k")
    seed = _integer(body, "seed", None, low=0, high=2**63 - 1)
    seed = secrets.randbits(63) if seed is None else seed
    stop_token_ids = _token_ids(body.get("stop_token_ids"), "stop_token_ids", vocab_size, MAX_STOP_TOKEN_IDS)
    min_tokens = _integer(body, "min_tokens", 0, low=0, high=max_tokens)
    return SamplingParams(
        temperature=temperature, top_k=None if top_k in (None, -1) else top_k, top_p=top_p,
        min_p=_number(body, "min_p", 0.0, low=0.0, high=1.0), seed=seed, logit_bias=_logit_bias(body, vocab_size),
        presence_penalty=_number(body, "presence_penalty", 0.0, *PENALTY_RANGE),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, *PENALTY_RANGE),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, *REPETITION_RANGE),
        ignore_eos=_boolean(body, "ignore_eos", False), stop_token_ids=stop_token_ids, min_tokens=min_tokens,
    )


def choice_count(body: dict) -> int:
    """`n` (with `best_of`, which may only repeat it: no choices are drawn to be thrown away)."""
    n = _integer(body, "n", 1, low=1, high=MAX_N)
    best_of = _integer(body, "best_of", None)
    if best_of is not None and best_of != n:
        raise ApiError(f"'best_of' must equal 'n' ({n}): choices are not ranked, got {best_of}", "best_of")
    return n


def unknown_fields(body: dict, known: frozenset[str]) -> tuple[str, ...]:
    """Refuse the fields this server knows but does not implement (unless at their default);
    return the names of the fields nobody knows (ignored, as vLLM ignores them)."""
    for key, defaults in REFUSED_UNLESS_DEFAULT.items():
        if key in body and not any(body[key] == d and type(body[key]) is type(d) for d in defaults):
            raise ApiError(f"'{key}' is not supported (only {defaults[0]!r}), got {body[key]!r}", key)
    return tuple(sorted(k for k in body if k not in known and k not in REFUSED_UNLESS_DEFAULT))


def validate_completion(body: dict, model: ModelInfo) -> CompletionRequest:
    """The request as the engine takes it, or ApiError."""
    adapter = model.adapter(body.get("model"))
    ignored = unknown_fields(body, COMPLETION_FIELDS)
    n = choice_count(body)
    prompts = _prompts(body, model)
    if len(prompts) * n > MAX_CHOICES:
        raise ApiError(f"{len(prompts)} prompts x n={n} is {len(prompts) * n} choices; at most {MAX_CHOICES}", "n")
    max_tokens = _integer(body, "max_tokens", 16, low=1, high=model.limit)
    longest = max(len(p) for p in prompts)
    if longest + max_tokens > model.limit:
        raise ApiError(
            f"the prompt ({longest} tokens) plus max_tokens ({max_tokens}) is {longest + max_tokens} "
            f"tokens; {model.limit_text()}", "max_tokens",
        )
    logprobs = _integer(body, "logprobs", None, low=0, high=MAX_LOGPROBS)
    prompt_logprobs = _integer(body, "prompt_logprobs", None, low=0, high=MAX_LOGPROBS)
    echo = _boolean(body, "echo", False)
    if echo and model.tokenizer is None:
        raise ApiError("'echo' needs a tokenizer; this model takes and gives token ids only", "echo")
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(f"'stream_options' must be an object, got {options!r}", "stream_options")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(f"'user' must be a string, got {user!r}", "user")
    from mpisplit.serving.guided import request_grammar

    sampling = replace(sampling_params(body, model.vocab_size, max_tokens), grammar=request_grammar(body, model),
                       adapter=adapter)
    return CompletionRequest(
        prompts=prompts, max_tokens=max_tokens, sampling=sampling,
        stops=_stops(body, model), logprobs=logprobs, stream=stream,
        include_usage=bool(options.get("include_usage", False)), n=n, echo=echo, ignored=ignored,
        prompt_logprobs=prompt_logprobs,
    )
