"""The engine and its control channel in-process, at the world size of the run (1, 2, 3, 4):
the model split over every rank, requests joining at different steps. References: the
library's one-sequence `GPT.generate` and the same requests run one at a time."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from mpi4py import MPI

import mpisplit as ms
from mpisplit.serving.channel import ControlChannel
from mpisplit.serving.controller import Controller, Submission, follow
from mpisplit.serving.engine import Engine, SequenceSpec
from mpisplit.serving.metrics import ServerMetrics
from mpisplit.serving.sampling import SamplingParams

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def model():
    world = MPI.COMM_WORLD.Get_size()
    grid = ms.ProcessGrid(tp=world)
    heads = 4 if 4 % world == 0 else world * 2  # a head count every tp divides
    cfg = ms.GPTConfig(vocab_size=61, block_size=48, n_layer=2, n_head=heads, n_embd=8 * heads)
    m = ms.GPT(cfg, grid, dtype="float64", seed=4)
    for p in m.parameters():
        if p.data.ndim == 2:
            p.data *= 6.0
    m.eval()
    yield m
    grid.free()


PROMPTS = [[3, 1, 4, 1, 5], [9], list(range(20, 40)), [7, 7, 7, 2, 60, 0, 11]]


def specs():
    out = [SequenceSpec(i, p, 5 + 2 * i, SamplingParams(temperature=0.0)) for i, p in enumerate(PROMPTS)]
    out += [SequenceSpec(10 + i, p, 8, SamplingParams(temperature=0.9, top_k=12, seed=i)) for i, p in enumerate(PROMPTS)]
    return out


def run(model, batch: list[SequenceSpec], chunk: int, budget: int | None = None,
        fed: list[int] | None = None) -> tuple[dict, dict]:
    """Join one request per step; tokens and logits per request (and tokens fed per step)."""
    eng = Engine(model, max_batch=8, prefill_chunk=chunk, max_batched_tokens=budget)
    tokens = {s.rid: [] for s in batch}
    logits = {s.rid: [] for s in batch}
    pending = list(batch)
    while pending or eng.running:
        if pending and eng.has_room:
            eng.add(pending.pop(0))
        if fed is not None:
            fed.append(len(eng._batch()[2]))
        for out in eng.step():
            tokens[out.rid].append(out.token)
            logits[out.rid].append(out.logits)
    return tokens, logits


@pytest.mark.timeout(300)
def test_engine_equals_generate_and_is_batch_invariant(model):
    together, lt = run(model, specs(), chunk=6)  # the 20-token prompt is read in 4 chunks
    for s in specs():
        ref = model.generate(np.array([s.prompt]), s.max_tokens, temperature=s.sampling.temperature,
                             top_k=s.sampling.top_k, seed=s.sampling.seed)[0, len(s.prompt):]
        assert together[s.rid] == ref.tolist(), s.rid
        alone, la = run(model, [s], chunk=6)
        assert alone[s.rid] == together[s.rid]
        if model.grid.tp <= 2:  # a sum of two is exact in either order; more ranks: see README
            assert np.array_equal(np.array(la[s.rid]), np.array(lt[s.rid])), s.rid
        else:
            assert np.allclose(np.array(la[s.rid]), np.array(lt[s.rid]), atol=1e-12, rtol=0)


@pytest.mark.timeout(300)
def test_token_budget_defers_whole_chunks_and_changes_no_bit(model):
    """max_batched_tokens=9 with 6-token chunks: every decoding sequence each step, a prompt
    chunk only where it fits whole (or nothing else runs); the tokens and logits are those of
    the unlimited engine, bit for bit at tp <= 2."""
    free, lf = run(model, specs(), chunk=6)
    fed: list[int] = []
    tight, lt = run(model, specs(), chunk=6, budget=9, fed=fed)
    assert tight == free
    assert max(fed) <= 9 and len(fed) > sum(1 for _ in specs())
    for rid in free:
        if model.grid.tp <= 2:
            assert np.array_equal(np.array(lf[rid]), np.array(lt[rid])), rid
        else:
            assert np.allclose(np.array(lf[rid]), np.array(lt[rid]), atol=1e-12, rtol=0)


@pytest.mark.timeout(300)
def test_controller_drives_every_rank_over_the_channel(model):
    """Rank 0's controller broadcasts each step; the others follow; submissions come from a
    thread (as from HTTP). The events on rank 0 spell the one-sequence greedy tokens."""
    refs = [model.generate(np.array([p]), 6)[0, len(p):].tolist() for p in PROMPTS]  # collective
    eng = Engine(model, max_batch=2, prefill_chunk=4)
    channel = ControlChannel(model.grid.world)
    if channel.rank != 0:
        follow(eng, channel)
        channel.free()
        return
    ctl = Controller(eng, channel, None, ServerMetrics(2), max_queue=8)
    events: dict[int, list[dict]] = {}
    done = threading.Event()

    def client() -> None:
        subs = []
        for i, p in enumerate(PROMPTS):
            sub = Submission(prompt=p, max_tokens=6, sampling=SamplingParams(temperature=0.0),
                             sink=lambda ev, i=i: events.setdefault(i, []).append(ev), logprobs=2)
            assert ctl.submit(sub)
            subs.append(sub)
            time.sleep(0.01)
        while sum(1 for evs in events.values() if evs[-1].get("finish_reason")) < len(PROMPTS):
            time.sleep(0.01)
        ctl.stopping.set()
        done.set()

    thread = threading.Thread(target=client)
    thread.start()
    ctl.run()
    thread.join(timeout=60)
    channel.free()
    assert done.is_set()
    for i, ref in enumerate(refs):
        assert [t for ev in events[i] for t in ev["token_ids"]] == ref
        assert events[i][-1]["finish_reason"] == "length"
        assert all(len(ev["logprobs"]["top_logprobs"][0]) == 2 for ev in events[i])
