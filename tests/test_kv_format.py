"""The 16-bit KV cache (`--kv-cache-dtype float16|bfloat16`, serving/kv_format.py).

References: PyTorch's own float32 -> float16 / bfloat16 conversion (round to nearest, ties to
even) for the stored bit patterns; the attention kernel on a float pool holding the decoded
values; the serving forward of the same float32 model with a float32 cache whose keys and
values are rounded through the format by a wrapper around the model's projection: equal bit for
bit, at every TP degree the world size allows, with the compiled kernels and without.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import world
from mpi4py import MPI

import mpisplit as ms
from mpisplit import kernels
from mpisplit.serving.batch import Segment, forward_segments
from mpisplit.serving.kv_format import CHOICES, kv_format
from mpisplit.serving.kv_pool import PagedKV

torch = pytest.importorskip("torch")
TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _values() -> np.ndarray:
    """float32 values over the whole range, with the special ones and the halfway cases."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(100_000) * 10.0 ** rng.integers(-40, 38, 100_000)).astype(np.float32)
    halfway = (np.arange(1, 4096, dtype=np.uint32) << 13 | 1 << 12).view(np.float32)  # float16 ties
    bf_ties = (np.arange(1, 4096, dtype=np.uint32) << 16 | 1 << 15).view(np.float32)  # bfloat16 ties
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, 65504, 65520, 3.4e38, -0.0, 0.0, 6e-8, 1e-45],
                       dtype=np.float32)
    return np.concatenate([x, halfway, bf_ties, special])


@world(sizes=(1,))
@pytest.mark.parametrize("name", CHOICES)
def test_stored_patterns_are_the_nearest_16_bit_floats(name: str) -> None:
    x = _values()
    fmt = kv_format(name, np.float32)
    codes = fmt.encode(x)
    assert codes.dtype == np.uint16 and codes.shape == x.shape
    want = torch.from_numpy(x).to(TORCH[name])
    nan = np.isnan(x)
    assert np.array_equal(codes[~nan], want.view(torch.int16).numpy().view(np.uint16)[~nan])
    back = fmt.decode(codes, np.float32)
    assert back.dtype == np.float32 and np.isnan(back[nan]).all()
    assert np.array_equal(back[~nan], want.float().numpy()[~nan])
    assert np.array_equal(fmt.decode(codes, np.float64), back.astype(np.float64), equal_nan=True)


@world(sizes=(1,))
def test_the_formats_and_their_errors() -> None:
    plain = kv_format(None, np.float32)
    assert not plain.packed and plain.storage == np.float32 and plain.encode is not None
    assert kv_format("float64", np.float64).storage == np.float64
    with pytest.raises(ValueError, match="stores a float32 model's keys"):
        kv_format("float16", np.float64)
    with pytest.raises(ValueError, match="must be one of float16, bfloat16"):
        kv_format("int8", np.float32)


def _pools(rng: np.random.Generator, name: str) -> tuple:
    blocks, kv, d, bs = 5, 2, 8, 4
    k = rng.standard_normal((blocks, kv, d, bs)).astype(np.float32)
    v = rng.standard_normal((blocks, kv, bs, d)).astype(np.float32)
    fmt = kv_format(name, np.float32)
    ck, cv = fmt.encode(k), fmt.encode(v)
    return fmt, (ck, cv), (fmt.decode(ck, np.float32), fmt.decode(cv, np.float32))


@world(sizes=(1,))
@pytest.mark.skipif(not kernels.enabled(), reason="the compiled kernels need numba")
@pytest.mark.parametrize("name", CHOICES)
def test_the_kernel_reads_16_bit_pools_as_their_values(name: str) -> None:
    from mpisplit.kernels.paged_attention import paged_attention

    rng = np.random.default_rng(1)
    fmt, packed, floats = _pools(rng, name)
    q = rng.standard_normal((7, 6, 8)).astype(np.float32)
    tables = np.array([[3, 0], [4, 1]], dtype=np.int64)
    starts, counts = np.array([0, 2]), np.array([3, 4])
    got, want = np.empty_like(q), np.empty_like(q)
    paged_attention(q, *packed, tables, starts, counts, got, fmt.code)
    paged_attention(q, *floats, tables, starts, counts, want, 0)
    assert np.array_equal(got, want)
    from mpisplit.kernels.paged_attention import widen  # its Python form, element by element

    assert [widen(c, fmt.code) for c in packed[0].reshape(-1)] == floats[0].reshape(-1).astype(float).tolist()


def _model(grid: ms.ProcessGrid) -> ms.GPT:
    """A float32 Llama-shaped model (grouped keys and values: 4 query heads, 2 KV heads)."""
    cfg = ms.GPTConfig(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32, family="llama",
                       norm="rmsnorm", mlp="swiglu", positions="rotary", n_kv_head=2, intermediate_size=48,
                       qkv_bias=False, out_bias=False, mlp_bias=False, tie_embeddings=False)
    model = ms.GPT(cfg, grid, dtype="float32", seed=3)
    model.eval()
    return model


def _rounded_through(model: ms.GPT, fmt) -> None:
    """Wrap each block's projection so that its keys and values come out rounded through `fmt`."""
    for block in model.h:
        attn, inner = block.attn, block.attn.rows_qkv

        def rows_qkv(x, positions, inner=inner):
            q, k, v = inner(x, positions)
            return q, fmt.decode(fmt.encode(k), k.dtype), fmt.decode(fmt.encode(v), v.dtype)

        attn.rows_qkv = rows_qkv


def _serve_steps(model: ms.GPT, kv: PagedKV, lean: bool = False) -> list[np.ndarray]:
    """A prompt of 9 in two chunks beside another's prompt, then two decode steps of both (through
    the modules, whose projection the reference wraps, or the lean forward)."""
    a, b = np.arange(1, 10) * 5 % 61, np.arange(2, 8) * 7 % 61
    out = [forward_segments(model, np.concatenate([a[:5], b]), [Segment((0, 1), 0, 5), Segment((2, 3), 0, 6)], kv,
                            lean=lean)]
    out.append(forward_segments(model, a[5:], [Segment((0, 1, 4), 5, 4)], kv, lean=lean))
    for t in range(2):
        out.append(forward_segments(model, np.array([7 + t, 11 + t]),
                                    [Segment((0, 1, 4), 9 + t, 1), Segment((2, 3), 6 + t, 1)], kv, lean=lean))
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("name", CHOICES)
@pytest.mark.parametrize("compiled", [True, False])
def test_serving_with_a_16_bit_cache_equals_rounded_keys_and_values(name: str, compiled: bool) -> None:
    if compiled and not kernels.enabled():
        pytest.skip("the compiled kernels need numba")
    before = kernels.enabled()
    kernels.set_enabled(compiled)
    try:
        with ms.ProcessGrid(tp=math.gcd(MPI.COMM_WORLD.Get_size(), 2)) as grid:
            model = _model(grid)
            fmt = kv_format(name, np.float32)
            packed = PagedKV(model, 6, 4, fmt)
            assert packed.k[0].dtype == np.uint16 and packed.nbytes * 2 == PagedKV(model, 6, 4).nbytes
            got = _serve_steps(model, packed)
            got_lean = _serve_steps(model, PagedKV(model, 6, 4, fmt), lean=True)
            plain = _serve_steps(model, PagedKV(model, 6, 4))
            _rounded_through(model, fmt)
            want = _serve_steps(model, PagedKV(model, 6, 4))
    finally:
        kernels.set_enabled(before)
    for g, gl, w in zip(got, got_lean, want):
        assert np.array_equal(g, w) and np.array_equal(gl, w)
    assert not all(np.array_equal(p, w) for p, w in zip(plain, want))  # the rounding shows
