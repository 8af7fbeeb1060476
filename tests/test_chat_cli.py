"""`mpisplit chat` as a real process: through a pipe under mpiexec at 2 ranks (one message a
line; /reset, /exit), and through a pseudo-terminal (the prompt, Ctrl-D, Ctrl-C; at 1 rank as
a terminal user runs it, and Ctrl-C at 2 ranks under mpiexec). Reference: the library's greedy decoding
of each turn's whole conversation, rendered by the folder's template, in this process."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest
from _chat import CONVERSATIONS, greedy_answer, write_chat_folder
from _serving import serve_env
from mpi4py import MPI

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs")
pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

SYSTEM = "You tell stories."
FIRST, SECOND = CONVERSATIONS["one-turn"][0]["content"], CONVERSATIONS["multi-turn"][0]["content"]
N = 8


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-cli") / "tiny-chat"
    model, bpe = write_chat_folder(folder, seed=9)
    yield folder, model, bpe
    model.grid.free()


def chat_command(folder, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mpisplit.chat", "--hf", str(folder), "--dtype", "float64",
            "--max-tokens", str(N), *extra]


def expected_answers(chat_folder, turns: list[str], system: str | None) -> list[str]:
    folder, model, bpe = chat_folder
    start = [] if system is None else [{"role": "system", "content": system}]
    messages, answers = list(start), []
    for text in turns:
        messages.append({"role": "user", "content": text})
        answers.append(greedy_answer(folder, model, bpe, messages, N))
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers


def test_pipe_at_two_ranks_keeps_the_conversation_and_resets(chat_folder):
    from conftest import mpiexec_command

    a1, a2 = expected_answers(chat_folder, [FIRST, SECOND], SYSTEM)
    lines = [FIRST, "", SECOND, "/reset", FIRST, "/exit", "never read"]
    proc = subprocess.run(
        [*mpiexec_command(2), *chat_command(chat_folder[0], "--system", SYSTEM)],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=90, env=serve_env(), check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert a1 != a2
    assert proc.stdout == f"{a1}\n{a2}\n{a1}\n"
    assert "(the conversation is forgotten)" in proc.stderr and "on 2 ranks" in proc.stderr


class Terminal:
    """A command whose standard input, output and error are a pseudo-terminal, which is its
    controlling terminal (so Ctrl-C and Ctrl-D typed into it act as a user's)."""

    def __init__(self, cmd: list[str]) -> None:
        env = serve_env()
        self.pid, self.master = pty.fork()  # the child: a new session, the terminal its own
        if self.pid == 0:
            os.execvpe(cmd[0], cmd, env)
        self.out = b""

    def read_until(self, needle: str, timeout: float = 60) -> str:
        """Everything shown so far (line ends as "\\n"), once it holds `needle`."""
        end = time.monotonic() + timeout
        while needle not in self.text() and time.monotonic() < end:
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.out += os.read(self.master, 4096)
                except OSError:  # the other side closed
                    break
        assert needle in self.text(), self.text()
        return self.text()

    def text(self) -> str:
        return self.out.decode(errors="replace").replace("\r\n", "\n")

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout: float = 30) -> int:
        """The exit status; the process group is killed when it is not done in time."""
        end = time.monotonic() + timeout
        try:
            while time.monotonic() < end:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.pid = 0
                    return os.waitstatus_to_exitcode(status)
                if select.select([self.master], [], [], 0.05)[0]:
                    try:
                        self.out += os.read(self.master, 4096)
                    except OSError:
                        pass
            raise AssertionError(f"still running after {timeout} s:\n{self.out.decode(errors='replace')}")
        finally:
            if self.pid:
                os.killpg(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            os.close(self.master)


def test_terminal_prompt_answers_and_ctrl_d(chat_folder):
    a1, a2 = expected_answers(chat_folder, [FIRST, SECOND], None)
    term = Terminal(chat_command(chat_folder[0]))
    term.read_until(">>> ")
    term.type(FIRST + "\n")
    term.read_until(f"{a1}\n>>> ")
    term.type(SECOND + "\n")
    text = term.read_until(f"{a2}\n>>> ")
    term.type("\x04")  # Ctrl-D on an empty line
    assert term.wait() == 0
    assert text.count(">>> ") == 3 and "Traceback" not in term.out.decode(errors="replace")


@pytest.mark.parametrize("ranks", [1, 2])
def test_ctrl_c_ends_cleanly(chat_folder, ranks):
    """Ctrl-C at 1 rank (in the prompt's line editor) and under mpiexec at 2 (which passes
    SIGINT on: rank 0 ends the session for every rank). /exit: see the pipe test."""
    from conftest import mpiexec_command

    (a1,) = expected_answers(chat_folder, [FIRST], None)
    launcher = [] if ranks == 1 else mpiexec_command(2)
    term = Terminal([*launcher, *chat_command(chat_folder[0])])
    term.read_until("Ctrl-D ends it")
    term.type(FIRST + "\n")
    term.read_until(a1)
    time.sleep(0.3)
    term.type("\x03")
    assert term.wait() == 0
    assert "Traceback" not in term.out.decode(errors="replace")


def test_ctrl_c_during_an_answer_ends_every_rank(chat_folder):
    """SIGINT reaches rank 0 in the middle of an answer (MPISPLIT_FAULT makes it send itself
    one before engine step 4): the answer stops after 3 of its tokens, the session ends with
    status 0 on both ranks, and nothing after that line is read."""
    from conftest import mpiexec_command

    (a1,) = expected_answers(chat_folder, [FIRST], None)
    env = {**serve_env(), "MPISPLIT_FAULT": "signal@rank=0,step=4,sig=INT"}
    proc = subprocess.run(
        [*mpiexec_command(2), *chat_command(chat_folder[0])], input=f"{FIRST}\n{SECOND}\n",
        capture_output=True, text=True, timeout=90, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = proc.stdout.removesuffix("\n")
    assert a1.startswith(shown) and len(shown) < len(a1), (shown, a1)
    assert "Traceback" not in proc.stderr


def test_help_and_clear_errors(tmp_path):
    from _serving import write_char_checkpoint

    from mpisplit.cli.main import COMMANDS

    assert "chat" in COMMANDS
    run = lambda *args: subprocess.run([sys.executable, "-m", "mpisplit.chat", *args], capture_output=True,
                                       text=True, timeout=60, env=serve_env(), check=False)
    out = run("--help")
    for flag in ("--hf", "--ckpt", "--chat-template", "--system", "--temperature", "--max-tokens"):
        assert flag in out.stdout
    bad = run("--ckpt", "/nonexistent", "--max-tokens", "0")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --max-tokens must be >= 1, got 0"
    untemplated = run("--ckpt", str(write_char_checkpoint(tmp_path / "char")))
    assert untemplated.returncode == 2 and "has no chat template" in untemplated.stderr
    assert "--chat-template FILE" in untemplated.stderr
