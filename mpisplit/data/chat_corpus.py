"""`mpisplit prepare --chat`: conversations into token shards and, beside them, loss-mask shards.

    out/  train-00000.bin ...        the conversations' token ids (no eos added: the template ends turns)
          train-mask-00000.bin ...   one byte per token: 1 where the token counts in the loss
          train-index.npy            token offsets of the conversations (train-mask-index.npy the same)
          val-...                    the held-out conversations, likewise

Conversations are encoded in batches by `workers` processes (in order), each holding the tokenizer
and the compiled template. Conversations are held out whole by prepare's rule. A conversation with no token to train on
(no assistant answer) is skipped and counted; one longer than `seq_len` tokens is an error
naming it, or cut to its first `seq_len` tokens with `truncate`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mpisplit.data.chat_mask import TRAIN_ON, encode_conversation
from mpisplit.data.conversations import Conversation, iter_conversations
from mpisplit.data.encode import ordered_pool_map, usable_cores
from mpisplit.data.manifest import FORMAT
from mpisplit.data.shards import SplitWriter, entropy_of_counts
from mpisplit.data.tokenizer import token_dtype

SPLITS = ("train", "val")
BATCH_CONVERSATIONS = 256  # conversations per task sent to a worker


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
    for encoded, disk in _encoded(files, tok, template, opts):
        for ids, mask, cut in encoded:
            counts.truncated += cut
            if ids is None:
                counts.skipped += 1
                continue
            if held is not None:
                _add(held, split_of(i - 1, opts.val_fraction), tokens, masks, counts)
            held, i = (ids, mask), i + 1
        bar.update(disk)
    if held is None:
        raise ValueError(f"no conversation to train on: the inputs ({len(files)} file(s)) hold none with a token "
                         f"to train on under --train-on {opts.train_on} ({counts.skipped} skipped)")
    _add(held, "val" if tokens["val"].documents == 0 else split_of(i - 1, opts.val_fraction), tokens, masks, counts)
    if tokens["train"].documents == 0:
        raise ValueError("the inputs hold a single conversation to train on, which is held out for validation; "
                         "training needs at least one more")
    return _manifest(tok, dtype, opts, template, tokens, masks, counts)


def _encoded(files: list[Path], tok: Any, template: Any, opts: Any) -> Iterator[tuple[list, int]]:
    """(each conversation's (ids, mask, truncated), disk bytes) per batch; ids and mask None when skipped."""
    workers = opts.workers or usable_cores()
    setup = (str(tok.folder), template.source, template.special_tokens, template.origin, opts.train_on,
             opts.seq_len, opts.truncate)
    batches = _batches(iter_conversations(files))
    if workers <= 1:
        _init_worker(*setup)
        yield from ((_encode_batch(batch), disk) for batch, disk in batches)
    else:
        yield from ordered_pool_map(batches, _encode_batch, _init_worker, setup, workers)


def _batches(conversations: Iterable[Conversation]) -> Iterator[tuple[list[Conversation], int]]:
    batch: list[Conversation] = []
    disk = 0
    for conv in conversations:
        batch.append(conv)
        disk += conv.disk_bytes
        if len(batch) == BATCH_CONVERSATIONS:
            yield batch, disk
            batch, disk = [], 0
    if batch:
        yield batch, disk


_worker: dict[str, Any] = {}  # this process's tokenizer, template and options (set once)


def _init_worker(folder: str, source: str, special: dict, origin: str, train_on: str, seq_len: int | None,
                 truncate: bool) -> None:
    from mpisplit.models.chat_template import ChatTemplate
    from mpisplit.models.hf_tokenizer import load_hf_tokenizer

    loaded = load_hf_tokenizer(folder)
    assert loaded is not None  # the parent opened the same folder
    _worker.update(tokenizer=loaded.tokenizer, template=ChatTemplate(source, special, origin), train_on=train_on,
                   seq_len=seq_len, truncate=truncate)


Encoded = tuple[np.ndarray | None, np.ndarray | None, int]


def _encode_batch(batch: list[Conversation]) -> list[Encoded]:
    return [_encode(conv, **_worker) for conv in batch]


def _encode(conv: Conversation, tokenizer: Any, template: Any, train_on: str, seq_len: int | None,
            truncate: bool) -> Encoded:
    """(ids, mask, 1 if cut to seq_len else 0); ids and mask None when nothing is left to train on."""
    ids, mask = encode_conversation(tokenizer, template, conv.messages, conv.tools, train_on, conv.source)
    cut = 0
    if seq_len is not None and len(ids) > seq_len:
        if not truncate:
            raise ValueError(f"{conv.source}: the conversation has {len(ids)} tokens, more than --seq-len "
                             f"{seq_len}; raise --seq-len, or --truncate to keep its first {seq_len}")
        ids, mask, cut = ids[:seq_len], mask[:seq_len], 1
    if not mask[1:].any():  # the first token is never a target
        return None, None, cut
    return ids, mask, cut


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

