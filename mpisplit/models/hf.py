"""Where pretrained weights come from: a Hugging Face folder of GPT-2 (hf_gpt2.py) or of the
Llama family (hf_llama.py), or a GGUF file (gguf/: read as the Llama-family folder it converts to).
One set of functions for every caller (training, generation, serving, conversion)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mpisplit.models import hf_gpt2, hf_llama
from mpisplit.models.config import GPTConfig
from mpisplit.models.hf_llama_config import config_from_dict, parse_config


def is_gguf(source: str | os.PathLike) -> bool:
    """A GGUF file (by its name; its contents are checked when it is opened)."""
    return str(source).endswith(".gguf") and not Path(source).is_dir()


def read_config(source: str | os.PathLike, max_model_len: int | None = None) -> GPTConfig:
    """The GPTConfig of a Hugging Face folder of any supported model_type or of a GGUF file."""
    if is_gguf(source):
        from mpisplit.models.gguf import hf_config

        return config_from_dict(hf_config(source), source, max_model_len)
    if hf_llama.is_llama_folder(source):
        return parse_config(Path(source), max_model_len)
    return hf_gpt2.read_config(source)


def weights_dtype(source: str | os.PathLike) -> np.dtype:
    """float64 when the embedding is stored in F64, else float32 (GGUF: float32)."""
    if is_gguf(source):
        return np.dtype(np.float32)
    if hf_llama.is_llama_folder(source):
        return hf_llama.weights_dtype(source)
    return hf_gpt2.weights_dtype(source)


def from_gguf(cls: type, path: str | os.PathLike, grid: Any, dtype: Any = "float32", *,
              keep_quantized: bool = False, **options: Any) -> Any:
    """A `cls` (GPT) with the weights of a GGUF file, each rank dequantizing only its slabs; with
    `keep_quantized` its matrices stay in the file's blocks where a kernel takes them (serving:
    nn/quantized.py; the model's quantized_report says which did not). Collective over
    grid.world: any failure raises on every rank."""
    from mpisplit.models.gguf import GGUFWeights
    from mpisplit.runtime.errors import agree

    with agree(grid.world):
        weights = GGUFWeights(path, keep_quantized=keep_quantized)
    return hf_llama.from_pretrained(cls, path, grid, dtype, source=weights, config=weights.config, **options)


def load_tokenizer(source: str | os.PathLike, vocab_size: int | None = None) -> Any:
    """The tokenizer of a folder (tokenizer.json, vocab.json + merges.txt; None without one) or
    of a GGUF file (built from its metadata)."""
    from mpisplit.models.hf_tokenizer import HFTokenizer, load_hf_tokenizer

    if not is_gguf(source):
        return load_hf_tokenizer(source, vocab_size)
    from mpisplit.models.gguf.tokenizer import build_tokenizer

    tok = HFTokenizer(build_tokenizer(source)[0], "GGUF metadata")
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer of {source} has {tok.vocab_size} tokens; the model's vocabulary has {vocab_size}")
    return tok
