"""The engine every rank runs: sequences in KV-cache slots, one batched step at a time.

The state here is replicated: every rank applies the same additions and removals (broadcast by
rank 0, see channel.py) and runs the same step, so every rank holds the same sequences, feeds
the same tokens and draws the same next tokens. Per step, each sequence still in its prompt
feeds its next chunk of at most `prefill_chunk` tokens (chunking depends on the prompt alone,
never on the batch), and each decoding sequence feeds its last token; see batch.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpisplit.runtime.faults.injection import FaultInjector
from mpisplit.serving.batch import Segment, SlotCache, forward_segments
from mpisplit.serving.sampling import SamplingParams, choose


@dataclass
class SequenceSpec:
    """What rank 0 broadcasts for a new request (already validated)."""

    rid: int
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams

    def to_json(self) -> dict:
        s = self.sampling
        return {"rid": self.rid, "prompt": self.prompt, "max_tokens": self.max_tokens,
                "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "seed": s.seed}

    @classmethod
    def from_json(cls, d: dict) -> SequenceSpec:
        sampling = SamplingParams(temperature=d["temperature"], top_k=d["top_k"], top_p=d["top_p"], seed=d["seed"])
        return cls(rid=d["rid"], prompt=list(d["prompt"]), max_tokens=d["max_tokens"], sampling=sampling)


@dataclass
class Sequence:
    spec: SequenceSpec
    slot: int
    rng: np.random.Generator
    fed: int = 0  # tokens in the cache
    generated: list[int] = field(default_factory=list)

    @property
    def in_prompt(self) -> bool:
        return self.fed < len(self.spec.prompt)


@dataclass
class StepOutput:
    """A token drawn this step for request `rid`, the logits it was drawn from, and whether
    the sequence has now reached its max_tokens (and left the engine)."""

    rid: int
    token: int
    logits: np.ndarray
    finished: bool


class Engine:
    """KV-cache slots and the sequences in them; `step()` is collective over the TP ranks."""

    def __init__(self, model: Any, max_batch: int, prefill_chunk: int = 256) -> None:
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch} and {prefill_chunk}")
        self.model, self.max_batch, self.prefill_chunk = model, max_batch, prefill_chunk
        self.cache = SlotCache(model, max_batch)
        self.running: dict[int, Sequence] = {}  # rid -> sequence
        self.free_slots = list(range(max_batch))
        self.steps = 0  # steps run (the "step" of MPISPLIT_FAULT, a testing aid inactive when unset)
        self.faults = FaultInjector.from_env(model.grid.rank)

    @property
    def has_room(self) -> bool:
        return bool(self.free_slots)

    def add(self, spec: SequenceSpec) -> None:
        if not self.free_slots:
            raise RuntimeError("no free KV-cache slot")
        if spec.rid in self.running:
            raise RuntimeError(f"request {spec.rid} is already running")
        if len(spec.prompt) + spec.max_tokens > self.model.config.block_size or not spec.prompt:
            raise ValueError(f"request {spec.rid} does not fit the context")
        slot = self.free_slots.pop(0)
        self.running[spec.rid] = Sequence(spec, slot, np.random.default_rng(spec.sampling.seed))

    def remove(self, rid: int) -> None:
        seq = self.running.pop(rid, None)
        if seq is not None:
            self.free_slots.append(seq.slot)
            self.free_slots.sort()

    def apply(self, payload: dict) -> None:
        """Removals, then additions, as broadcast by rank 0."""
        for rid in payload.get("remove", []):
            self.remove(rid)
        for d in payload.get("add", []):
            self.add(SequenceSpec.from_json(d))

    def _batch(self) -> tuple[list[Sequence], list[Segment], np.ndarray]:
        seqs = sorted(self.running.values(), key=lambda s: s.slot)
        segments, feeds = [], []
        for seq in seqs:
            if seq.in_prompt:
                chunk = seq.spec.prompt[seq.fed: seq.fed + self.prefill_chunk]
            else:
                chunk = seq.generated[-1:]
            segments.append(Segment(seq.slot, seq.fed, len(chunk)))
            feeds.extend(chunk)
        return seqs, segments, np.asarray(feeds, dtype=np.int64)

    def step(self) -> list[StepOutput]:
        """Feed every running sequence once; draw a token for each that has read its prompt."""
        if not self.running:
            return []
        self.steps += 1
        if self.faults:
            self.faults.before_step(self.steps)
        seqs, segments, tokens = self._batch()
        logits = forward_segments(self.model, tokens, segments, self.cache)
        outputs = []
        for seq, seg, row in zip(seqs, segments, logits):
            seq.fed += seg.count
            if seq.in_prompt:
                continue
            token = choose(row, seq.spec.sampling, seq.rng)
            seq.generated.append(token)
            finished = len(seq.generated) >= seq.spec.max_tokens
            if finished:
                self.remove(seq.spec.rid)
            outputs.append(StepOutput(seq.spec.rid, token, row, finished))
        return outputs
