"""Whole models built from the split layers."""

from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
