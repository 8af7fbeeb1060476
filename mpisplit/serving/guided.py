"""Structured output: the grammar a request asks for, and the tokens it allows at each draw.

A request names at most one constraint, in either route:

    response_format   {"type": "json_object"} (any JSON object) or {"type": "json_schema",
                      "json_schema": {"name", "schema", "strict"}}; {"type": "text"}: none
    guided_json       a JSON schema (an object, or its text)                       vLLM's fields
    guided_regex      a regular expression the whole completion matches
    guided_choice     a list of strings: the completion is one of them
    guided_grammar    a grammar in Lark or GBNF (llama.cpp's) syntax
    structured_outputs {"json" | "regex" | "choice" | "grammar": ...}: the same, vLLM's newer form

It becomes one llguidance grammar (a string), which the front end checks against the tokenizer (a
bad one is a 400 naming the field) and which travels with the request's sampling parameters.
Every rank builds the same matcher from it and, before each draw of the sequence, the same mask
(the tokens the grammar allows next): every rank then draws the same token, and no mask travels
between ranks. A step's masks are computed by a thread while the forward pass runs (llguidance
releases the GIL), so they cost the step nothing unless they take longer than the forward.

JSON is written with ", " between items and ": " after keys and no other whitespace
(llguidance's whitespace_flexible off): a small model cannot fill max_tokens with blank lines.
The completion ends ("stop") when the grammar is complete, or earlier at an end-of-sequence
token where the grammar accepts one. A completion cut by max_tokens ("length") may not parse.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from mpisplit.serving.validation import ApiError

FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
          "structured_outputs")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_GRAMMAR_CHARS = 100_000  # of a schema, regex, grammar or the choices, as JSON


def require_llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ApiError("structured output needs the llguidance package on the server: "
                       "pip install 'mpisplit[serve]'", "response_format") from None
    return llguidance


def _schema(value: Any, key: str) -> str:
    """A JSON schema given as an object or as its text, as a grammar."""
    llg = require_llguidance()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ApiError(f"'{key}' is not a JSON schema: {exc}", key) from None
    if not isinstance(value, dict):
        raise ApiError(f"'{key}' must be a JSON schema (an object), got {type(value).__name__}", key)
    try:
        return llg.LLMatcher.grammar_from_json_schema(json.dumps(value), defaults=JSON_OPTIONS)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ApiError(f"'{key}' is not a JSON schema: {exc}", key) from None


def _response_format(fmt: Any) -> str | None:
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise ApiError(f"'response_format' must be an object with a 'type', got {str(fmt)[:80]!r}",
                       "response_format")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return _schema({"type": "object"}, "response_format")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ApiError("'response_format' of type json_schema needs 'json_schema': {\"name\", \"schema\"}",
                           "response_format")
        return _schema(spec["schema"], "response_format")
    raise ApiError(f"'response_format' type must be text, json_object or json_schema, got {kind!r}",
                   "response_format")


def _text(value: Any, key: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ApiError(f"'{key}' must be a non-empty string ({what}), got {str(value)[:80]!r}", key)
    return value


def _choice(value: Any, key: str) -> str:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise ApiError(f"'{key}' must be a non-empty list of non-empty strings, got {str(value)[:80]!r}", key)
    return require_llguidance().grammar_from("choice", json.dumps(value))


def _grammar(value: Any, key: str) -> str:
    try:
        return require_llguidance().grammar_from("grammar", _text(value, key, "Lark or GBNF"))
    except ValueError as exc:
        raise ApiError(f"'{key}' is not a grammar: {exc}", key) from None


def _structured(value: Any, key: str) -> str:
    """vLLM's structured_outputs: {"json" | "regex" | "choice" | "grammar": ...}, one of them."""
    given = [k for k, v in value.items() if v is not None] if isinstance(value, dict) else []
    if len(given) != 1 or given[0] not in ("json", "regex", "choice", "grammar"):
        raise ApiError(f"'{key}' must hold one of json, regex, choice and grammar, got {str(value)[:80]!r}", key)
    return KINDS[given[0]](value[given[0]], key)


def _regex(value: Any, key: str) -> str:
    return require_llguidance().grammar_from("regex", _text(value, key, "a regular expression"))


# How each field (and each kind of structured_outputs) becomes a grammar; errors name `key`.
KINDS = {"json": _schema, "regex": _regex, "choice": _choice, "grammar": _grammar}
BY_FIELD = {"response_format": lambda value, key: _response_format(value), "guided_json": _schema,
            "guided_regex": _regex, "guided_choice": _choice, "guided_grammar": _grammar,
            "structured_outputs": _structured}


def request_grammar(body: dict, model: Any) -> str | None:
    """The llguidance grammar of a request's constraint, checked against the served model's
    tokenizer (`model` a validation.ModelInfo), or None when it asks for none."""
    plain = isinstance(body.get("response_format"), dict) and body["response_format"].get("type") == "text"
    given = [k for k in FIELDS if body.get(k) is not None and not (k == "response_format" and plain)]
    if len(given) > 1:
        raise ApiError(f"give at most one of {', '.join(given)}", given[1])
    if not given:
        return None
    key = given[0]
    try:
        size = len(json.dumps(body[key]))
    except RecursionError:
        raise ApiError(f"'{key}' is nested too deeply", key) from None
    if size > MAX_GRAMMAR_CHARS:
        raise ApiError(f"'{key}' is longer than {MAX_GRAMMAR_CHARS} characters", key)
    grammar = BY_FIELD[key](body[key], key)
    if grammar is None:
        return None
    if model.tokenizer is None:
        raise ApiError(f"'{key}' needs a tokenizer; this model takes and gives token ids only", key)
    tokenizer = grammar_tokenizer(model.tokenizer, model.vocab_size, model.eos_token_ids)
    error = require_llguidance().LLMatcher.validate_grammar(grammar, tokenizer.ll)
    if error:
        raise ApiError(f"'{key}' cannot be used: {error}", key)
    return grammar


class GrammarTokenizer:
    """A tokenizer (HFTokenizer or CharTokenizer) as llguidance sees it, for a model of
    `vocab_size` rows that ends at `eos_ids`. Built once per process (about 0.3 s for 50k tokens)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: tuple[int, ...]) -> None:
        llg = require_llguidance()
        self.vocab_size = vocab_size
        self.known = min(vocab_size, int(tokenizer.vocab_size))  # ids the tokenizer has
        eos = list(eos_ids) or None
        inner = getattr(tokenizer, "tokenizer", None)
        if inner is not None and hasattr(inner, "to_str"):  # HFTokenizer: the `tokenizers` JSON
            self.ll = llg.LLTokenizer(inner.to_str(), n_vocab=vocab_size, eos_token=eos)
        else:
            self.ll = llg.LLTokenizer(llg.TokenizerWrapper(_Chars(tokenizer, eos)), eos_token=eos)
        self.words = (self.ll.vocab_size + 31) // 32  # int32 words of one mask

    def allowed(self, mask: np.ndarray) -> np.ndarray:
        """A mask (int32 words, bit i of word i // 32 set: token i allowed) as booleans over the
        model's vocabulary (ids beyond the tokenizer's are never allowed)."""
        bits = np.unpackbits(np.ascontiguousarray(mask).view(np.uint8), bitorder="little")
        out = np.zeros(self.vocab_size, dtype=bool)
        out[: self.known] = bits[: self.known].astype(bool)
        return out


_BUILT: dict[tuple[int, int, tuple[int, ...]], tuple[Any, GrammarTokenizer]] = {}


def grammar_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: tuple[int, ...]) -> GrammarTokenizer:
    """The GrammarTokenizer of a tokenizer, built on first use and kept."""
    key = (id(tokenizer), vocab_size, tuple(eos_ids))
    if key not in _BUILT or _BUILT[key][0] is not tokenizer:
        _BUILT[key] = (tokenizer, GrammarTokenizer(tokenizer, vocab_size, tuple(eos_ids)))
    return _BUILT[key][1]


class _Chars:
    """A character tokenizer in the shape llguidance's TokenizerWrapper reads."""

    def __init__(self, tokenizer: Any, eos: list[int] | None) -> None:
        self.tokenizer = tokenizer
        self.tokens = [c.encode("utf-8") for c in tokenizer.chars]
        self.eos_token_id, self.bos_token_id = (eos[0] if eos else None), None

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return [int(i) for i in self.tokenizer.encode(text)]


class Guide:
    """One sequence's matcher: what it allows next, the tokens it has taken."""

    def __init__(self, tokenizer: GrammarTokenizer, grammar: str) -> None:
        llg = require_llguidance()
        self.tokenizer = tokenizer
        self.matcher = llg.LLMatcher(tokenizer.ll, grammar, log_level=0)

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None

    @property
    def complete(self) -> bool:
        """Nothing more can follow: the sequence ends here."""
        return bool(self.matcher.is_stopped())

    def take(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise ValueError(f"the grammar refused token {token}: {self.matcher.get_error()}")


class MaskWorker:
    """The masks of a step's guided draws, computed in a thread while the forward pass runs:
    `start(guides)` before it, `result()` (rows of int32 words, in the order given) after."""

    def __init__(self) -> None:
        llg = require_llguidance()
        self._executor = llg.LLExecutor(num_threads=1)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpisplit-masks")
        self._future: Future | None = None

    def start(self, guides: list[Guide]) -> None:
        import llguidance.numpy as lln

        words = guides[0].tokenizer.words
        masks = np.zeros((len(guides), words), dtype=np.int32)
        pairs = [(g.matcher, i) for i, g in enumerate(guides)]

        def fill() -> np.ndarray:
            lln.fill_next_token_bitmask_par(self._executor, pairs, masks)
            return masks

        self._future = self._thread.submit(fill)

    def result(self) -> np.ndarray:
        assert self._future is not None, "start() first"
        future, self._future = self._future, None
        return future.result()

    def close(self) -> None:
        self._thread.shutdown(wait=True)
