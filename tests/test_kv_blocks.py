"""The KV-cache block bookkeeping (mpisplit.serving.blocks) and the paged attention kernel.

References: counts by hand (blocks free, held, cached), the chained digests' definition, and
for the kernel the model's own attention (ops.Attention, softmax(q k^T / sqrt(d)) v with the
causal mask) on contiguous float64 arrays.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpisplit import kernels
from mpisplit.autograd.attention import Attention
from mpisplit.serving.blocks import ROOT, BlockManager, block_digests


def test_digests_name_the_whole_prefix():
    a = block_digests([1, 2, 3, 4, 5, 6, 7], 2)
    assert len(a) == 3  # full blocks only
    b = block_digests([9, 9, 3, 4, 5, 6], 2)
    assert a[1] != b[1]  # the same block tokens after another prefix: another digest
    assert block_digests([1, 2, 3, 4, 5, 6], 2, a[0], start=1) == a[1:]


def test_allocate_release_and_prefix_reuse():
    m = BlockManager(4, 2)
    t = m.allocate(3)
    assert t == [0, 1, 2] and m.available == 1 and m.used == 3
    assert m.allocate(2) is None and m.available == 1  # nothing taken on failure
    d = block_digests([1, 2, 3, 4], 2)
    m.register(t[0], d[0])
    m.register(t[1], d[1])
    m.release(t)
    assert m.available == 4 and m.used == 0 and m.cached == 2
    assert m.cached_prefix(d) == [0, 1]
    assert m.cached_prefix(block_digests([1, 2, 5, 5], 2)) == [0]
    m.take([0, 1])
    assert m.used == 2 and m.idle_among([0, 1]) == 0
    m.check()
    # block 2 was uncached: free again and taken first, then the last cached one is evicted
    m.release([0, 1])
    got = m.allocate(3)
    assert got[:2] == [2, 3] and got[2] == 1  # the tail (block 1) goes before the head (block 0)
    assert m.cached_prefix(d) == [0] and m.cached == 1
    m.release(got)
    m.check()


def test_content_already_cached_stays_private():
    m = BlockManager(3, 2)
    d = block_digests([1, 2], 2)[0]
    a, b = m.allocate(1)[0], m.allocate(1)[0]
    m.register(a, d)
    m.register(b, d)  # the same tokens computed twice: b is not named
    m.release([a, b])
    assert m.cached == 1 and m.cached_prefix([d]) == [a]
    with pytest.raises(RuntimeError, match="released more often"):
        m.release([b])


def test_no_prefix_cache_names_nothing():
    m = BlockManager(2, 2, prefix_cache=False)
    d = block_digests([1, 2], 2)[0]
    m.register(m.allocate(1)[0], d)
    assert m.cached == 0 and m.cached_prefix([d]) == []
    assert ROOT == b""


def _pool(rng, x: np.ndarray, table: list[int], blocks: int, bs: int, keys: bool) -> np.ndarray:
    """x (KV, L, d) written into a pool along `table`, the rest noise: keys (blocks, KV, d, bs),
    values (blocks, KV, bs, d)."""
    pool = rng.standard_normal((blocks, x.shape[0], bs, x.shape[2]))
    for p in range(x.shape[1]):
        pool[table[p // bs], :, p % bs] = x[:, p]
    return np.ascontiguousarray(pool.transpose(0, 1, 3, 2)) if keys else pool


@pytest.mark.skipif(not kernels.enabled(), reason="the compiled kernels need numba")
@pytest.mark.parametrize("heads,kv", [(4, 4), (6, 2)])
def test_paged_attention_equals_attention_and_depends_on_the_row_alone(heads, kv):
    from mpisplit.kernels.paged_attention import paged_attention

    rng = np.random.default_rng(0)
    d, bs, L = 8, 4, 11
    k, v = rng.standard_normal((kv, L, d)), rng.standard_normal((kv, L, d))
    q = rng.standard_normal((L, heads, d))
    table = [5, 0, 3]
    kp, vp = _pool(rng, k, table, 6, bs, True), _pool(rng, v, table, 6, bs, False)
    tables = np.array([table], dtype=np.int64)
    out = np.empty_like(q)
    paged_attention(q, kp, vp, tables, np.array([0]), np.array([L]), out, 0)
    g = heads // kv
    ref = Attention().forward(q.transpose(1, 0, 2), np.repeat(k, g, 0), np.repeat(v, g, 0), causal=True)
    assert np.max(np.abs(out - ref.transpose(1, 0, 2))) < 1e-13
    # the same rows cut into chunks (3 + 1 + 7 rows), beside another sequence, in another
    # placement of the blocks: the same bits
    other = np.array([[1, 2, 4]], dtype=np.int64)
    kp2, vp2 = _pool(rng, k, [2, 4, 1], 6, bs, True), _pool(rng, v, [2, 4, 1], 6, bs, False)
    got = np.empty_like(q)
    for lo, hi in ((0, 3), (3, 4), (4, L)):
        both = np.concatenate([q[:2], q[lo:hi]])
        res = np.empty_like(both)
        paged_attention(both, kp2, vp2, np.concatenate([other, np.array([[2, 4, 1]])]),
                        np.array([0, lo]), np.array([2, hi - lo]), res, 0)
        got[lo:hi] = res[2:]
    assert np.array_equal(got, out)


def test_memory_sizes():
    from mpisplit.serving.kv_pool import parse_memory

    assert parse_memory("2GiB") == 2 * 2**30 and parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("1.5GB") == 1_500_000_000 and parse_memory("800000") == 800_000
    assert parse_memory(" 64 kib ") == 65536
    assert parse_memory("0.3") == pytest.approx(0.3) and isinstance(parse_memory("0.3"), float)
    for bad in ("lots", "1.5XB", "0", "-1GiB", ""):
        with pytest.raises(ValueError, match="memory size"):
            parse_memory(bad)
