"""A conversation with a model in the terminal, from all its tensor-parallel ranks.

    mpisplit chat --hf smollm2-folder
    mpirun -n 2 mpisplit chat --ckpt out --chat-template chat.jinja --system "Answer briefly."
    printf 'Hello\\nAnd then?\\n' | mpirun -n 2 mpisplit chat --hf folder --max-tokens 64

Type a message and Enter: the answer is shown as its tokens come, and the conversation goes on
(each turn's prompt is the whole conversation, rendered by the model's chat template). `/reset`
forgets the conversation (not --system), `/exit`, Ctrl-D or Ctrl-C end the session on every rank.
When standard input is not a terminal (a pipe; rank 0's input under mpirun, which the launcher
forwards), each line is one message and no prompt is shown; each answer ends with a newline.

The requests go through the server's engine and validation (one sequence at a time): the answer is
the one /v1/chat/completions gives for the same conversation.
"""

from __future__ import annotations

import argparse
import queue
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, OSError)
POLL_S = 0.1  # how often the reader looks at the engine thread while an answer comes


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="an mpisplit run folder (its latest checkpoint) or one step folder")
    src.add_argument("--hf", help="a Hugging Face folder with a tokenizer (and usually a chat template)")
    src.add_argument("--gguf", metavar="FILE", help="a llama.cpp GGUF file (its tokenizer and chat template come with "
                     "it; its matrices kept in their quantized blocks on the CPU)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template (default: the folder's own)")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message that opens the conversation")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; otherwise sample")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="at most this many tokens per answer (default: the rest of the context)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the first answer (then +1 per answer)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: the world size)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--dequantize", action="store_true",
                   help="--gguf: dequantize every matrix to --dtype instead of keeping the file's blocks "
                        "(kept by default with the block kernels: mpisplit serve --help)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the context the KV cache is sized for (rotary models; default: the model's positions)")
    return p.parse_args(argv)


def _check(args: argparse.Namespace, world_size: int) -> int:
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    tp = world_size if args.tp is None else args.tp
    if tp != world_size:
        raise ValueError(f"chat runs one model over all ranks: --tp must equal the world size {world_size}")
    return tp


@dataclass
class Conversation:
    """The messages so far; `reset()` keeps only the system message."""

    system: str | None
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [] if self.system is None else [{"role": "system", "content": self.system}]


class Terminal:
    """Lines in (None at the end: Ctrl-D, end of input, /exit), answers out."""

    def __init__(self) -> None:
        self.interactive = sys.stdin.isatty()
        if self.interactive:
            import readline  # noqa: F401 - line editing and history for input()

    def read(self) -> str | None:
        try:
            line = input(">>> ") if self.interactive else sys.stdin.readline()
        except EOFError:
            return None
        if not self.interactive and not line:
            return None
        return line.rstrip("\r\n")

    @staticmethod
    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    @staticmethod
    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)


class ChatSession:
    """Rank 0: the conversation loop on the main thread, the engine loop on another."""

    def __init__(self, controller: Any, info: Any, template: Any, args: argparse.Namespace) -> None:
        self.controller, self.info, self.template, self.args = controller, info, template, args
        self.conversation = Conversation(args.system)
        self.terminal = Terminal()
        self.failure: BaseException | None = None
        self.turn = 0

    def _engine(self) -> None:
        try:
            self.controller.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            self.failure = exc

    def run(self) -> None:
        thread = threading.Thread(target=self._engine, name="engine", daemon=True)
        thread.start()
        try:
            while self.failure is None:
                line = self.terminal.read()
                if line is None or line.strip() == "/exit":
                    break
                if line.strip() == "/reset":
                    self.conversation.reset()
                    self.terminal.note("(the conversation is forgotten)")
                elif line.strip():
                    self.say(line)
        except KeyboardInterrupt:
            self.terminal.show("\n")
        finally:
            self.controller.stopping.set()  # drain_s 0: an answer still coming is cut off
            thread.join()
        if self.failure is not None:
            raise self.failure

    def say(self, text: str) -> None:
        """One turn: the answer to `text` streamed out, and both kept in the conversation."""
        from mpisplit.serving.chat import validate_chat
        from mpisplit.serving.validation import ApiError

        messages = [*self.conversation.messages, {"role": "user", "content": text}]
        body = {"messages": messages, "temperature": self.args.temperature, "seed": self.args.seed + self.turn,
                "max_tokens": self.args.max_tokens}
        try:
            req = validate_chat(body, self.info, self.template)
        except ApiError as err:
            self.terminal.note(f"error: {err.message}" + (" (/reset starts over)" if len(messages) > 1 else ""))
            return
        answer = self._answer(req)
        if answer is not None:
            self.turn += 1
            self.conversation.messages = [*messages, {"role": "assistant", "content": answer}]

    def _answer(self, req: Any) -> str | None:
        from mpisplit.serving.controller import Submission

        events: queue.Queue = queue.Queue()
        sub = Submission(prompt=req.prompt, max_tokens=req.max_tokens, sampling=req.sampling, stops=req.stops,
                         sink=events.put)
        if not self.controller.submit(sub):
            raise RuntimeError("the engine did not take the request")
        pieces = []
        while True:
            try:
                ev = events.get(timeout=POLL_S)
            except queue.Empty:
                if self.failure is not None:
                    return None
                continue
            if "error" in ev:
                self.terminal.note(f"\nerror: {ev['error']}")
                return None
            pieces.append(ev["text"])
            self.terminal.show(ev["text"])
            if ev["finish_reason"] is not None:
                self.terminal.show("\n")
                return "".join(pieces)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    from mpi4py import MPI

    import mpisplit as ms
    from mpisplit.models.chat_template import load_chat_template
    from mpisplit.runtime.errors import agree, install_abort_on_exception
    from mpisplit.serving.channel import ControlChannel
    from mpisplit.serving.controller import Controller, follow
    from mpisplit.serving.engine import Engine
    from mpisplit.serving.loading import keep_gguf_blocks, load_model_and_tokenizer, report_blocks
    from mpisplit.serving.metrics import ServerMetrics
    from mpisplit.serving.server import default_model_name
    from mpisplit.serving.validation import ModelInfo

    world = MPI.COMM_WORLD
    install_abort_on_exception(world)
    with agree(world):
        tp = _check(args, world.Get_size())
    ms.limit_blas_threads(world)
    grid = ms.ProcessGrid(tp=tp)
    model, tokenizer, eos = load_model_and_tokenizer(
        grid, ckpt=args.ckpt, hf=args.hf, gguf=args.gguf, dtype=args.dtype, max_model_len=args.max_model_len,
        quantized=keep_gguf_blocks(args, world.Get_rank(), "mpisplit chat"))
    report_blocks(model, "mpisplit chat", args.dtype, file=sys.stderr)
    with agree(world):
        template = load_chat_template(args.hf or args.gguf, args.chat_template)
        if template is None:
            raise ValueError(f"{args.hf or args.gguf or args.ckpt!r} has no chat template (no chat_template.jinja, no "
                             "chat_template in tokenizer_config.json): give one with --chat-template FILE")
        if tokenizer is None:
            raise ValueError(f"{args.hf or args.gguf or args.ckpt!r} has no tokenizer; chat needs one")
    model.eval()
    engine = Engine(model, max_batch=1, eos_token_ids=eos, tokenizer=tokenizer)
    channel = ControlChannel(grid.world)
    if channel.rank != 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 ends the session for every rank
        follow(engine, channel)
    else:
        name = default_model_name(args.ckpt or args.hf or args.gguf)
        info = ModelInfo(name, model.config.vocab_size, model.config.block_size, tokenizer, eos_token_ids=eos)
        controller = Controller(engine, channel, tokenizer, ServerMetrics(1), max_queue=1, drain_s=0.0)
        Terminal.note(f"mpisplit chat: {name!r} on {channel.size} rank{'s' if channel.size > 1 else ''}; "
                      "/reset forgets the conversation, /exit or Ctrl-D ends it")
        ChatSession(controller, info, template, args).run()
    channel.free()
    grid.free()
    return 0
