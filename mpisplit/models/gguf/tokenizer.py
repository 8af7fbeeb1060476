"""A GGUF file's tokenizer as tokenizer.json + tokenizer_config.json, built with `tokenizers`.

tokenizer.ggml.model names the kind:

    "gpt2"   byte-level BPE: tokens (already in the byte-to-unicode alphabet), merges "a b", and the
             pre-tokenizer split named by tokenizer.ggml.pre (llama.cpp's names; see _SPLITS)
    "llama"  SentencePiece BPE: tokens with "\u2581" for spaces, scores, byte tokens <0xXX> for
             byte fallback; the merges are every pair of tokens whose concatenation is a normal
             token, ranked by that token's score (the order SentencePiece merges in)

tokenizer.ggml.token_type marks control tokens (3), which become special added tokens, and
user-defined ones (4), which become plain added tokens (the unknown token, 2, is special too):
both are matched whole in the text.
bos/eos/unk/pad come from tokenizer.ggml.*_token_id, add_bos/add_eos from tokenizer.ggml.add_*_token,
and tokenizer.chat_template is carried into tokenizer_config.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mpisplit.models.gguf.config import Source, open_file
from mpisplit.models.gguf.reader import GGUFFile

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer splits (the regular expressions llama.cpp applies for each tokenizer.ggml.pre).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (splits applied in turn, whether a pre-token in the vocabulary skips the merges)
_SPLITS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": ((_GPT2_SPLIT,), False),
    "gpt2": ((_GPT2_SPLIT,), False),
    "gpt-2": ((_GPT2_SPLIT,), False),
    # Every digit alone first (SmolLM, StarCoder and relatives).
    **{pre: ((r"\p{N}", _GPT2_SPLIT), False) for pre in ("smollm", "starcoder", "refact", "codeshell")},
    **{pre: ((_LLAMA3_SPLIT,), True) for pre in ("llama3", "llama-v3", "llama-bpe")},
    "smaug-bpe": ((_LLAMA3_SPLIT,), False),
    **{pre: ((_QWEN2_SPLIT,), False) for pre in ("qwen2", "deepseek-r1-qwen")},
}


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ValueError(
            "writing a GGUF file's tokenizer needs the 'tokenizers' package: pip install tokenizers"
        ) from None
    return tokenizers


def _metadata(f: GGUFFile) -> dict[str, Any]:
    tokens = f.get("tokenizer.ggml.tokens", list)
    types = f.get("tokenizer.ggml.token_type", list, [NORMAL] * len(tokens))
    if len(types) != len(tokens) or not all(isinstance(t, str) for t in tokens):
        raise ValueError(
            f"{f.path}: tokenizer.ggml.tokens ({len(tokens)}) and token_type ({len(types)}) do not match"
        )
    ids = {}
    for name in ("bos", "eos", "unknown", "padding"):
        i = f.get(f"tokenizer.ggml.{name}_token_id", int, None)
        if i is not None and not 0 <= i < len(tokens):
            raise ValueError(f"{f.path}: tokenizer.ggml.{name}_token_id {i} is outside the {len(tokens)} tokens")
        ids[name] = i
    return {"model": f.get("tokenizer.ggml.model", str), "tokens": tokens, "types": types, "ids": ids}


def _byte_level(f: GGUFFile, meta: dict[str, Any], tk: Any) -> tuple[Any, bool]:
    """(Tokenizer, add_bos default) of a "gpt2" vocabulary."""
    pre = f.get("tokenizer.ggml.pre", str, "default")
    if pre not in _SPLITS:
        raise ValueError(
            f"{f.path}: tokenizer.ggml.pre {pre!r} is not supported; expected one of {sorted(_SPLITS)}"
        )
    splits, ignore_merges = _SPLITS[pre]
    merges = []
    for m in f.get("tokenizer.ggml.merges", list):
        pair = m.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{f.path}: merge {m!r} is not two tokens separated by one space")
        merges.append((pair[0], pair[1]))
    # A duplicate token keeps its last id, as llama.cpp's text-to-token map does.
    vocab = {t: i for i, t in enumerate(meta["tokens"])}
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    pieces = [tk.pre_tokenizers.Split(tk.Regex(s), behavior="isolated") for s in splits]
    byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(pieces + [byte_level])
    tok.decoder = tk.decoders.ByteLevel()
    return tok, pre in ("llama3", "llama-v3", "llama-bpe")


def _sentencepiece(f: GGUFFile, meta: dict[str, Any], tk: Any) -> tuple[Any, bool]:
    """(Tokenizer, add_bos default) of a "llama" (SentencePiece BPE) vocabulary."""
    tokens, types = meta["tokens"], meta["types"]
    scores = f.get("tokenizer.ggml.scores", list)
    if len(scores) != len(tokens):
        raise ValueError(
            f"{f.path}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens"
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for t, kind, score in zip(tokens, types, scores):
        if kind != NORMAL:
            continue
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, -len(left), vocab[left], vocab[right], left, right))
    merges.sort()
    unk = meta["ids"]["unknown"]
    model = tk.models.BPE(
        vocab=vocab, merges=[(m[4], m[5]) for m in merges], fuse_unk=True, byte_fallback=True,
        unk_token=None if unk is None else tokens[unk],
    )
    tok = tk.Tokenizer(model)
    prefix = f.get("tokenizer.ggml.add_space_prefix", bool, True)
    # The space prefix goes before the text's first piece only (not after each special token).
    tok.pre_tokenizer = tk.pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [tk.decoders.Replace("\u2581", " "), tk.decoders.ByteFallback(), tk.decoders.Fuse()]
    if prefix:
        steps.append(tk.decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = tk.decoders.Sequence(steps)
    return tok, True


def build_tokenizer(path: Source) -> tuple[Any, dict[str, Any]]:
    """(tokenizers.Tokenizer, tokenizer_config dict) of the file's tokenizer."""
    f = open_file(path)
    tk = _tokenizers()
    meta = _metadata(f)
    builders = {"gpt2": _byte_level, "llama": _sentencepiece}
    if meta["model"] not in builders:
        raise ValueError(
            f"{f.path}: tokenizer.ggml.model {meta['model']!r} is not supported; "
            f"expected one of {sorted(builders)}"
        )
    tok, bos_default = builders[meta["model"]](f, meta, tk)
    tokens, types = meta["tokens"], meta["types"]
    pairs = list(zip(tokens, types))
    tok.add_special_tokens(
        [tk.AddedToken(t, special=True, normalized=False) for t, k in pairs if k in (CONTROL, UNKNOWN)]
    )
    tok.add_tokens([tk.AddedToken(t, special=False, normalized=False) for t, k in pairs if k == USER_DEFINED])
    if (built := tok.get_vocab_size(with_added_tokens=True)) != len(tokens):
        raise ValueError(f"{f.path}: the tokenizer built from {len(tokens)} tokens has {built}")
    add_bos = f.get("tokenizer.ggml.add_bos_token", bool, bos_default)
    add_eos = f.get("tokenizer.ggml.add_eos_token", bool, False)
    ids = meta["ids"]
    _post_process(tok, tk, tokens, ids["bos"] if add_bos else None, ids["eos"] if add_eos else None, meta["model"])
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos and ids["bos"] is not None,
        "add_eos_token": add_eos and ids["eos"] is not None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": f.get(f"{f.arch}.context_length", int, 2048),
    }
    for name in ("bos", "eos", "unknown", "padding"):
        if ids[name] is not None:
            config[{"unknown": "unk_token", "padding": "pad_token"}.get(name, f"{name}_token")] = tokens[ids[name]]
    if (template := f.get("tokenizer.chat_template", str, None)) is not None:
        config["chat_template"] = template
    return tok, config


def _post_process(tok: Any, tk: Any, tokens: list[str], bos: int | None, eos: int | None, model: str) -> None:
    """bos before and eos after each sequence where the file asks for them."""
    if bos is None and eos is None:
        if model == "gpt2":
            tok.post_processor = tk.processors.ByteLevel(trim_offsets=False)
        return
    first = [] if bos is None else [tokens[bos]]
    last = [] if eos is None else [tokens[eos]]
    single = " ".join(first + ["$A"] + last)
    pair = " ".join(first + ["$A"] + last + [f"{t}:1" for t in first] + ["$B:1"] + [f"{t}:1" for t in last])
    specials = [(tokens[i], i) for i in dict.fromkeys(i for i in (bos, eos) if i is not None)]
    tok.post_processor = tk.processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def write_tokenizer(path: Source, folder: str | os.PathLike) -> None:
    """tokenizer.json and tokenizer_config.json (chat template, special tokens) into `folder`."""
    save_tokenizer(*build_tokenizer(path), folder)


def save_tokenizer(tok: Any, config: dict[str, Any], folder: str | os.PathLike) -> None:
    folder = Path(folder)
    tok.save(str(folder / "tokenizer.json"))
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")
