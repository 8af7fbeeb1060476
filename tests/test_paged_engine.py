"""The engine on the paged KV cache, at the world size of the run (1, 2, 3, 4): prefix caching,
preemption, the array path of attention, and no block lost over 1,000 requests.

References: the same requests on an engine without prefix caching, with a pool large enough
that nothing is preempted, or with the compiled kernels off (float64; bit for bit at tp <= 2
where the batch-invariance rule applies: with more ranks the all-reduce's order may change
with the row count, see README "Serving"); the block counts of an idle engine.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import mpisplit as ms
from mpisplit import kernels
from mpisplit.serving.engine import Engine, SequenceSpec
from mpisplit.serving.sampling import SamplingParams

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def model():
    world = MPI.COMM_WORLD.Get_size()
    grid = ms.ProcessGrid(tp=world)
    cfg = ms.GPTConfig.llama(vocab_size=67, block_size=96, n_layer=2, n_head=2 * world, n_kv_head=world,
                             n_embd=16 * world, intermediate_size=40)
    m = ms.GPT(cfg, grid, dtype="float64", seed=7)
    for p in m.parameters():
        if p.data.ndim == 2:
            p.data *= 5.0  # logits that spread: greedy text that is not one token repeated
    m.eval()
    yield m
    grid.free()


SYSTEM = list(range(3, 40))  # a shared 37-token "system prompt"
PROMPTS = [SYSTEM + [50, 51], SYSTEM + [52], SYSTEM + [50, 51, 53, 54, 55], [9, 8, 7], SYSTEM[:20]]


def specs() -> list[SequenceSpec]:
    out = [SequenceSpec(i, p, 9, SamplingParams(temperature=0.0)) for i, p in enumerate(PROMPTS)]
    out += [SequenceSpec(10 + i, p, 7, SamplingParams(temperature=0.8, top_k=20, seed=i)) for i, p in enumerate(PROMPTS)]
    return out


def run(model, batch: list[SequenceSpec], **kw) -> tuple[dict, dict, Engine]:
    """Admit each request as soon as the engine can (one per step); tokens and logits per request."""
    eng = Engine(model, max_batch=kw.pop("max_batch", 6), prefill_chunk=kw.pop("chunk", 8), **kw)
    tokens = {s.rid: [] for s in batch}
    logits = {s.rid: [] for s in batch}
    pending = list(batch)
    while pending or eng.running:
        if pending and eng.can_admit(pending[0]):
            eng.add(pending.pop(0))
        for out in eng.step():
            tokens[out.rid].append(out.token)
            logits[out.rid].append(out.logits)
    return tokens, logits, eng


def same(model, got: dict, want: dict) -> None:
    for rid in want:
        a, b = np.array(got[rid]), np.array(want[rid])
        if model.grid.tp <= 2:
            assert np.array_equal(a, b), rid
        else:
            assert np.allclose(a, b, atol=1e-12, rtol=0), rid


def test_prefix_cache_changes_no_bit(model):
    """Requests sharing a 37-token prefix: with the prefix cache, the later ones compute only
    their own blocks (hit tokens counted) and get the tokens and logits of computing all."""
    off_t, off_l, off = run(model, specs(), kv_block_size=4, prefix_cache=False)
    on_t, on_l, on = run(model, specs(), kv_block_size=4)
    assert on_t == off_t
    same(model, on_l, off_l)
    assert off.blocks.hit_tokens == 0
    assert on.blocks.hit_tokens > 0  # how many depends on how far the first had read when the next came
    assert on.blocks.queried_tokens == sum(len(s.prompt) for s in specs())
    for eng in (on, off):
        assert eng.blocks.used == 0
        eng.blocks.check()
    # a new request after them: the 9 full blocks of the prefix are cached, only its own
    # 2 tokens are computed
    late = SequenceSpec(99, SYSTEM + [60, 61], 6, SamplingParams(temperature=0.0))
    on.add(late)
    assert on.running[99].fed == 36
    got = [o for _ in range(12) for o in on.step()]
    want_t, want_l, _ = run(model, [late], kv_block_size=4, prefix_cache=False)
    assert [o.token for o in got] == want_t[99]
    same(model, {99: [o.logits for o in got]}, want_l)


def test_preemption_and_recompute_give_the_same_tokens(model):
    """A pool of 14 blocks of 4 (56 positions) for six sequences of up to 51: decoding runs out
    of blocks, the newest are preempted and recomputed; every token and logit is that of a
    pool where nothing is preempted."""
    big_t, big_l, big = run(model, specs(), kv_block_size=4, prefix_cache=False)
    for cache in (False, True):
        small_t, small_l, small = run(model, specs(), kv_block_size=4, kv_blocks=14, prefix_cache=cache)
        assert big.preemptions == 0 and small.preemptions > 0
        assert small_t == big_t
        same(model, small_l, big_l)
        assert small.blocks.used == 0
        small.blocks.check()


def test_array_path_of_attention_equals_the_kernel(model):
    """With the compiled kernels off, attention gathers each sequence's blocks and runs the
    model's attention (the path GPUs take): the same tokens, logits to 1e-12."""
    if not kernels.enabled():
        pytest.skip("the compiled kernels need numba")
    want_t, want_l, _ = run(model, specs(), kv_block_size=4)
    kernels.set_enabled(False)
    try:
        got_t, got_l, _ = run(model, specs(), kv_block_size=4)
    finally:
        kernels.set_enabled(None)
    assert got_t == want_t
    for rid in want_l:
        assert np.allclose(np.array(got_l[rid]), np.array(want_l[rid]), atol=1e-12, rtol=0), rid


def test_no_block_is_lost_over_a_thousand_requests(model):
    """1,000 requests with shared prefixes, a third of them cancelled at a random step, in a
    pool small enough to preempt: afterwards no block is held and every block is accounted for."""
    rng = np.random.default_rng(3)  # the same draws on every rank
    eng = Engine(model, max_batch=16, prefill_chunk=8, kv_blocks=24, kv_block_size=4)
    heads = [list(rng.integers(0, 67, size=int(n))) for n in (9, 14, 21)]
    pending = []
    for rid in range(1000):
        prompt = heads[rid % 3][: int(rng.integers(1, 22))] + list(rng.integers(0, 67, size=int(rng.integers(0, 5))))
        pending.append(SequenceSpec(rid, [int(t) for t in prompt] or [1], int(rng.integers(1, 6)),
                                    SamplingParams(temperature=1.0, seed=rid)))
    cancel_at = {rid: int(rng.integers(0, 4)) for rid in range(0, 1000, 3)}
    age: dict[int, int] = {}
    finished = 0
    while pending or eng.running:
        while pending and eng.can_admit(pending[0]):
            spec = pending.pop(0)
            eng.add(spec)
            age[spec.rid] = 0
        for rid in list(eng.running):
            age[rid] += 1
            if cancel_at.get(rid) == age[rid]:
                eng.remove(rid)
        finished += sum(out.finished for out in eng.step())
    assert finished >= 600 and eng.preemptions > 0 and eng.blocks.hit_tokens > 0
    assert eng.blocks.used == 0 and eng.blocks.available == eng.blocks.num_blocks
    eng.blocks.check()
