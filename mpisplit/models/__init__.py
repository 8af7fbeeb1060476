"""Whole models built from the split layers: GPT (gpt.py), its shape (config.py), its pipeline
stages (partition.py), activation recomputation (recompute.py) and the Hugging Face GPT-2 folder
layout (hf_gpt2.py). Imports nn/ and below."""

from mpisplit.models.config import GPTConfig
from mpisplit.models.gpt import GPT

__all__ = ["GPT", "GPTConfig"]
