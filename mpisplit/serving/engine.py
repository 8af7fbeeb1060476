"""The engine every rank runs: sequences in KV-cache slots, one batched step at a time.

The state here is replicated: every rank applies the same additions and removals (broadcast by
rank 0, see channel.py) and runs the same step, so every rank holds the same sequences, feeds
the same tokens and draws the same next tokens. Per step, each sequence still in its prompt
feeds its next chunk of at most `prefill_chunk` tokens (chunking depends on the prompt alone,
never on the batch), and each decoding sequence feeds its last token; see batch.py. A
sequence ends at max_tokens or at a stop token id (the model's eos ids unless ignore_eos, and
the request's stop_token_ids; not before min_tokens, which bans them until then).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpisplit.models.gpt import check_eos_ids
from mpisplit.runtime.faults.injection import FaultInjector
from mpisplit.serving.batch import Segment, SlotCache, forward_segments
from mpisplit.serving.sampling import SamplingParams, choose, process_logits


@dataclass
class SequenceSpec:
    """What rank 0 broadcasts for a new request (already validated)."""

    rid: int
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams

    def to_json(self) -> dict:
        return {"rid": self.rid, "prompt": self.prompt, "max_tokens": self.max_tokens,
                "sampling": self.sampling.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> SequenceSpec:
        return cls(rid=d["rid"], prompt=list(d["prompt"]), max_tokens=d["max_tokens"],
                   sampling=SamplingParams.from_json(d["sampling"]))


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
    """A token drawn this step for request `rid`, the model's logits it was drawn from, and
    why the sequence ended with it (and left the engine): "length" (max_tokens), "stop" (an
    eos or stop token id), "error" (sampling raised `error`; token is then -1), None: it goes on."""

    rid: int
    token: int
    logits: np.ndarray
    reason: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.reason is not None


class Engine:
    """KV-cache slots and the sequences in them; `step()` is collective over the TP ranks."""

    def __init__(self, model: Any, max_batch: int, prefill_chunk: int = 256,
                 eos_token_ids: tuple[int, ...] = (), *, max_batched_tokens: int | None = None,
                 batch_invariant: bool = True) -> None:
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch} and {prefill_chunk}")
        if max_batched_tokens is not None and max_batched_tokens < 1:
            raise ValueError(f"max_batched_tokens must be >= 1, got {max_batched_tokens}")
        self.model, self.max_batch, self.prefill_chunk = model, max_batch, prefill_chunk
        self.max_batched_tokens, self.batch_invariant = max_batched_tokens, batch_invariant
        self.eos_token_ids = tuple(int(i) for i in check_eos_ids(eos_token_ids, model.config.vocab_size))
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
        """This step's sequences: every decoding one (a token each), then prompt chunks in
        arrival order while they fit `max_batched_tokens` (at least one chunk when nothing
        decodes). A chunk is never cut to fit: its size depends on the prompt alone, so a
        sequence's arithmetic stays that of running alone; a chunk that does not fit waits."""
        chosen = [s for s in self.running.values() if not s.in_prompt]
        used, budget = len(chosen), self.max_batched_tokens
        for seq in sorted((s for s in self.running.values() if s.in_prompt), key=lambda s: s.spec.rid):
            count = min(self.prefill_chunk, len(seq.spec.prompt) - seq.fed)
            if budget is not None and used + count > budget and chosen:
                break  # this chunk and the later ones wait: first come, first read
            chosen.append(seq)
            used += count
        seqs = sorted(chosen, key=lambda s: s.slot)
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
        logits = forward_segments(self.model, tokens, segments, self.cache, self.batch_invariant)
        outputs = []
        for seq, seg, row in zip(seqs, segments, logits):
            seq.fed += seg.count
            if seq.in_prompt:
                continue
            out = self._sample(seq, row)
            if out.finished:
                self.remove(seq.spec.rid)
            outputs.append(out)
        return outputs

    def stop_ids(self, sampling: SamplingParams) -> tuple[int, ...]:
        """The token ids that end a sequence: the model's eos (unless ignore_eos) and its own."""
        return (() if sampling.ignore_eos else self.eos_token_ids) + sampling.stop_token_ids

    def _sample(self, seq: Sequence, row: np.ndarray) -> StepOutput:
        """The next token of `seq` and whether it ends there. An exception while choosing is the
        same on every rank (same logits, parameters and generator state), so it fails only
        this sequence, everywhere alike."""
        params, rid = seq.spec.sampling, seq.spec.rid
        stops = self.stop_ids(params)
        try:
            if self.faults:
                self.faults.in_sampling(self.steps)
            banned = stops if len(seq.generated) < params.min_tokens else ()
            z = process_logits(row, params, seq.spec.prompt, seq.generated, banned)
            token = choose(z, params, seq.rng)
        except Exception as exc:  # noqa: BLE001 - one request's failure, the same on every rank
            return StepOutput(rid, -1, row, "error", f"{type(exc).__name__}: {exc}")
        seq.generated.append(token)
        if token in stops and len(seq.generated) >= params.min_tokens:
            reason = "stop"
        elif len(seq.generated) >= seq.spec.max_tokens:
            reason = "length"
        else:
            reason = None
        return StepOutput(rid, token, row, reason)
