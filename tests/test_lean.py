"""The serving forward on plain arrays (serving/lean.py) against the same forward through the
modules (forward_segments(lean=False)): the same logits bit for bit, for Llama-family models with
float and GGUF-block weights, grouped and plain heads, biases, float32 and float64, with and
without batch-invariant row blocks, at tp = every divisor of the heads the world allows; and the
models it does not take (GPT-2, served LoRA adapters) go through the modules.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from mpi4py import MPI

import mpisplit as ms
from mpisplit.serving.batch import Segment, forward_segments
from mpisplit.serving.kv_pool import PagedKV
from mpisplit.serving.lean import lean_blocks

pytestmark = pytest.mark.mpi
COMM = MPI.COMM_WORLD


def _config(variant: str) -> ms.GPTConfig:
    common = {"vocab_size": 67, "block_size": 32, "n_layer": 2, "n_embd": 32, "family": "llama", "norm": "rmsnorm",
              "mlp": "swiglu", "positions": "rotary", "intermediate_size": 48, "out_bias": False, "mlp_bias": False}
    if variant == "grouped":  # Llama: 4 query heads over 2 key/value heads, untied head
        return ms.GPTConfig(**common, n_head=4, n_kv_head=2, qkv_bias=False, tie_embeddings=False)
    return ms.GPTConfig(**common, n_head=4, n_kv_head=4, qkv_bias=True, tie_embeddings=True)  # Qwen2-like


def _steps(model, kv: PagedKV, invariant: bool, lean: bool) -> list:
    """Two prompts in chunks beside each other, then three decode steps of both."""
    V = model.config.vocab_size
    a, b = np.arange(1, 12) * 5 % V, np.arange(2, 9) * 7 % V
    run = [(np.concatenate([a[:6], b]), [Segment((0, 1), 0, 6), Segment((2, 3), 0, 7)]),
           (a[6:], [Segment((0, 1, 4, 5), 6, 5)])]
    run += [(np.array([3 + t, 9 + t]), [Segment((0, 1, 4, 5), 11 + t, 1), Segment((2, 3, 6), 7 + t, 1)]) for t in range(3)]
    return [forward_segments(model, ids, segs, kv, batch_invariant=invariant, lean=lean) for ids, segs in run]


def _equal_both_ways(model) -> None:
    assert lean_blocks(model) is not None
    for invariant in (True, False):
        want = _steps(model, PagedKV(model, 8, 4), invariant, lean=False)
        got = _steps(model, PagedKV(model, 8, 4), invariant, lean=True)
        for g, w in zip(got, want):
            assert np.array_equal(g, w)


@pytest.mark.parametrize("variant", ["grouped", "biased"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_lean_forward_equals_the_modules(variant: str, dtype: str) -> None:
    with ms.ProcessGrid(tp=math.gcd(COMM.Get_size(), 4)) as grid:
        model = ms.GPT(_config(variant), grid, dtype=dtype, seed=5)
        model.eval()
        _equal_both_ways(model)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_the_lean_forward_equals_the_modules_on_gguf_blocks(kind: str) -> None:
    pytest.importorskip("gguf")
    pytest.importorskip("numba")
    from test_quantized import _tiny_gguf

    path = _tiny_gguf(kind)
    with ms.ProcessGrid(tp=math.gcd(COMM.Get_size(), 4)) as grid:
        model = ms.GPT.from_pretrained(path, grid, dtype="float32", keep_quantized=True)
        model.eval()
        assert model.quantized_report["kept"]
        _equal_both_ways(model)


def test_models_it_does_not_take_go_through_the_modules() -> None:
    with ms.ProcessGrid(tp=math.gcd(COMM.Get_size(), 4)) as grid:
        gpt2 = ms.GPT(ms.GPTConfig(vocab_size=67, block_size=32, n_layer=1, n_head=4, n_embd=32), grid, seed=1)
        assert lean_blocks(gpt2) is None
        llama = ms.GPT(_config("grouped"), grid, seed=1)
        assert lean_blocks(llama) is not None
        llama.served_adapters = object()  # adapters attached: their rows need the modules
        assert lean_blocks(llama) is None
