"""The engine every rank runs: sequences in the paged KV cache, one batched step at a time.

The state here is replicated: every rank applies the same additions and removals (broadcast by
rank 0, see channel.py) and runs the same step, so every rank holds the same sequences and
blocks, feeds the same tokens and draws the same next tokens. Per step, each sequence still
reading its tokens feeds its next chunk of at most `prefill_chunk` of them, and each decoding
sequence feeds its last token; see batch.py. A sequence ends at max_tokens or at a stop token
id (the model's eos ids unless ignore_eos, and the request's stop_token_ids; not before
min_tokens, which bans them until then), or where its grammar is complete (structured output,
guided.py: each rank masks the draw with the same matcher; the masks are computed while the
forward pass runs).

KV blocks (blocks.py): a sequence is admitted when the blocks of its prompt are available
(its longest cached prefix of full blocks is taken from the prefix cache instead of computed;
at least its last token is always computed, for its logits). A decoding sequence takes a new
block each time it crosses into one; when none is available, the newest sequence is
preempted: its blocks are let go (its full ones stay cached) and it is placed again, oldest
first and before any new admission, as soon as its tokens' blocks are available; it then
reads its prompt and the tokens it had generated again, and goes on drawing from its own
random generator, so its tokens are those it would have drawn without the preemption.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpisplit.models.gpt import check_eos_ids
from mpisplit.runtime.faults.injection import FaultInjector
from mpisplit.serving.batch import Segment, forward_segments
from mpisplit.serving.blocks import ROOT, BlockManager, block_digests
from mpisplit.serving.kv_format import KVFormat
from mpisplit.serving.kv_pool import PagedKV
from mpisplit.serving.sampling import (
    SamplingParams,
    choose,
    log_softmax,
    process_logits,
    top_logprobs,
)


@dataclass
class SequenceSpec:
    """What rank 0 broadcasts for a new request (already validated)."""

    rid: int
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    prompt_logprobs: int | None = None  # top alternatives of each prompt token's logprob; None: none

    def to_json(self) -> dict:
        return {"rid": self.rid, "prompt": self.prompt, "max_tokens": self.max_tokens,
                "sampling": self.sampling.to_json(), "prompt_logprobs": self.prompt_logprobs}

    @classmethod
    def from_json(cls, d: dict) -> SequenceSpec:
        return cls(rid=d["rid"], prompt=list(d["prompt"]), max_tokens=d["max_tokens"],
                   sampling=SamplingParams.from_json(d["sampling"]), prompt_logprobs=d.get("prompt_logprobs"))


@dataclass(eq=False)  # compared by identity (the engine's lists hold each once)
class Sequence:
    spec: SequenceSpec
    order: int  # admission order: the newest is preempted first
    rng: np.random.Generator
    tokens: list[int] = field(default_factory=list)  # the prompt, then the generated tokens
    generated: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # the block table; empty while preempted
    digests: list[bytes] = field(default_factory=list)  # of its full blocks whose keys are cached
    fed: int = 0  # positions in the cache
    # (token id, logprob, rank, [(id, logprob) top alternatives]) of prompt tokens 1, 2, ... so far
    prompt_lp: list[tuple[int, float, int, list]] = field(default_factory=list)
    guide: Any = None  # a guided.Guide when the request constrains its output

    @property
    def reading_prompt_logprobs(self) -> bool:
        """Whether prompt logprobs are still to be computed: its cached prefix is not reused."""
        return self.spec.prompt_logprobs is not None and len(self.prompt_lp) < len(self.spec.prompt) - 1

    @property
    def remaining(self) -> int:
        """Tokens still to feed before the next draw (1 while decoding)."""
        return len(self.tokens) - self.fed


@dataclass
class StepOutput:
    """A token drawn this step for request `rid`, the model's logits it was drawn from, and
    why the sequence ended with it (and left the engine): "length" (max_tokens), "stop" (an
    eos or stop token id: `stop_token`, whose text is not part of the completion; or a complete
    grammar), "error" (sampling raised `error`; token is then -1), None: it goes on."""

    rid: int
    token: int
    logits: np.ndarray
    reason: str | None = None
    error: str | None = None
    prompt_logprobs: list[tuple[int, float, int, list]] | None = None  # with the first token, if asked
    stop_token: bool = False

    @property
    def finished(self) -> bool:
        return self.reason is not None


class Engine:
    """Sequences (at most `max_batch`) in a paged KV cache of `kv_blocks` blocks of
    `kv_block_size` positions (default: room for max_batch full contexts); `step()` is
    collective over the TP ranks."""

    def __init__(self, model: Any, max_batch: int, prefill_chunk: int = 256,
                 eos_token_ids: tuple[int, ...] = (), *, max_batched_tokens: int | None = None,
                 batch_invariant: bool = True, kv_blocks: int | None = None, kv_block_size: int = 16,
                 prefix_cache: bool = True, tokenizer: Any = None, kv_format: KVFormat | None = None) -> None:
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch} and {prefill_chunk}")
        if max_batched_tokens is not None and max_batched_tokens < 1:
            raise ValueError(f"max_batched_tokens must be >= 1, got {max_batched_tokens}")
        self.model, self.max_batch, self.prefill_chunk = model, max_batch, prefill_chunk
        self.max_batched_tokens, self.batch_invariant = max_batched_tokens, batch_invariant
        self.eos_token_ids = tuple(int(i) for i in check_eos_ids(eos_token_ids, model.config.vocab_size))
        if kv_blocks is None:
            kv_blocks = max_batch * -(-model.config.block_size // kv_block_size)
        self.kv = PagedKV(model, kv_blocks, kv_block_size, kv_format)
        self.blocks = BlockManager(kv_blocks, kv_block_size, prefix_cache)
        self.running: dict[int, Sequence] = {}  # rid -> sequence, placed or preempted
        self.preempted: list[Sequence] = []  # waiting for blocks, oldest first
        self.preemptions = 0
        self._order = itertools.count()
        self._head_digests: tuple[int | None, list[bytes]] = (None, [])
        self.steps = 0  # steps run (the "step" of MPISPLIT_FAULT, a testing aid inactive when unset)
        self.faults = FaultInjector.from_env(model.grid.rank)
        self.tokenizer = tokenizer  # for structured output (grammars need the tokens' text)
        self._masks: Any = None  # a guided.MaskWorker, made at the first guided request

    def _guide(self, grammar: str) -> Any:
        """A matcher of `grammar` (errors surface at the sequence's first draw, on every rank alike)."""
        from mpisplit.serving import guided

        if self.tokenizer is None:
            raise ValueError("structured output needs the model's tokenizer")
        if self._masks is None:
            self._masks = guided.MaskWorker()
        return guided.Guide(guided.grammar_tokenizer(self.tokenizer, self.model.config.vocab_size,
                                                     self.eos_token_ids), grammar)

    # ------------------------------------------------------------------ admission
    @property
    def capacity(self) -> int:
        """The most positions one sequence can hold: the pool's, capped by the context."""
        return min(self.blocks.num_blocks * self.blocks.block_size, self.model.config.block_size)

    @property
    def has_room(self) -> bool:
        """Whether a new sequence may join now (a slot free, nobody preempted)."""
        return len(self.running) < self.max_batch and not self.preempted

    def can_admit(self, spec: SequenceSpec) -> bool:
        """Whether `add(spec)` would place it now."""
        if not self.has_room:
            return False
        digests = ([] if spec.prompt_logprobs is not None
                   else self._prefix_digests(spec.prompt, spec.rid, spec.sampling.adapter))
        reuse = self.blocks.cached_prefix(digests)
        need = self.blocks.blocks_for(len(spec.prompt)) - len(reuse)
        return need <= self.blocks.available - self.blocks.idle_among(reuse)

    def add(self, spec: SequenceSpec) -> None:
        if spec.rid in self.running:
            raise RuntimeError(f"request {spec.rid} is already running")
        if len(spec.prompt) + spec.max_tokens > self.capacity or not spec.prompt:
            raise ValueError(f"request {spec.rid} does not fit the context or the KV cache")
        if not self.has_room:
            raise RuntimeError("no free sequence slot")
        seq = Sequence(spec, next(self._order), np.random.default_rng(spec.sampling.seed), list(spec.prompt))
        if spec.sampling.grammar is not None:
            seq.guide = self._guide(spec.sampling.grammar)
        if not self._place(seq, count=True):
            raise RuntimeError(f"no KV blocks for request {spec.rid}")
        self.running[spec.rid] = seq

    def _prefix_digests(self, tokens: list[int], rid: int | None = None, adapter: int = 0) -> list[bytes]:
        """Digests of the full blocks before the last token (which is always computed). A new
        request's (`rid`) are kept for the next call: the head of the queue is asked about
        each step until it is admitted, then placed."""
        if not self.blocks.prefix_cache:
            return []
        if rid is not None and self._head_digests[0] == rid:
            return self._head_digests[1]
        digests = block_digests(tokens[: len(tokens) - 1], self.blocks.block_size, _root(adapter))
        if rid is not None:
            self._head_digests = (rid, digests)
        return digests

    def _place(self, seq: Sequence, count: bool = False) -> bool:
        """Blocks for every token of `seq` (`count`: a new request, its lookup counted): its
        cached prefix taken, the rest allocated."""
        # A sequence still owing prompt logprobs reads its whole prompt (a cached prefix's
        # logprobs were never kept); it still names its blocks for the others.
        wanted = not seq.reading_prompt_logprobs
        digests = (self._prefix_digests(seq.tokens, seq.spec.rid if count else None, seq.spec.sampling.adapter)
                   if wanted else [])
        reuse = self.blocks.cached_prefix(digests)
        self.blocks.take(reuse)
        fresh = self.blocks.allocate(self.blocks.blocks_for(len(seq.tokens)) - len(reuse))
        if fresh is None:
            self.blocks.release(reuse)
            return False
        if count:
            self.blocks.count_lookup(len(seq.tokens), len(reuse) * self.blocks.block_size)
        seq.blocks, seq.digests = reuse + fresh, digests[: len(reuse)]
        seq.fed = len(reuse) * self.blocks.block_size
        return True

    def remove(self, rid: int) -> None:
        seq = self.running.pop(rid, None)
        if seq is None:
            return
        if seq in self.preempted:
            self.preempted.remove(seq)
        self.blocks.release(seq.blocks)
        seq.blocks = []

    def apply(self, payload: dict) -> None:
        """Removals, then additions, as broadcast by rank 0."""
        for rid in payload.get("remove", []):
            self.remove(rid)
        for d in payload.get("add", []):
            self.add(SequenceSpec.from_json(d))

    # ------------------------------------------------------------------ blocks while running
    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq.blocks)
        seq.blocks, seq.digests, seq.fed = [], [], 0
        self.preempted.append(seq)
        self.preempted.sort(key=lambda s: s.order)
        self.preemptions += 1

    def _resume(self) -> None:
        while self.preempted and self._place(self.preempted[0]):
            self.preempted.pop(0)

    def _grow(self, decoding: list[Sequence]) -> list[Sequence]:
        """A block for each decoding sequence's next position where it needs one, oldest first;
        the newest sequences are preempted while none is available. The ones still placed."""
        out = []
        for seq in sorted(decoding, key=lambda s: s.order):
            while seq.blocks and seq.fed == len(seq.blocks) * self.blocks.block_size:
                new = self.blocks.allocate(1)
                if new is not None:
                    seq.blocks += new
                    break
                self._preempt(max((s for s in self.running.values() if s.blocks), key=lambda s: s.order))
            if seq.blocks:
                out.append(seq)
        return out

    def _register(self, seq: Sequence) -> None:
        """Name the blocks `seq` has filled since the last step in the prefix cache."""
        if not self.blocks.prefix_cache:
            return
        bs, done = self.blocks.block_size, len(seq.digests)
        full = seq.fed // bs
        if full > done:
            parent = seq.digests[-1] if seq.digests else _root(seq.spec.sampling.adapter)
            new = block_digests(seq.tokens[: full * bs], bs, parent, start=done)
            for i, d in enumerate(new, start=done):
                self.blocks.register(seq.blocks[i], d)
            seq.digests += new

    # ------------------------------------------------------------------ the step
    def _batch(self) -> tuple[list[Sequence], list[Segment], np.ndarray]:
        """This step's sequences: every decoding one (a token each), then chunks of the ones
        still reading their tokens, in admission order, while they fit `max_batched_tokens`
        (at least one chunk when nothing decodes). A chunk is never cut to fit: its size
        depends on the sequence alone; a chunk that does not fit waits."""
        self._resume()
        placed = [s for s in self.running.values() if s.blocks]
        chosen = self._grow([s for s in placed if s.remaining == 1])
        used, budget = len(chosen), self.max_batched_tokens
        for seq in sorted((s for s in placed if s.remaining > 1 and s.blocks), key=lambda s: s.order):
            count = min(self.prefill_chunk, seq.remaining)
            if budget is not None and used + count > budget and chosen:
                break  # this chunk and the later ones wait: first come, first read
            chosen.append(seq)
            used += count
        seqs = sorted(chosen, key=lambda s: s.order)
        segments, feeds = [], []
        for seq in seqs:
            chunk = seq.tokens[seq.fed: seq.fed + min(self.prefill_chunk, seq.remaining)]
            segments.append(Segment(tuple(seq.blocks), seq.fed, len(chunk)))
            feeds.extend(chunk)
        return seqs, segments, np.asarray(feeds, dtype=np.int64)

    def step(self) -> list[StepOutput]:
        """Feed every placed sequence once; draw a token for each that has read all its tokens."""
        if not self.running:
            return []
        self.steps += 1
        if self.faults:
            self.faults.before_step(self.steps)
        seqs, segments, tokens = self._batch()
        if not seqs:
            return []
        every_row = [seq.reading_prompt_logprobs for seq in seqs]
        guided = [s for s, g in zip(seqs, segments) if s.guide is not None and s.remaining == g.count
                  and s.guide.error is None]
        if guided:  # this step's masks, while the forward pass runs
            self._masks.start([s.guide for s in guided])
        logits = forward_segments(self.model, tokens, segments, self.kv, self.batch_invariant, every_row,
                                  [seq.spec.sampling.adapter for seq in seqs])
        masks = dict(zip(map(id, guided), self._masks.result())) if guided else {}
        rows: dict[int, np.ndarray] = {}
        if any(every_row):
            logits, rows = logits
        outputs = []
        for k, (seq, seg, row) in enumerate(zip(seqs, segments, logits)):
            if k in rows:
                self._prompt_logprobs(seq, seg.start, rows[k])
            seq.fed += seg.count
            self._register(seq)
            if seq.remaining:
                continue
            out = self._sample(seq, row, masks.get(id(seq)))
            if seq.spec.prompt_logprobs is not None and len(seq.generated) == 1:
                out.prompt_logprobs = seq.prompt_lp
            if out.finished:
                self.remove(seq.spec.rid)
            outputs.append(out)
        return outputs

    def _prompt_logprobs(self, seq: Sequence, start: int, rows: np.ndarray) -> None:
        """Row j (position start + j) predicts prompt token start + j + 1: its logprob and top
        alternatives, each position once (a preempted sequence reads its prompt again)."""
        prompt, n = seq.spec.prompt, seq.spec.prompt_logprobs or 0
        for j, row in enumerate(rows):
            target = start + j + 1
            if target >= len(prompt) or target != len(seq.prompt_lp) + 1:
                continue
            lp = log_softmax(row)
            value = lp[prompt[target]]
            rank = int(np.count_nonzero(lp > value)) + 1
            seq.prompt_lp.append((prompt[target], float(value), rank, top_logprobs(lp, n)))

    def _constrain(self, seq: Sequence, z: np.ndarray, mask: np.ndarray | None, row: np.ndarray,
                   banned: Any) -> np.ndarray:
        """`z` with the tokens the grammar does not allow next at -inf. When min_tokens bans
        every token the grammar allows (an end-of-sequence it requires), the grammar wins."""
        if seq.guide.error is not None or mask is None:
            raise ValueError(f"the request's grammar failed: {seq.guide.error}")
        allowed = seq.guide.tokenizer.allowed(mask)
        if not allowed.any():
            raise ValueError("the request's grammar allows no token here")
        if len(banned) and not np.isfinite(z[allowed]).any():
            z = process_logits(row, seq.spec.sampling, seq.spec.prompt, seq.generated)
        z[~allowed] = -np.inf
        return z

    def stop_ids(self, sampling: SamplingParams) -> tuple[int, ...]:
        """The token ids that end a sequence: the model's eos (unless ignore_eos) and its own."""
        return (() if sampling.ignore_eos else self.eos_token_ids) + sampling.stop_token_ids

    def _sample(self, seq: Sequence, row: np.ndarray, mask: np.ndarray | None = None) -> StepOutput:
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
            if seq.guide is not None:
                z = self._constrain(seq, z, mask, row, banned)
            token = choose(z, params, seq.rng)
            if seq.guide is not None:
                seq.guide.take(token)
        except Exception as exc:  # noqa: BLE001 - one request's failure, the same on every rank
            return StepOutput(rid, -1, row, "error", f"{type(exc).__name__}: {exc}")
        seq.generated.append(token)
        seq.tokens.append(token)
        stop_token = token in stops
        grammar_done = seq.guide is not None and seq.guide.complete
        if (stop_token and len(seq.generated) >= params.min_tokens) or grammar_done:
            reason = "stop"
        elif len(seq.generated) >= seq.spec.max_tokens:
            reason = "length"
        else:
            reason = None
        return StepOutput(rid, token, row, reason, stop_token=stop_token and reason == "stop")


def _root(adapter: int) -> bytes:
    """The digest before a sequence's first block: a served adapter's keys and values differ
    from the base model's for the same tokens, so each has a prefix cache of its own."""
    return ROOT if adapter == 0 else f"adapter {adapter}".encode()
