"""The engine loop: rank 0 schedules and reports; the other ranks follow its broadcasts.

Rank 0's main thread owns the engine and every MPI call. Other threads (the relay of the HTTP
front end) hand it validated `Submission`s through `submit()` (thread-safe; False when the
queue is full) and cancel them with `cancel()`; it answers through each submission's `sink`,
called from this thread with one event (a dict) at a time, and calls `flush()` once after
each step's events and once at the end, so that a step's events can travel together:

    {"text", "token_ids", "logprobs", "finish_reason"}   a piece of the completion; the last
                                                          one has finish_reason set; the first
                                                          has "prompt_logprobs" if asked:
                                                          [token, logprob, rank, [[id, lp]...]]
                                                          for prompt tokens 1, 2, ...
    {"error", "status"}                                   the request failed

A failure in one request's own work (its sampling, the same on every rank; its text on rank
0) fails that request alone with a 500. A failure in a step (the forward pass, a collective)
can leave the ranks apart: it fails every request and ends the job.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mpisplit.serving.channel import IDLE, SHUTDOWN, STEP, ControlChannel
from mpisplit.serving.engine import Engine, SequenceSpec, StepOutput
from mpisplit.serving.liveness import Liveness
from mpisplit.serving.metrics import ServerMetrics
from mpisplit.serving.sampling import SamplingParams, log_softmax, top_logprobs
from mpisplit.serving.text import TextStream

IDLE_WAIT_S = 0.25  # how long rank 0 sleeps on an empty queue before looking at its flags


@dataclass
class Submission:
    """A validated completion request (built by the HTTP side)."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    sink: Callable[[dict], None]
    stops: list[str] = field(default_factory=list)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    arrived: float = field(default_factory=time.perf_counter)
    rid: int = -1


@dataclass
class _Active:
    sub: Submission
    stream: TextStream
    tokens: int = 0
    last: float = 0.0


class Controller:
    """Rank 0's side of the engine loop (see the module docstring)."""

    def __init__(
        self, engine: Engine, channel: ControlChannel, tokenizer: Any, metrics: ServerMetrics, max_queue: int,
        drain_s: float = 10.0, liveness: Liveness | None = None,
    ) -> None:
        self.engine, self.channel, self.tokenizer, self.metrics = engine, channel, tokenizer, metrics
        self.max_queue, self.drain_s = max_queue, drain_s
        self.flush: Callable[[], None] = lambda: None  # the front end's relay sets its own
        self._inbox: queue.Queue = queue.Queue()
        self._cancelled: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet admitted
        self._ids = itertools.count(1)
        self.waiting: deque[Submission] = deque()
        self.active: dict[int, _Active] = {}
        self._stopped: list[int] = []  # met a stop string; still in the engine until the next step
        self.stopping = threading.Event()  # set by SIGTERM: admit nothing new, then exit
        self.alive = True
        self.liveness = liveness

    # -------------------------------------------------- called from other threads
    def submit(self, sub: Submission) -> bool:
        return self.submit_all([sub])

    def submit_all(self, subs: list[Submission]) -> bool:
        """All of `subs` (the n choices of one request) or, when the queue has no room for
        them all, none."""
        with self._lock:
            if self._queued + len(subs) > self.max_queue or self.stopping.is_set():
                return False
            self._queued += len(subs)
            for sub in subs:
                sub.rid = next(self._ids)
        for sub in subs:
            self.metrics.queue_length.inc()
            self._inbox.put(sub)
        return True

    def cancel(self, rid: int) -> None:
        self._cancelled.put(rid)

    # -------------------------------------------------- the loop (main thread)
    def run(self) -> None:
        """Serve until `stopping` is set and the requests in flight are done (or the drain
        time is up), then tell the other ranks to stop. An exception in a step fails every
        request in flight with a 500 and propagates (the job then ends)."""
        deadline = None
        try:
            while True:
                if self.stopping.is_set():
                    deadline = deadline or time.monotonic() + self.drain_s
                    self._refuse_waiting()
                    if not self.active:
                        break
                    if time.monotonic() > deadline:
                        self._fail_all(503, "the server is shutting down")
                        break
                self._collect(block=not self.active and not self.waiting)
                payload = self._plan()
                if payload is None:
                    if self.liveness is not None and self.liveness.ping_due():
                        self.liveness.check(lambda: self.channel.send(IDLE))
                    continue
                if self.liveness is not None:
                    self.liveness.beat()
                self.channel.send(STEP, payload)  # rank 0's engine has applied it already
                outputs = self.engine.step()
                if self.liveness is not None:
                    self.liveness.beat()
                self.metrics.observe_cache(self.engine)
                self.metrics.batch_occupancy.observe(len(self.engine.running) + sum(o.finished for o in outputs))
                self._deliver(outputs)
                self.flush()
        except BaseException:
            self.alive = False
            self._fail_all(500, "the engine failed during a step; the server is stopping")
            self.flush()
            time.sleep(0.5)  # let the front end send the 500s before the job ends
            raise
        self.alive = False
        self.flush()
        self.channel.send(SHUTDOWN)

    def _collect(self, block: bool) -> None:
        try:
            while True:
                sub = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
                block = False
                self.waiting.append(sub)
        except queue.Empty:
            pass

    def _plan(self) -> dict | None:
        """This step's removals (cancelled, stopped) and additions (waiting, first come first
        placed, while the engine can place them), applied to rank 0's engine as decided; the
        payload tells the other ranks the same."""
        remove = []
        while True:
            try:
                rid = self._cancelled.get_nowait()
            except queue.Empty:
                break
            if rid in self.active:
                self._finish(rid, "cancelled")
                remove.append(rid)
            else:
                self._drop_waiting(rid)
        remove += [rid for rid in self._stopped if rid in self.engine.running]
        self._stopped.clear()
        for rid in remove:
            self.engine.remove(rid)
        add = []
        while self.waiting:
            sub = self.waiting[0]
            spec = SequenceSpec(sub.rid, sub.prompt, sub.max_tokens, sub.sampling, sub.prompt_logprobs)
            if not self.engine.can_admit(spec):
                break
            self.waiting.popleft()
            self._unqueue()
            self.engine.add(spec)
            self.active[sub.rid] = _Active(sub, TextStream(self.tokenizer, sub.stops))
            self.metrics.prompt_tokens.inc(len(sub.prompt))
            add.append(spec.to_json())
        if not add and not remove and not self.engine.running:
            return None
        self.metrics.running.set(len(self.active))
        return {"add": add, "remove": remove}

    def _deliver(self, outputs: list[StepOutput]) -> None:
        now = time.perf_counter()
        for out in outputs:
            act = self.active.get(out.rid)
            if act is None:
                continue
            if out.error is not None:  # sampling failed, alike on every rank: the engine dropped it
                self._fail(out.rid, f"sampling failed: {out.error}", in_engine=False)
                continue
            if act.tokens == 0:
                self.metrics.ttft.observe(now - act.sub.arrived)
            else:
                self.metrics.itl.observe(now - act.last)
            act.tokens += 1
            act.last = now
            self.metrics.generated_tokens.inc()
            try:
                event = self._event(act, out)
            except Exception as exc:  # noqa: BLE001 - rank 0's own work for one request
                self._fail(out.rid, f"detokenizing failed: {type(exc).__name__}: {exc}",
                           in_engine=not out.finished)
                continue
            if event["finish_reason"] is not None:
                self._finish(out.rid, event["finish_reason"])
            act.sub.sink(event)
        self.metrics.running.set(len(self.active))

    def _event(self, act: _Active, out: StepOutput) -> dict:
        """The piece of text (and logprobs) that `out` adds to the completion. A stop token's
        own text is not part of the completion (vLLM's skip_special_tokens), its id is."""
        if self.engine.faults:
            self.engine.faults.in_text(self.engine.steps)
        offset = len(act.stream.text)
        text = "" if out.stop_token else act.stream.push(out.token)
        event: dict[str, Any] = {"text": text, "token_ids": [out.token], "logprobs": None,
                                 "finish_reason": None}
        if act.sub.logprobs is not None:
            event["logprobs"] = self._logprobs(out, act.sub.logprobs, offset)
        if out.prompt_logprobs is not None:
            event["prompt_logprobs"] = [[t, v, r, [[i, w] for i, w in top]] for t, v, r, top in out.prompt_logprobs]
        if act.stream.stopped:
            event["finish_reason"] = "stop"
            if not out.finished:
                self._stopped.append(out.rid)  # its blocks are freed at the next step
        elif out.finished:
            event["text"] += act.stream.flush()
            event["finish_reason"] = out.reason
        return event

    def _fail(self, rid: int, message: str, in_engine: bool) -> None:
        """Fail one request with a 500; the others go on."""
        act = self.active.pop(rid)
        self.metrics.requests.labels("error").inc()
        if in_engine:
            self._stopped.append(rid)
        act.sub.sink({"error": message, "status": 500})

    def _logprobs(self, out: StepOutput, n: int, offset: int) -> dict:
        lp = log_softmax(out.logits)
        top = {self._token_text(i): v for i, v in top_logprobs(lp, n)}
        return {"tokens": [self._token_text(out.token)], "token_logprobs": [float(lp[out.token])],
                "top_logprobs": [top], "text_offset": [offset]}

    def _token_text(self, token: int) -> str:
        return str(token) if self.tokenizer is None else self.tokenizer.decode([token])

    def _finish(self, rid: int, reason: str) -> None:
        self.active.pop(rid)
        self.metrics.requests.labels(reason).inc()

    def _unqueue(self) -> None:
        with self._lock:
            self._queued -= 1
        self.metrics.queue_length.dec()

    def _drop_waiting(self, rid: int) -> None:
        for sub in list(self.waiting):
            if sub.rid == rid:
                self.waiting.remove(sub)
                self._unqueue()
                self.metrics.requests.labels("cancelled").inc()

    def _refuse_waiting(self) -> None:
        self._collect(block=False)
        while self.waiting:
            sub = self.waiting.popleft()
            self._unqueue()
            sub.sink({"error": "the server is shutting down", "status": 503})

    def _fail_all(self, status: int, message: str) -> None:
        for act in list(self.active.values()):
            act.sub.sink({"error": message, "status": status})
            self.metrics.requests.labels("error").inc()
        self.active.clear()
        for sub in list(self.waiting):
            sub.sink({"error": message, "status": status})
        self.waiting.clear()


def follow(engine: Engine, channel: ControlChannel, liveness: Liveness | None = None) -> None:
    """Ranks > 0: apply and run every step rank 0 broadcasts, until it says shutdown; answer its
    keep-alive (IDLE), and end the job when it has said nothing for the collective timeout."""
    while True:
        got = channel.recv(None if liveness is None else liveness.deadline())
        if got is None:
            assert liveness is not None
            liveness.silent_leader()
            return
        op, payload = got
        if op == SHUTDOWN:
            return
        if op == IDLE and liveness is not None:
            liveness.answer()
        if op == STEP:
            if liveness is not None:
                liveness.beat()
            engine.apply(payload or {})
            engine.step()
            if liveness is not None:
                liveness.beat()
