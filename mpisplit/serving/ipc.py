"""The socket between rank 0's engine process and the HTTP front-end process: UTF-8 JSON
messages (no pickle), each framed by its length (8 bytes, little-endian). A message is a JSON
array whose first item names its kind; `frame` and `recv`/`read` turn the typed fields of a
kind (Choice, FrontendConfig, bytes) into JSON and back, and give every message as a tuple.

    engine -> front end   ("config", FrontendConfig)       the first message
                          ("ack", key, status, message)     200 accepted, 429 queue full, 503 stopping
                          ("events", [(key, index, event), ...])   one engine step's events, in order
                          ("answer", qid, value)            to an "ask" (metrics: bytes; health: bool)
                          ("stop",)                         close the listening socket and exit
    front end -> engine   ("started", port) or ("failed", message)   once, the answer to "config"
                          ("submit", key, [Choice, ...])   one request's n choices, all or none
                          ("cancel", key)                   the client went away (or a choice failed)
                          ("ask", qid, "metrics" | "health")

One message per engine step carries every token of that step: the front end wakes once a
step, not once a token.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpisplit.serving.sampling import SamplingParams
from mpisplit.serving.validation import ModelInfo

HEADER_BYTES = 8


@dataclass(frozen=True)
class Choice:
    """One of a request's n sequences, as the front end validated it."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stops: list[str]
    logprobs: int | None
    prompt_logprobs: int | None = None  # top alternatives per prompt token (echo with logprobs)

    def to_json(self) -> dict:
        return {"prompt": list(self.prompt), "max_tokens": self.max_tokens, "sampling": self.sampling.to_json(),
                "stops": list(self.stops), "logprobs": self.logprobs, "prompt_logprobs": self.prompt_logprobs}

    @classmethod
    def from_json(cls, d: dict) -> Choice:
        return cls(d["prompt"], d["max_tokens"], SamplingParams.from_json(d["sampling"]), d["stops"], d["logprobs"],
                   d.get("prompt_logprobs"))


@dataclass
class FrontendConfig:
    """What the front-end process needs: the served model's facts with its tokenizer (as the
    text the tokenizer serialises to) and the chat template (as its source)."""

    host: str
    port: int
    model: ModelInfo
    api_key: str | None = None
    chat_template: Any = None

    def to_json(self) -> dict:
        m, t = self.model, self.chat_template
        return {"host": self.host, "port": self.port, "api_key": self.api_key,
                "model": {"name": m.name, "vocab_size": m.vocab_size, "block_size": m.block_size,
                          "kv_tokens": m.kv_tokens, "eos_token_ids": list(m.eos_token_ids),
                          "adapters": list(m.adapters), "tokenizer": _tokenizer_to_json(m.tokenizer)},
                "chat_template": None if t is None else
                {"source": t.source, "special_tokens": t.special_tokens, "origin": t.origin}}

    @classmethod
    def from_json(cls, d: dict) -> FrontendConfig:
        m, t = d["model"], d["chat_template"]
        model = ModelInfo(m["name"], m["vocab_size"], m["block_size"], _tokenizer_from_json(m["tokenizer"]),
                          kv_tokens=m["kv_tokens"], eos_token_ids=tuple(m["eos_token_ids"]),
                          adapters=tuple(m["adapters"]))
        if t is not None:
            from mpisplit.models.chat_template import ChatTemplate

            t = ChatTemplate(t["source"], t["special_tokens"], t["origin"])
        return cls(d["host"], d["port"], model, d["api_key"], t)


def _tokenizer_to_json(tok: Any) -> dict | None:
    from mpisplit.models.hf_tokenizer import HFTokenizer
    from mpisplit.training.data import CharTokenizer

    if tok is None:
        return None
    if isinstance(tok, CharTokenizer):
        return {"chars": tok.chars}
    if isinstance(tok, HFTokenizer):
        return {"tokenizer_json": tok.tokenizer.to_str(), "source": tok.source}
    raise TypeError(f"a {type(tok).__name__} cannot be sent to the front end")


def _tokenizer_from_json(d: dict | None) -> Any:
    if d is None:
        return None
    if "chars" in d:
        from mpisplit.training.data import CharTokenizer

        return CharTokenizer(d["chars"])
    import tokenizers

    from mpisplit.models.hf_tokenizer import HFTokenizer

    return HFTokenizer(tokenizers.Tokenizer.from_str(d["tokenizer_json"]), d["source"])


def _plain(value: Any) -> Any:
    """NumPy scalars (a token id, a logprob) as the Python numbers JSON takes."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a {type(value).__name__} is not part of a front-end message")


def _encode(message: tuple) -> list:
    kind, *fields = message
    if kind == "config":
        fields = [fields[0].to_json()]
    elif kind == "submit":
        fields = [fields[0], [c.to_json() for c in fields[1]]]
    elif kind == "answer" and isinstance(fields[1], bytes):
        fields = [fields[0], {"bytes": base64.b64encode(fields[1]).decode("ascii")}]
    return [kind, *fields]


def _decode(body: bytes) -> tuple:
    kind, *fields = json.loads(body.decode("utf-8"))
    if kind == "config":
        fields = [FrontendConfig.from_json(fields[0])]
    elif kind == "submit":
        fields = [fields[0], [Choice.from_json(c) for c in fields[1]]]
    elif kind == "answer" and isinstance(fields[1], dict):
        fields = [fields[0], base64.b64decode(fields[1]["bytes"])]
    return (kind, *fields)


def frame(message: tuple) -> bytes:
    body = json.dumps(_encode(message), default=_plain, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return len(body).to_bytes(HEADER_BYTES, "little") + body


def send(sock: socket.socket, message: Any) -> None:
    """Blocking send of one message (callers that share `sock` hold a lock)."""
    sock.sendall(frame(message))


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> tuple:
    """Blocking receive of one message; EOFError when the other end has closed (ConnectionError
    when it closed with data of ours unread)."""
    header = _read_exactly(sock, HEADER_BYTES)
    body = None if header is None else _read_exactly(sock, int.from_bytes(header, "little"))
    if body is None:
        raise EOFError("the other end of the front-end socket closed it")
    return _decode(body)


async def read(reader: asyncio.StreamReader) -> tuple:
    """The next message from an asyncio stream; EOFError when the other end has closed."""
    try:
        header = await reader.readexactly(HEADER_BYTES)
        body = await reader.readexactly(int.from_bytes(header, "little"))
    except (asyncio.IncompleteReadError, ConnectionError):  # closed; reset when it left data unread
        raise EOFError("the other end of the front-end socket closed it") from None
    return _decode(body)
