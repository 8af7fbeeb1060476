"""`mpisplit prepare --chat`: conversations into token shards and, beside them, loss-mask shards.

    out/  train-00000.bin ...        the conversations' token ids (no eos added: the template ends turns)
          train-mask-00000.bin ...   one byte per token: 1 where the token counts in the loss
          train-index.npy            token offsets of the conversations (train-mask-index.npy the same)
          val-...                    the held-out conversations, likewise

Conversations are held out whole by prepare's rule. A conversation with no token to train on
(no assistant answer) is skipped and counted; one longer than `seq_len` tokens is an error
naming it, or cut to its first `seq_len` tokens with `truncate`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from mpisplit.data.chat_mask import TRAIN_ON, encode_conversation
from mpisplit.data.conversations import iter_conversations
from mpisplit.data.manifest import FORMAT
from mpisplit.data.shards import SplitWriter, entropy_of_counts
from mpisplit.data.tokenizer import token_dtype

SPLITS = ("train", "val")


def check_chat_options(train_on: str, seq_len: int | None, truncate: bool) -> None:
    if train_on not in TRAIN_ON:
        raise ValueError(f"--train-on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if seq_len is not None and seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {seq_len}")
    if truncate and seq_len is None:
        raise ValueError("--truncate cuts conversations to --seq-len tokens: give --seq-len too")


class _Counts:
    def __init__(self) -> None:
        self.skipped = self.truncated = 0
        self.trained = {s: 0 for s in SPLITS}
        self.longest = {s: 0 for s in SPLITS}


def write_chat(files: list[Path], tok: Any, folder: Path, opts: Any, bar: Any, split_of: Any) -> dict[str, Any]:
    """Write the chat corpus of `files` into `folder`; its manifest (without "inputs")."""
    from mpisplit.models.chat_template import load_chat_template

    template = load_chat_template(tok.folder, opts.chat_template)
    if template is None:
        raise ValueError(f"the tokenizer folder {str(tok.folder)!r} has no chat template (no chat_template.jinja, "
                         "no chat_template in tokenizer_config.json): give one with --chat-template FILE")
    dtype = token_dtype(tok.vocab_size)
    tokens = {s: SplitWriter(folder, s, dtype, tok.vocab_size, opts.shard_bytes) for s in SPLITS}
    masks = {s: SplitWriter(folder, f"{s}-mask", "uint8", 2, opts.shard_bytes) for s in SPLITS}
    counts, held, i = _Counts(), None, 0
    for conv in iter_conversations(files):
        bar.update(conv.disk_bytes)
        kept = _encode(conv, tok, template, opts, counts)
        if kept is None:
            continue
        if held is not None:
            _add(held, split_of(i - 1, opts.val_fraction), tokens, masks, counts)
        held, i = kept, i + 1
    if held is None:
        raise ValueError(f"no conversation to train on: the inputs ({len(files)} file(s)) hold none with a token "
                         f"to train on under --train-on {opts.train_on} ({counts.skipped} skipped)")
    _add(held, "val" if tokens["val"].documents == 0 else split_of(i - 1, opts.val_fraction), tokens, masks, counts)
    if tokens["train"].documents == 0:
        raise ValueError("the inputs hold a single conversation to train on, which is held out for validation; "
                         "training needs at least one more")
    return _manifest(tok, dtype, opts, template, tokens, masks, counts)


def _encode(conv: Any, tok: Any, template: Any, opts: Any, counts: _Counts) -> tuple[np.ndarray, np.ndarray] | None:
    ids, mask = encode_conversation(tok.tokenizer.tokenizer, template, conv.messages, conv.tools, opts.train_on,
                                    conv.source)
    if opts.seq_len is not None and len(ids) > opts.seq_len:
        if not opts.truncate:
            raise ValueError(f"{conv.source}: the conversation has {len(ids)} tokens, more than --seq-len "
                             f"{opts.seq_len}; raise --seq-len, or --truncate to keep its first {opts.seq_len}")
        ids, mask = ids[: opts.seq_len], mask[: opts.seq_len]
        counts.truncated += 1
    if not mask[1:].any():  # the first token is never a target
        counts.skipped += 1
        return None
    return ids, mask


def _add(conv: tuple[np.ndarray, np.ndarray], split: str, tokens: dict, masks: dict, counts: _Counts) -> None:
    ids, mask = conv
    tokens[split].add(ids)
    masks[split].add(mask)
    counts.trained[split] += int(mask[1:].sum())
    counts.longest[split] = max(counts.longest[split], len(ids))


def _manifest(tok: Any, dtype: str, opts: Any, template: Any, tokens: dict, masks: dict,
              counts: _Counts) -> dict[str, Any]:
    result = {}
    for s in SPLITS:
        result[s] = {**tokens[s].close(), "mask": masks[s].close(), "trained_tokens": counts.trained[s],
                     "longest": counts.longest[s]}
    entropy = entropy_of_counts(tokens["train"].counts)  # counted as the shards were written
    return {
        "format": FORMAT, "kind": "chat", "tokenizer": tok.describe(), "dtype": dtype,
        "val_fraction": opts.val_fraction, "holdout": "documents", **result, "train_unigram_entropy": entropy,
        "chat": {"train_on": opts.train_on, "template": template.origin,
                 "template_sha256": hashlib.sha256(template.source.encode("utf-8")).hexdigest(),
                 "seq_len": opts.seq_len, "truncated": counts.truncated, "skipped": counts.skipped},
    }

