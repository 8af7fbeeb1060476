"""The socket between rank 0's engine process and the HTTP front-end process: pickled
messages, each framed by its length (8 bytes, little-endian).

    engine -> front end   ("config", FrontendConfig)       the first message
                          ("ack", key, status, message)     200 accepted, 429 queue full, 503 stopping
                          ("events", [(key, index, event), ...])   one engine step's events, in order
                          ("answer", qid, value)            to an "ask"
                          ("stop",)                         close the listening socket and exit
    front end -> engine   ("started", port) or ("failed", message)   once, the answer to "config"
                          ("submit", key, [Choice, ...])   one request's n choices, all or none
                          ("cancel", key)                   the client went away (or a choice failed)
                          ("ask", qid, "metrics" | "health")

Both ends are this library's own processes on one socketpair, so pickle is safe here (the
socket is never reachable from the network). One message per engine step carries every
token of that step: the front end wakes once a step, not once a token.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
from dataclasses import dataclass
from typing import Any

from mpisplit.serving.sampling import SamplingParams

HEADER_BYTES = 8


@dataclass(frozen=True)
class Choice:
    """One of a request's n sequences, as the front end validated it."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stops: list[str]
    logprobs: int | None


def frame(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
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


def recv(sock: socket.socket) -> Any:
    """Blocking receive of one message; EOFError when the other end has closed (ConnectionError
    when it closed with data of ours unread)."""
    header = _read_exactly(sock, HEADER_BYTES)
    body = None if header is None else _read_exactly(sock, int.from_bytes(header, "little"))
    if body is None:
        raise EOFError("the other end of the front-end socket closed it")
    return pickle.loads(body)


async def read(reader: asyncio.StreamReader) -> Any:
    """The next message from an asyncio stream; EOFError when the other end has closed."""
    try:
        header = await reader.readexactly(HEADER_BYTES)
        body = await reader.readexactly(int.from_bytes(header, "little"))
    except (asyncio.IncompleteReadError, ConnectionError):  # closed; reset when it left data unread
        raise EOFError("the other end of the front-end socket closed it") from None
    return pickle.loads(body)
