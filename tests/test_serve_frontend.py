"""The HTTP front end in its own process and its link to rank 0's engine (frontend.py, relay.py,
ipc.py), without MPI: a stand-in controller whose sinks the test calls by hand, a real
front-end process and a real HTTP client; and a real 2-rank server whose front end is killed.
References: the events the test sent, in the order it sent them; the messages counted on the
socket; the job's exit status and log."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import socket
import threading
import time

import httpx
import pytest
from _serving import CHARS, Server, serve_env, write_char_checkpoint
from mpi4py import MPI

from mpisplit.serving import ipc
from mpisplit.serving.frontend import ENGINE_GONE, EngineLink
from mpisplit.serving.metrics import ServerMetrics
from mpisplit.serving.relay import FrontendConfig, FrontendRelay
from mpisplit.serving.sampling import SamplingParams
from mpisplit.serving.validation import ModelInfo
from mpisplit.training.data import CharTokenizer

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own processes")


def piece(text: str, token: int, finish: str | None = None) -> dict:
    return {"text": text, "token_ids": [token], "logprobs": None, "finish_reason": finish}


class StandInController:
    """The controller's face to the relay; submissions are kept for the test to answer."""

    def __init__(self, max_queue: int = 4) -> None:
        self.alive, self.stopping, self.max_queue = True, threading.Event(), max_queue
        self.metrics = ServerMetrics(2)
        self.subs: list = []
        self.cancelled: list[int] = []
        self.flush = lambda: None

    def submit_all(self, subs: list) -> bool:
        if len(self.subs) + len(subs) > self.max_queue:
            return False
        for sub in subs:
            sub.rid = len(self.subs) + 1
            self.subs.append(sub)
        return True

    def cancel(self, rid: int) -> None:
        self.cancelled.append(rid)


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture()
def relay():
    ctl = StandInController()
    relay = FrontendRelay(ctl, FrontendConfig("127.0.0.1", 0, ModelInfo("char", len(CHARS), 64, CharTokenizer(CHARS))))
    sent: list = []
    send = relay._send
    relay._send = lambda message: (sent.append(message[0]), send(message))
    relay.sent = sent
    yield relay
    relay.stop()


def sse_choices(lines: list[str]) -> list[tuple[int, str]]:
    import json

    out = []
    for line in lines:
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                out.append((c["index"], c["text"]))
    return out


def test_a_steps_events_travel_in_one_message_and_in_order(relay):
    """Two choices (n = 2) streamed over three engine steps: three event messages on the
    socket, and the client reads each choice's pieces in the order they were sunk."""
    ctl = relay.controller
    url = f"http://127.0.0.1:{relay.port}/v1/completions"
    body = {"prompt": "ab", "max_tokens": 3, "n": 2, "stream": True, "temperature": 0, "seed": 5}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        def stream() -> list[str]:
            with httpx.stream("POST", url, json=body, timeout=30) as r:
                return list(r.iter_lines())

        lines = pool.submit(stream)
        wait_for(lambda: len(ctl.subs) == 2)
        assert [s.sampling.seed for s in ctl.subs] == [5, 6]  # choice i draws with seed + i
        steps = [("a", "b"), ("c", "d"), ("e", "f")]
        for k, texts in enumerate(steps):
            finish = "length" if k == len(steps) - 1 else None
            for sub, text in zip(ctl.subs, texts):
                sub.sink(piece(text, CHARS.index(text), finish))
            relay.flush()
        got = sse_choices(lines.result(timeout=30))
    assert [t for i, t in got if i == 0] == ["a", "c", "e"] and [t for i, t in got if i == 1] == ["b", "d", "f"]
    assert relay.sent.count("events") == 3
    assert relay._rids == {} and relay._left == {}  # finished requests leave no bookkeeping


def test_queue_full_health_metrics_and_cancel_on_disconnect(relay):
    """429 when the stand-in's queue is full; /health and /metrics answered by the engine side;
    a client that goes away cancels its sequences."""
    ctl = relay.controller
    base = f"http://127.0.0.1:{relay.port}"
    assert httpx.get(base + "/health", timeout=30).json() == {"status": "ok"}
    ctl.metrics.generated_tokens.inc(7)
    assert "mpisplit_generated_tokens_total 7.0" in httpx.get(base + "/metrics", timeout=30).text
    ctl.subs = [None] * ctl.max_queue
    r = httpx.post(base + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=30)
    assert r.status_code == 429 and "queue is full (4 requests" in r.json()["error"]["message"]
    ctl.subs = []
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/completions", json={"prompt": "a", "max_tokens": 2},
                   timeout=httpx.Timeout(30, read=0.3))
    wait_for(lambda: ctl.cancelled == [ctl.subs[0].rid])
    ctl.stopping.set()
    assert httpx.get(base + "/health", timeout=30).status_code == 503
    r = httpx.post(base + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=30)
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]


def test_a_dead_front_end_stops_the_controller_and_cancels_its_requests(relay):
    ctl = relay.controller
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"http://127.0.0.1:{relay.port}/v1/completions",
                              json={"prompt": "a", "max_tokens": 5}, timeout=30)
        wait_for(lambda: len(ctl.subs) == 1)
        relay.proc.kill()
        wait_for(ctl.stopping.is_set, timeout=10)
        with pytest.raises(httpx.HTTPError):
            pending.result(timeout=30)
    assert ctl.cancelled == [ctl.subs[0].rid]
    assert "HTTP front end" in relay.lost and f"pid {relay.proc.pid}" in relay.lost
    ctl.subs[0].sink(piece("x", 0))
    relay.flush()  # the socket is closed: the engine thread goes on, the event is dropped


def test_engine_link_fails_what_waits_when_the_engine_goes():
    """In one event loop over a socketpair: events reach their own request in order, and when
    the engine end closes, an accepted request gets a 500 and an unanswered one a 503."""
    async def main() -> None:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        link = EngineLink(reader, writer)
        link.release(("started", 0))
        dispatch = asyncio.create_task(link.dispatch())
        choice = ipc.Choice([1], 2, SamplingParams(), [], None)
        first = asyncio.create_task(link.submit([choice]))
        await asyncio.sleep(0.05)
        assert await asyncio.to_thread(ipc.recv, theirs) == ("started", 0)
        assert await asyncio.to_thread(ipc.recv, theirs) == ("submit", 1, [choice])
        events = [(1, 0, piece("a", 1)), (1, 0, piece("b", 2))]
        await asyncio.to_thread(ipc.send, theirs, ("events", events))  # before the ack: kept
        await asyncio.to_thread(ipc.send, theirs, ("ack", 1, 200, ""))
        pending, status, _ = await first
        assert status == 200
        assert [await pending.events.get() for _ in events] == [(0, ev) for _, _, ev in events]
        second = asyncio.create_task(link.submit([choice]))
        await asyncio.sleep(0.05)
        theirs.close()
        assert await second == (None, 503, ENGINE_GONE)
        assert await pending.events.get() == (0, {"error": ENGINE_GONE, "status": 500})
        assert await link.ask("health") is None
        await dispatch

    asyncio.run(main())


def test_engine_link_holds_requests_until_started():
    """A request made before the front end has told the engine "started" (a client polling
    /health while the server starts) reaches the engine after that message, never before it."""
    async def main() -> None:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        link = EngineLink(reader, writer)
        dispatch = asyncio.create_task(link.dispatch())
        health = asyncio.create_task(link.ask("health"))
        await asyncio.sleep(0.05)
        link.release(("started", 8000))
        assert await asyncio.to_thread(ipc.recv, theirs) == ("started", 8000)
        assert await asyncio.to_thread(ipc.recv, theirs) == ("ask", 1, "health")
        await asyncio.to_thread(ipc.send, theirs, ("answer", 1, True))
        assert await health is True
        theirs.close()
        await dispatch

    asyncio.run(main())


def test_a_server_polled_for_health_while_it_starts_starts(tmp_path):
    """/health asked from before the server listens, as an orchestrator does: the requests that
    queue on the listening socket while the server starts do not break its start; it answers."""
    ckpt = write_char_checkpoint(tmp_path / "char")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    codes: list[int] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                codes.append(httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code)
            except httpx.HTTPError:
                time.sleep(0.001)

    pollers = [threading.Thread(target=poll, daemon=True) for _ in range(4)]
    for t in pollers:
        t.start()
    try:
        with Server(1, ["--ckpt", str(ckpt), "--dtype", "float64", "--port", str(port)]) as srv:
            wait_for(lambda: 200 in codes)
            assert srv.stop() == 0
    finally:
        done.set()
        for t in pollers:
            t.join(timeout=15)


def front_end_pid(root: int) -> int:
    """The pid of the `mpisplit.serving.frontend` process under mpiexec `root`."""
    procs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        procs[int(pid)] = (int(stat[stat.rindex(")") + 2:].split()[1]), b"mpisplit.serving.frontend" in argv)
    under = {root}
    for _ in range(5):  # mpiexec -> proxy -> rank -> front end
        under |= {pid for pid, (ppid, _) in procs.items() if ppid in under}
    found = [pid for pid in under if procs.get(pid, (0, False))[1]]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_a_real_server_whose_front_end_dies_exits_non_zero_with_the_reason(tmp_path):
    """2 ranks, a stream in flight (each step sleeps 50 ms): the front end killed, the job
    ends within seconds (the stream's slot cancelled, no 10 s drain) with an error naming it."""
    ckpt = write_char_checkpoint(tmp_path / "char")
    env = {**serve_env(), "MPISPLIT_FAULT": "sleep@seconds=0.05"}
    with Server(2, ["--ckpt", str(ckpt), "--dtype", "float64"], env=env) as srv:
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=30,
                          json={"prompt": "a", "max_tokens": 60, "stream": True}) as r:
            next(r.iter_lines())
            os.kill(front_end_pid(srv.proc.pid), signal.SIGKILL)
            start = time.monotonic()
            assert srv.proc.wait(timeout=30) != 0
        assert time.monotonic() - start < 8
        log = "".join(srv.log)
        assert "the HTTP front end" in log and "exited" in log, log[-2000:]
