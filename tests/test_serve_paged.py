"""The paged KV cache through real servers and the openai client: prefix caching changes no
bit of the answers, its figures in /metrics, every block back after the requests, a request
that could never fit the cache is a 400, and the flags' errors.

References: the same requests to a server with --no-prefix-cache (float64, --batch-invariant:
text and logprobs equal), the block arithmetic of the pool (2 x layers x local KV heads x
block size x head size x 8, 4 or 2 bytes a block).
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys

import openai
import pytest
from _serving import Server, serve_env, write_char_checkpoint
from test_serve import client, metric

pytestmark = pytest.mark.timeout(240)

BLOCK = 4
LAYERS, HEADS, HEAD_SIZE = 2, 4, 8  # the character model of _serving.tiny_model
MEMORY = 262144  # bytes per rank: 64 blocks (4096 bytes each) at one rank, 128 at two
SMALL = 32768  # 8 blocks at one rank


def pool_positions(ranks: int, memory: int = MEMORY, item: int = 8) -> int:
    block_bytes = 2 * LAYERS * (HEADS // ranks) * BLOCK * HEAD_SIZE * item
    return memory // block_bytes * BLOCK


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_char_checkpoint(tmp_path_factory.mktemp("paged") / "char")


SHARED = "the quick brown fox jumps over "  # 31 characters: 7 full blocks before the rest
PROMPTS = [SHARED + "the lazy dog", SHARED + "a cat", SHARED + "the lazy dog, twice"]


def answers(url: str) -> list[tuple]:
    """Greedy completions with logprobs, one after another (then all at once): text and logprobs."""
    c = client(url)

    def ask(prompt: str) -> tuple:
        r = c.completions.create(model="char", prompt=prompt, max_tokens=12, temperature=0, logprobs=3)
        lp = r.choices[0].logprobs
        return r.choices[0].text, tuple(lp.token_logprobs), tuple(map(str, lp.top_logprobs))

    one_by_one = [ask(p) for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        together = list(pool.map(ask, PROMPTS))
    return one_by_one + together


@pytest.mark.parametrize("ranks", [1, 2])
def test_prefix_cache_changes_no_bit_and_shows_in_metrics(ckpt, ranks):
    common = ["--ckpt", str(ckpt), "--dtype", "float64", "--batch-invariant", "--prefill-chunk", "8",
              "--kv-block-size", str(BLOCK), "--kv-cache-memory", str(MEMORY)]
    with Server(ranks, common + ["--no-prefix-cache"]) as plain:
        want = answers(plain.url)
        assert metric(plain.url, "mpisplit_prefix_cache_hit_tokens_total") == 0
    with Server(ranks, common) as srv:
        got = answers(srv.url)
        assert got == want
        queried = metric(srv.url, "mpisplit_prefix_cache_queried_tokens_total")
        hits = metric(srv.url, "mpisplit_prefix_cache_hit_tokens_total")
        assert queried == 2 * sum(len(p) for p in PROMPTS)
        assert hits >= 2 * 28 * 2  # the later two of each round find at least the shared 7 blocks
        assert metric(srv.url, "mpisplit_prefix_cache_hit_rate") == pytest.approx(hits / queried)
        total = pool_positions(ranks) // BLOCK
        assert metric(srv.url, "mpisplit_kv_blocks_used") == 0  # every block back
        assert metric(srv.url, "mpisplit_kv_blocks_free") == total
        assert 7 <= metric(srv.url, "mpisplit_kv_blocks_cached") <= total


def test_a_16_bit_cache_holds_twice_the_tokens_and_answers_alike(ckpt):
    """--kv-cache-dtype float16 / bfloat16 at 2 ranks against the float32 cache at 1: twice the
    blocks in the same --kv-cache-memory, every block back after the requests, and the same
    greedy text with log-probabilities close (the keys and values rounded to 11 or 8 bits; the
    exact check against rounded keys and values is tests/test_kv_format.py)."""
    common = ["--ckpt", str(ckpt), "--dtype", "float32", "--kv-block-size", str(BLOCK),
              "--kv-cache-memory", str(MEMORY)]
    with Server(1, common) as plain:
        want = answers(plain.url)[:3]
        assert metric(plain.url, "mpisplit_kv_blocks_free") == pool_positions(1, item=4) // BLOCK
    for name, tol in (("float16", 2e-3), ("bfloat16", 2e-2)):
        with Server(2, [*common, "--kv-cache-dtype", name]) as srv:
            got = answers(srv.url)[:3]
            assert metric(srv.url, "mpisplit_kv_blocks_free") == pool_positions(2, item=2) // BLOCK
        worst = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g[1], w[1]))
        print(name, "largest log-prob difference", worst)
        assert [g[0] for g in got] == [w[0] for w in want] and worst <= tol, (name, worst)


def test_a_request_the_cache_can_never_hold_is_a_400(ckpt):
    """One rank: 8 blocks of 4 (32 positions) for a model of 64: 20 + 20 tokens is refused,
    naming the cache; 20 + 12 is served (and the pool then preempts nothing)."""
    assert pool_positions(1, SMALL) == 32
    with Server(1, ["--ckpt", str(ckpt), "--dtype", "float64", "--kv-block-size", str(BLOCK),
                    "--kv-cache-memory", str(SMALL)]) as srv:
        c = client(srv.url)
        with pytest.raises(openai.BadRequestError, match="KV cache holds 32 positions"):
            c.completions.create(model="char", prompt="a" * 20, max_tokens=20)
        r = c.completions.create(model="char", prompt="a" * 20, max_tokens=12, temperature=0)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
        assert metric(srv.url, "mpisplit_preemptions_total") == 0


@pytest.mark.parametrize("flags,message", [
    (["--kv-cache-memory", "lots"], "a memory size is a number"),
    (["--kv-cache-memory", "100"], "holds no block"),
    (["--kv-block-size", "0"], "--kv-block-size must be >= 1"),
    (["--dtype", "float64", "--kv-cache-dtype", "float16"], "stores a float32 model's keys"),
])
def test_bad_cache_flags_are_a_clear_error(ckpt, flags, message):
    cmd = [sys.executable, "-m", "mpisplit.serve", "--ckpt", str(ckpt), "--port", "0", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=serve_env(), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
