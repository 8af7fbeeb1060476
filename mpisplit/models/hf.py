"""Which Hugging Face layout a folder holds: GPT-2 (hf_gpt2.py) or the Llama family (hf_llama.py)."""

from __future__ import annotations

import os

import numpy as np

from mpisplit.models import hf_gpt2, hf_llama
from mpisplit.models.config import GPTConfig
from mpisplit.models.hf_llama_config import parse_config


def read_config(folder: str | os.PathLike, max_model_len: int | None = None) -> GPTConfig:
    """The GPTConfig of a Hugging Face folder of any supported model_type (ValueError otherwise)."""
    from pathlib import Path

    if hf_llama.is_llama_folder(folder):
        return parse_config(Path(folder), max_model_len)
    return hf_gpt2.read_config(folder)


def weights_dtype(folder: str | os.PathLike) -> np.dtype:
    """float64 when the folder's embedding is stored in F64, else float32."""
    if hf_llama.is_llama_folder(folder):
        return hf_llama.weights_dtype(folder)
    return hf_gpt2.weights_dtype(folder)
