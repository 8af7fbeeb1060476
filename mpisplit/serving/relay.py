"""Rank 0's end of the HTTP front end: the front-end process (frontend.py) started and
stopped, its submissions handed to the Controller, and each engine step's events sent back
in one message (see ipc.py).

    relay = FrontendRelay(controller, config)   # starts the process; OSError if it cannot listen
    controller.run()                            # the engine loop calls relay.flush() every step
    relay.stop()

Two threads of rank 0 touch it: the engine thread (the sinks and flush, inside
controller.run) and the relay's reader thread, which waits on the socket without holding the
GIL and wakes once per request (submit, cancel, /metrics, /health), never once per token.
If the front end dies, the reader cancels every request, stops the controller and records
why in `lost`; serve() then ends the job with that error.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from mpisplit.serving import ipc
from mpisplit.serving.controller import Controller, Submission
from mpisplit.serving.ipc import FrontendConfig

__all__ = ["FrontendConfig", "FrontendRelay", "frontend_env"]

START_TIMEOUT_S = 60.0  # the front end imports starlette, uvicorn and this library first
STOP_TIMEOUT_S = 10.0
LAUNCHER_ENV_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "HYDI_", "OMPI_", "MPI_LOCALRANKID")


def frontend_env(environ: dict[str, str]) -> dict[str, str]:
    """The front end's environment: no MPI launcher variables, and mpi4py imported without
    initialising MPI (the process imports this library, but it is not an MPI rank)."""
    env = {k: v for k, v in environ.items() if not k.startswith(LAUNCHER_ENV_PREFIXES)}
    env.update(MPI4PY_RC_INITIALIZE="0", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


class FrontendRelay:
    """The front-end process and the socket to it (see the module docstring)."""

    def __init__(self, controller: Controller, config: FrontendConfig) -> None:
        self.controller = controller
        self.lost: str | None = None  # why the front end went away, if it did before stop()
        self._sock, theirs = socket.socketpair()
        self._send_lock = threading.Lock()
        self._outbox: list[tuple[int, int, dict]] = []
        self._rids: dict[int, list[int]] = {}  # request key -> its sequences' ids
        self._left: dict[int, int] = {}  # request key -> choices not yet finished
        self._book = threading.Lock()
        self._stopping = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mpisplit.serving.frontend", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=frontend_env(dict(os.environ)))
        theirs.close()
        try:
            self.port = self._handshake(config)
        except BaseException:
            self._kill()
            raise
        self._reader = threading.Thread(target=self._read, name="frontend-relay", daemon=True)
        self._reader.start()

    def _handshake(self, config: FrontendConfig) -> int:
        self._send(("config", config))
        self._sock.settimeout(START_TIMEOUT_S)
        try:
            kind, value = ipc.recv(self._sock)
        except (EOFError, TimeoutError, OSError):
            raise OSError(f"the HTTP front end (pid {self.proc.pid}) did not start on {config.host}:{config.port}"
                          f" (exit status {self.proc.poll()})") from None
        self._sock.settimeout(None)
        if kind != "started":
            raise OSError(value)
        return int(value)

    # -------------------------------------------------- the engine thread
    def sink(self, key: int, index: int, event: dict) -> None:
        """A Submission's sink: queue the event for this step's message (an error at once)."""
        self._outbox.append((key, index, event))
        if "error" in event or event.get("finish_reason") is not None:
            with self._book:
                self._left[key] = self._left.get(key, 1) - 1
                if self._left[key] <= 0:
                    self._left.pop(key)
                    self._rids.pop(key, None)
        if "error" in event:
            self.flush()  # errors come from failure paths, which may end the job right after

    def flush(self) -> None:
        """Send this step's events in one message."""
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        try:
            self._send(("events", batch))
        except OSError:
            pass  # the front end is gone: the reader thread sees the closed socket and stops the engine

    # -------------------------------------------------- the reader thread
    def _read(self) -> None:
        try:
            while True:
                message = ipc.recv(self._sock)
                getattr(self, "_on_" + message[0])(*message[1:])
        except (EOFError, OSError) as exc:
            if not self._stopping:
                self._lose(exc)

    def _on_submit(self, key: int, choices: list[ipc.Choice]) -> None:
        ctl = self.controller
        if not ctl.alive or ctl.stopping.is_set():
            self._send(("ack", key, 503, "the server is shutting down"))
            return

        def sink_of(i: int) -> Callable[[dict], None]:
            return lambda ev: self.sink(key, i, ev)

        subs = [Submission(prompt=c.prompt, max_tokens=c.max_tokens, sampling=c.sampling, stops=c.stops,
                           logprobs=c.logprobs, prompt_logprobs=c.prompt_logprobs, sink=sink_of(i))
                for i, c in enumerate(choices)]
        with self._book:
            self._left[key] = len(subs)
        if not ctl.submit_all(subs):
            with self._book:
                self._left.pop(key, None)
            self._send(("ack", key, 429, f"the queue is full ({ctl.max_queue} requests waiting); retry later"))
            return
        with self._book:
            if key in self._left:  # not already finished (a 1-token answer can be)
                self._rids[key] = [sub.rid for sub in subs]
        self._send(("ack", key, 200, ""))

    def _on_cancel(self, key: int) -> None:
        with self._book:
            rids = self._rids.pop(key, [])
            self._left.pop(key, None)
        for rid in rids:
            self.controller.cancel(rid)

    def _on_ask(self, qid: int, what: str) -> None:
        ctl = self.controller
        if what == "metrics":
            value: Any = ctl.metrics.render()
        else:
            value = ctl.alive and not ctl.stopping.is_set()
        self._send(("answer", qid, value))

    def _lose(self, exc: BaseException) -> None:
        code = self.proc.poll()
        self.lost = (f"the HTTP front end (pid {self.proc.pid}) exited"
                     f"{'' if code is None else f' with status {code}'} ({exc}); the server is stopping")
        print(f"error: {self.lost}", file=sys.stderr, flush=True)
        with self._book:
            keys = list(self._rids)
        for key in keys:
            self._on_cancel(key)
        self.controller.stopping.set()

    # -------------------------------------------------- both
    def _send(self, message: Any) -> None:
        with self._send_lock:
            ipc.send(self._sock, message)

    def stop(self) -> None:
        """Tell the front end to close and exit; kill it if it has not after STOP_TIMEOUT_S."""
        self._stopping = True
        try:
            self._send(("stop",))
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._kill()
        self._sock.close()

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)
