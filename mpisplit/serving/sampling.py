"""Choosing the next token from a row of logits, and the log-probabilities a client asks for.

Every rank draws with the sequence's own generator, seeded by the request, from logits that
are bit for bit the same on every rank: so every rank picks the same token, and a seeded
request draws the same tokens whatever else is in the batch. At top_p = 1 the draw is the one
`GPT.generate` makes (softmax of logits / temperature over the top k, then `rng.choice`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0: greedy. top_k None: all tokens. top_p 1: no nucleus cut."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from float64 logits (V,)."""
    if params.temperature == 0.0:
        return int(logits.argmax())
    z = logits / params.temperature
    if params.top_k is not None and params.top_k < z.shape[-1]:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max()
    p = np.exp(z)
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        # the smallest set reaching top_p (a sum that is top_p but for rounding reaches it)
        keep = order[: int(np.searchsorted(cum, params.top_p * (1 - 1e-12))) + 1]
        cut = np.zeros_like(p)
        cut[keep] = p[keep]
        p = cut / cut.sum()
    return int(rng.choice(p.shape[-1], p=p))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the vocabulary of the model itself (before temperature or truncation)."""
    z = logits - logits.max()
    return z - np.log(np.exp(z).sum())


def top_logprobs(logprobs: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n most likely (token id, log p), most likely first; ties by the smaller id."""
    if n <= 0:
        return []
    order = np.lexsort((np.arange(logprobs.shape[-1]), -logprobs))[:n]
    return [(int(i), float(logprobs[i])) for i in order]
