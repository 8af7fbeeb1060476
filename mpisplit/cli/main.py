"""The `mpisplit` command: one subcommand per job, each with its own --help.

    mpisplit prepare --tokenizer FOLDER --out data/corpus docs/   # token shards for --data
    mpirun -n 4 mpisplit train --steps 600          # = python train.py
    mpirun -n 2 mpisplit generate --ckpt out --prompt "The "
    mpirun -n 2 mpisplit serve --ckpt out --port 8000
    mpirun -n 2 mpisplit chat --hf smollm2-folder
    mpirun -n 2 mpisplit eval --hf smollm2-folder --ppl wiki.txt
    mpirun -n 2 mpisplit convert --to-hf out gpt2-export
    mpisplit plot out
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mpisplit import __version__

# name -> (module with main(argv, prog) and USER_ERRORS, one line of help)
COMMANDS = {
    "prepare": ("mpisplit.cli.prepare", "tokenize a corpus once into memory-mapped token shards"),
    "train": ("mpisplit.cli.train", "train or fine-tune (LoRA, chat data) a GPT-2 or Llama-family model over "
                                    "MPI ranks (dp x pp x tp)"),
    "generate": ("mpisplit.cli.generate", "generate text from a checkpoint, a Hugging Face folder (GPT-2, Llama "
                                          "family) or a GGUF file"),
    "serve": ("mpisplit.cli.serve", "serve a model over an OpenAI-compatible HTTP API from all ranks"),
    "chat": ("mpisplit.cli.chat", "a conversation with a model in the terminal, from all ranks"),
    "eval": ("mpisplit.cli.eval", "perplexity and bits per byte of a text under a model, from all ranks"),
    "convert": ("mpisplit.cli.convert", "convert between mpisplit checkpoints, Hugging Face folders and GGUF files"),
    "plot": ("mpisplit.cli.plot", "draw a run's loss curve (RUN_DIR/loss.png)"),
}


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="mpisplit", description="Layer-split (tensor-parallel) training and serving on MPI.",
        epilog=f"commands:\n{listing}\n\n'mpisplit COMMAND --help' shows a command's flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"mpisplit {__version__}")
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help=", ".join(COMMANDS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the command's own flags")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script; exits with the command's status."""
    ns = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    module = importlib.import_module(COMMANDS[ns.command][0])
    from mpisplit.runtime.errors import run_cli

    run_cli(lambda: module.main(ns.args, prog=f"mpisplit {ns.command}"), module.USER_ERRORS)


if __name__ == "__main__":
    main()
