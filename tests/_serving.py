"""A server under test: `mpiexec -n N python -m mpisplit.serve ... --port 0` as a real process
group, its address read from its first line, always killed at the end. Checkpoints and
Hugging Face folders for it, written in-process from seeded random weights."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from mpi4py import MPI

import mpisplit as ms
from mpisplit.training.state import save_training_state

if TYPE_CHECKING:
    from typing_extensions import Self

START_TIMEOUT_S = 90
CHARS = "\n !',.?abcdefghijklmnopqrstuvwxyz"
ADDRESS = re.compile(r"on (http://[\d.]+:\d+)")


def serve_env() -> dict[str, str]:
    from conftest import clean_mpi_env

    env = clean_mpi_env()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    env.pop("MPISPLIT_FAULT", None)
    return env


def tiny_model(vocab: int, seed: int, block_size: int = 64) -> ms.GPT:
    """A random float64 GPT whose greedy text is not one repeated character: the weights are
    scaled up so the logits spread."""
    grid = ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    cfg = ms.GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=2, n_head=4, n_embd=32)
    model = ms.GPT(cfg, grid, dtype="float64", seed=seed)
    for p in model.parameters():
        if p.data.ndim == 2:
            p.data *= 6.0
    return model


def write_char_checkpoint(root: Path, seed: int = 11, eos_token_ids: list[int] | None = None) -> Path:
    model = tiny_model(len(CHARS), seed)
    meta = {"config": model.config.to_dict(), "tokenizer": CHARS, "dtype": "float64"}
    if eos_token_ids is not None:
        meta["eos_token_ids"] = eos_token_ids
    save_training_state(root, 1, model, None, model.grid, meta=meta)
    model.grid.free()
    return root


class Server:
    """Context manager: the running server's base URL in `.url`; `.stop()` sends SIGTERM."""

    def __init__(self, n: int, args: list[str], env: dict[str, str] | None = None) -> None:
        from conftest import mpiexec_command

        self.cmd = [*mpiexec_command(n), sys.executable, "-m", "mpisplit.serve", "--port", "0", *args]
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        self.url = ""
        self.env = serve_env() if env is None else env

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            found = ADDRESS.search(line)
            if found:
                self.url = found.group(1)
                return self
        self.kill()
        raise RuntimeError(f"server did not start: {' '.join(self.cmd)}\n{''.join(self.log)}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            self.lines.put(line)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM to mpiexec (which passes it on); the exit status, or kill after `timeout`."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"server ignored SIGTERM for {timeout} s\n{''.join(self.log)}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            try:
                self.stop(timeout=15)
            except RuntimeError:
                pass
        self.kill()


def greedy_reference(model: ms.GPT, prompt: list[int], n: int) -> np.ndarray:
    """The library's own one-sequence greedy decoding: the ids after the prompt."""
    return model.generate(np.array([prompt]), n)[0, len(prompt):]
