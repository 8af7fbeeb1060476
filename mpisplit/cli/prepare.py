"""`mpisplit prepare`: tokenize a corpus once into memory-mapped token shards for training.

    mpisplit prepare --tokenizer gpt2-folder --out data/corpus books/ more.txt web.jsonl.gz
    mpirun -n 4 mpisplit train --data data/corpus --tokenizer gpt2-folder      # a fresh model
    mpirun -n 4 mpisplit train --data data/corpus --init-from gpt2-folder      # fine-tuning

Inputs: text files (one document each, or cut by --split-text), JSONL files (.jsonl, .ndjson; one document per line,
the string under --field), either compressed as .gz, and folders (walked in sorted order).

    mpisplit prepare --chat --tokenizer smollm2-folder --out data/chat --seq-len 2048 chats.jsonl

With --chat every JSONL line is a conversation (OpenAI's "messages" or ShareGPT's
"conversations"), rendered by the tokenizer folder's chat template and stored with a loss mask
(by default the assistant answers only, each with its end-of-turn token).
Exit status 0 done, 2 bad input (one "error:" line, nothing written at --out).
"""

from __future__ import annotations

import argparse

from mpisplit.data.chat_mask import TRAIN_ON
from mpisplit.data.prepare import SHARD_BYTES, PrepareOptions, prepare, usable_cores

USER_ERRORS = (ValueError, TypeError, FileNotFoundError)
D = PrepareOptions()


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Tokenize text, JSONL and .gz files into token shards that training memory-maps.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text or JSONL files (.gz too), or folders")
    p.add_argument("--tokenizer", required=True, metavar="FOLDER",
                   help="a Hugging Face tokenizer folder (tokenizer.json, or vocab.json + merges.txt)")
    p.add_argument("--out", required=True, metavar="DIR", help="the corpus folder to create (must not exist)")
    p.add_argument("--field", default=D.field, help="the JSONL field holding a document's text")
    p.add_argument("--split-text", default=D.split_text, metavar="HOW",
                   help="how a text file becomes documents: 'file' (the whole file), 'blank-lines' (cut at every "
                        "run of blank lines) or a size such as 64KiB or 1MiB (pieces of about that many characters, "
                        "cut at line ends)")
    p.add_argument("--val-fraction", type=float, default=D.val_fraction,
                   help="share of the documents held out, whole, for validation (at least one document); a corpus "
                        "of a single document (one text file, not cut) holds out its last share of tokens instead, "
                        "as nanoGPT does")
    p.add_argument("--workers", type=int, default=D.workers,
                   help=f"encoding processes (0: the cores this process may use, here {usable_cores()})")
    p.add_argument("--eos", default=D.eos, metavar="TOKEN",
                   help="the token that ends every document (default: the tokenizer folder's eos token)")
    p.add_argument("--shard-mib", type=float, default=SHARD_BYTES / 2**20, help="largest shard file, in MiB")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    chat = p.add_argument_group("conversations (--chat)")
    chat.add_argument("--chat", action="store_true",
                      help="JSONL conversations (OpenAI's messages or ShareGPT's conversations), rendered by the "
                           "chat template, stored with a loss mask")
    chat.add_argument("--train-on", choices=TRAIN_ON, default=D.train_on,
                      help="the tokens that count in the loss: every assistant answer with its end-of-turn token, "
                           "only the last answer, or every token")
    chat.add_argument("--seq-len", type=int, default=D.seq_len, metavar="N",
                      help="the most tokens a conversation may have (the training context); a longer one is an "
                           "error naming it, unless --truncate")
    chat.add_argument("--truncate", action="store_true", help="cut a conversation longer than --seq-len to its "
                                                                 "first --seq-len tokens")
    chat.add_argument("--chat-template", metavar="FILE", default=D.chat_template,
                      help="a Jinja chat template instead of the tokenizer folder's")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    options = PrepareOptions(field=args.field, split_text=args.split_text, val_fraction=args.val_fraction,
                             workers=args.workers, shard_bytes=int(args.shard_mib * 2**20), eos=args.eos, progress=not args.no_progress,
                             chat=args.chat, train_on=args.train_on, seq_len=args.seq_len, truncate=args.truncate,
                             chat_template=args.chat_template)
    manifest = prepare(args.inputs, args.tokenizer, args.out, options)
    train, val = manifest["train"], manifest["val"]
    if manifest.get("kind") == "chat":
        return _chat_summary(args.out, manifest)
    held = (f"validation: the last {val['tokens']:,} tokens of the single document"
            if manifest["holdout"] == "tail" else
            f"{val['documents']:,} validation documents ({val['tokens']:,} tokens)")
    print(
        f"{args.out}: {train['documents']:,} train documents ({train['tokens']:,} tokens, "
        f"{len(train['shards'])} shard(s)), {held}, {manifest['dtype']}, "
        f"vocabulary {manifest['tokenizer']['vocab_size']:,}, eos id {manifest['tokenizer']['eos_id']}",
        flush=True,
    )
    return 0


def _chat_summary(out: str, manifest: dict) -> int:
    train, val, chat = manifest["train"], manifest["val"], manifest["chat"]
    print(
        f"{out}: {train['documents']:,} train conversations ({train['tokens']:,} tokens, {train['trained_tokens']:,} "
        f"in the loss), {val['documents']:,} validation conversations ({val['tokens']:,} tokens, "
        f"{val['trained_tokens']:,} in the loss), longest {max(train['longest'], val['longest']):,} tokens; "
        f"--train-on {chat['train_on']}, template {chat['template']}; {chat['skipped']} skipped (nothing to train "
        f"on), {chat['truncated']} truncated",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    from mpisplit.runtime.errors import run_cli

    run_cli(main, USER_ERRORS)
