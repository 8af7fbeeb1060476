"""Choosing the next token from a row of logits, and the log-probabilities a client asks for.

Every rank draws with the sequence's own generator, seeded by the request, from logits that
are bit for bit the same on every rank: so every rank picks the same token, and a seeded
request draws the same tokens whatever else is in the batch. A failure here is therefore the
same on every rank too (same bits in, same exception out), which is why the engine may fail
one request on its own without the ranks drifting apart.

The order is vLLM's: logit_bias, then the penalties (repetition over prompt and completion,
frequency and presence over the completion), then the ban of the stop tokens while fewer
than min_tokens are out; then greedy (temperature < SAMPLING_EPS) or temperature, top_k,
min_p, top_p and a draw (min_p and top_k commute: both keep the largest logit). At top_p = 1, min_p = 0 and no bias or penalty, the draw is the one
`GPT.generate` makes (softmax of logits / temperature over the top k, then `rng.choice`).
Every step is finite for every value validation accepts: a temperature of at least 1e-5
scales finite logits to finite ones, and the largest logit is always kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from mpisplit.models.gpt import SAMPLING_EPS

__all__ = ["SAMPLING_EPS", "SamplingParams", "choose", "log_softmax", "process_logits", "top_logprobs"]


@dataclass(frozen=True)
class SamplingParams:
    """temperature < SAMPLING_EPS: greedy. top_k None: all tokens. top_p 1, min_p 0: no cut."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs, ids ascending
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    grammar: str | None = None  # structured output: an llguidance grammar (guided.py)
    adapter: int = 0  # 0: the base model; k: the k-th served LoRA adapter (the request's "model")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> SamplingParams:
        d = dict(d)
        d["logit_bias"] = tuple((int(i), float(b)) for i, b in d.get("logit_bias", ()))
        d["stop_token_ids"] = tuple(int(i) for i in d.get("stop_token_ids", ()))
        return cls(**d)


def process_logits(logits: np.ndarray, params: SamplingParams, prompt: Sequence[int],
                   generated: Sequence[int], banned: Sequence[int] = ()) -> np.ndarray:
    """float64 logits (V,) after bias, penalties and bans (a new array; `logits` is kept)."""
    z = np.array(logits, dtype=np.float64)
    V = z.shape[-1]
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias)
        z[np.asarray(ids)] += np.asarray(bias)
    if params.repetition_penalty != 1.0:
        # transformers' rule: a positive logit is divided by the penalty, a negative one multiplied
        seen = np.unique(np.concatenate([np.asarray(prompt, dtype=np.int64), np.asarray(generated, dtype=np.int64)]))
        s = z[seen]
        z[seen] = np.where(s > 0, s / params.repetition_penalty, s * params.repetition_penalty)
    if generated and (params.frequency_penalty or params.presence_penalty):
        # OpenAI: logit[j] -= count[j] * frequency + (count[j] > 0) * presence
        counts = np.bincount(np.asarray(generated, dtype=np.int64), minlength=V)[:V]
        z -= counts * params.frequency_penalty + (counts > 0) * params.presence_penalty
    if len(banned):
        z[np.asarray(banned, dtype=np.int64)] = -np.inf
    return z


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from float64 logits (V,) (already through `process_logits` if wanted)."""
    if params.greedy:
        return int(logits.argmax())
    z = logits / params.temperature
    if params.top_k is not None and params.top_k < z.shape[-1]:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max()
    if params.min_p > 0.0:
        # p_j < min_p * p_max  <=>  z_j < log(min_p), with z_max = 0 (neither cut moves the max)
        z = np.where(z < np.log(params.min_p), -np.inf, z)
    p = np.exp(z)
    p /= p.sum()
    if params.top_p < 1.0:
        keep = _nucleus(p, params.top_p * (1 - 1e-12))  # a sum that is top_p but for rounding reaches it
        cut = np.zeros_like(p)
        cut[keep] = p[keep]
        p = cut / cut.sum()
    return int(rng.choice(p.shape[-1], p=p))


def _nucleus(p: np.ndarray, target: float, first: int = 64) -> np.ndarray:
    """The smallest prefix of the tokens by descending p (ties by id) whose sum reaches target.

    The same ids, and the same running sums bit for bit, as a stable argsort of the whole
    vocabulary, at O(V) per try: the m largest by partition, then every id at or above the
    m-th value (ties included) sorted; m grows 8-fold until their sum reaches target."""
    V = p.shape[-1]
    m = min(first, V)
    while True:
        kth = np.partition(p, V - m)[V - m]
        cand = np.flatnonzero(p >= kth)  # ids ascending: the stable order of equal values
        order = cand[np.argsort(-p[cand], kind="stable")]
        cum = np.cumsum(p[order])  # a prefix of the whole vocabulary's running sum
        if cum[-1] >= target or len(order) == V:
            return order[: int(np.searchsorted(cum, target)) + 1]
        m = min(8 * m, V)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the vocabulary of the model itself (before temperature or truncation)."""
    z = logits - logits.max()
    return z - np.log(np.exp(z).sum())


def top_logprobs(logprobs: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n most likely (token id, log p), most likely first; ties by the smaller id.

    O(V): the n-th largest value by partition, then a sort of the few at or above it."""
    V = logprobs.shape[-1]
    if n <= 0:
        return []
    n = min(n, V)
    kth = np.partition(logprobs, V - n)[V - n]
    cand = np.flatnonzero(logprobs >= kth)  # ids ascending; ties at the n-th value all kept
    order = cand[np.argsort(-logprobs[cand], kind="stable")][:n]
    return [(int(i), float(logprobs[i])) for i in order]
