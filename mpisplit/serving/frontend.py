"""The HTTP front end in a process of its own: uvicorn and the starlette app (api.py), linked
to rank 0's engine process by a socket (ipc.py; relay.py is the other end).

    python -m mpisplit.serving.frontend FD     # started by relay.FrontendRelay with the socket FD

Rank 0's engine thread then shares its interpreter with no HTTP work: parsing, validation,
tokenizing prompts, SSE encoding and the event loop's wakeups all run here, on another core
when there is one, and the engine only sends one message per step. This process is not an
MPI rank (mpi4py is imported without initialising MPI) and ignores SIGTERM and SIGINT: rank
0 leads the shutdown, drains the requests in flight and then sends ("stop",). If the engine
process goes away first, every open request gets a 500 and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mpisplit.serving import ipc

ENGINE_GONE = "the engine stopped; the server is going down"


@dataclass
class Pending:
    """One request's n choices in the engine: their events arrive on `events` as (index, event)."""

    key: int
    events: asyncio.Queue
    accepted: asyncio.Future  # (status, message): 200, or 429 / 503 with the reason


class EngineLink:
    """The front end's view of the engine: submit, cancel, ask; a task runs `dispatch()`.
    What requests send before `release()` is held back: the engine's first message from the
    front end must be "started" (a client polling /health while the server starts is answered
    only once it has been)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._held: list[bytes] | None = []
        self._open: dict[int, Pending] = {}
        self._answers: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self.alive = True

    async def submit(self, choices: list[ipc.Choice]) -> tuple[Pending | None, int, str]:
        """(pending, 200, "") once the engine has queued all the choices, else (None, status, why)."""
        if not self.alive:
            return None, 503, "the server is shutting down"
        loop = asyncio.get_running_loop()
        pending = Pending(next(self._ids), asyncio.Queue(), loop.create_future())
        self._open[pending.key] = pending  # before sending: events may come before the ack
        self._send(("submit", pending.key, choices))
        status, message = await pending.accepted
        if status != 200:
            self._open.pop(pending.key, None)
            return None, status, message
        return pending, 200, ""

    def cancel(self, pending: Pending) -> None:
        """Free the request's slots at the next engine step; its later events are dropped."""
        self.close(pending)
        if self.alive:
            self._send(("cancel", pending.key))

    def close(self, pending: Pending) -> None:
        self._open.pop(pending.key, None)

    async def ask(self, what: str) -> Any:
        """The engine's answer to "metrics" (bytes) or "health" (bool); None once it is gone."""
        if not self.alive:
            return None
        qid = next(self._ids)
        future = self._answers[qid] = asyncio.get_running_loop().create_future()
        self._send(("ask", qid, what))
        return await future

    def _send(self, message: tuple) -> None:
        if self._held is None:
            self._writer.write(ipc.frame(message))
        else:
            self._held.append(ipc.frame(message))

    def release(self, first: tuple) -> None:
        """Send `first`, then what was held back; later messages go at once."""
        self._writer.write(ipc.frame(first))
        for frame in self._held or ():
            self._writer.write(frame)
        self._held = None

    async def dispatch(self) -> None:
        """Route the engine's messages until it says stop or goes away."""
        try:
            while True:
                message = await ipc.read(self._reader)
                kind = message[0]
                if kind == "events":
                    for key, index, event in message[1]:
                        pending = self._open.get(key)
                        if pending is not None:
                            pending.events.put_nowait((index, event))
                elif kind == "ack":
                    pending = self._open.get(message[1])
                    if pending is not None and not pending.accepted.done():
                        pending.accepted.set_result((message[2], message[3]))
                elif kind == "answer":
                    future = self._answers.pop(message[1], None)
                    if future is not None and not future.done():
                        future.set_result(message[2])
                elif kind == "stop":
                    break
        except EOFError:
            pass
        self._end()

    def _end(self) -> None:
        """No engine any more: whatever still waits on it fails now instead of hanging."""
        self.alive = False
        for pending in self._open.values():
            if not pending.accepted.done():
                pending.accepted.set_result((503, ENGINE_GONE))
            else:
                pending.events.put_nowait((0, {"error": ENGINE_GONE, "status": 500}))
        for future in self._answers.values():
            if not future.done():
                future.set_result(None)
        self._answers.clear()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # rank 0 handles SIGTERM and SIGINT
            yield

    return Server


async def serve(sock: socket.socket) -> int:
    """Read the config, listen, report the port, serve until the engine says stop."""
    import uvicorn

    from mpisplit.serving.api import CompletionsApp

    reader, writer = await asyncio.open_unix_connection(sock=sock)
    _, config = await ipc.read(reader)
    try:
        listener = _listen(config.host, config.port)
    except OSError as exc:
        message = f"the HTTP server did not start on {config.host}:{config.port} ({exc}; is the port in use?)"
        writer.write(ipc.frame(("failed", message)))
        await writer.drain()
        return 1
    link = EngineLink(reader, writer)
    app = CompletionsApp(link, config.model, config.api_key, config.chat_template).app()
    server = _server_class()(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=3))
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    if not server.started:
        writer.write(ipc.frame(("failed", f"the HTTP server did not start on {config.host}:{config.port}")))
        await writer.drain()
        return 1
    link.release(("started", listener.getsockname()[1]))
    await link.dispatch()
    server.should_exit = True
    await serving
    return 0


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    return asyncio.run(serve(sock))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
