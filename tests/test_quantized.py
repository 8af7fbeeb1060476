"""Weights kept in GGUF's quantized blocks (kernels/quant_blocks.py, nn/quantized.py).

References: gguf.quants.dequantize (the package's own block formats) and the float64 product
with the dequantized matrix; the same GGUF file loaded dequantized (today's path), whose float64
logits the quantized model must give to rounding, at tp = gcd(world, 4) (rows split whole; a row
split not a whole number of blocks dequantized and reported).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import _gguf_files as G
import numpy as np
import pytest
from conftest import world
from mpi4py import MPI

gguf = pytest.importorskip("gguf")
pytest.importorskip("numba")

from mpisplit.kernels.quant_blocks import KINDS, block_matmul, dequantize_rows
from mpisplit.nn import quantized as nq

COMM = MPI.COMM_WORLD


def _blocks(kind: str, rows: int, features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, the dequantized matrix in float64) of a seeded matrix."""
    w = np.random.default_rng(seed).standard_normal((rows, features)).astype(np.float32)
    qt = gguf.GGMLQuantizationType[kind]
    blocks = gguf.quants.quantize(w, qt)
    return blocks, gguf.quants.dequantize(blocks, qt).astype(np.float64)


@world(sizes=(1,))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows,features", [(1, 32), (7, 96), (33, 576), (130, 64)])
def test_dequantize_rows_equals_gguf(kind: str, rows: int, features: int) -> None:
    blocks, ref = _blocks(kind, rows, features)
    assert np.array_equal(dequantize_rows(blocks, kind, features), ref.astype(np.float32))
    assert np.array_equal(dequantize_rows(blocks, kind, features, np.float64), ref)


@world(sizes=(1,))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows,features", [(1, 32), (7, 96), (33, 576), (130, 64)])
@pytest.mark.parametrize("n", [1, 3, nq.FUSED_MAX_ROWS + 1, 17])
def test_products_equal_the_dequantized_product(kind: str, rows: int, features: int, n: int) -> None:
    """float64 activations: the fused kernel (and, past FUSED_MAX_ROWS, the tiled BLAS path)
    equal x @ W.T with W dequantized, to 1e-12 of the largest output; float32 to float32's."""
    blocks, ref = _blocks(kind, rows, features, seed=rows)
    x = np.random.default_rng(n).standard_normal((n, features))
    want = x @ ref.T
    scale = np.abs(want).max()
    got = block_matmul(x, blocks, kind)
    assert got.dtype == np.float64 and np.abs(got - want).max() <= 1e-12 * scale
    slab = nq.QuantizedSlab(kind, blocks, rows, features)
    assert np.abs(slab.matmul_t(x) - want).max() <= 1e-12 * scale
    got32 = slab.matmul_t(x.astype(np.float32))
    assert got32.dtype == np.float32 and np.abs(got32 - want).max() <= 1e-5 * scale * math.sqrt(features / 32)


@world(sizes=(1,))
def test_bad_blocks_and_kinds_are_named() -> None:
    blocks, _ = _blocks("Q8_0", 4, 64)
    with pytest.raises(ValueError, match="Q6_K"):
        nq.QuantizedSlab("Q6_K", blocks, 4, 64)
    with pytest.raises(ValueError, match="do not hold a 4 x 96 slab"):
        nq.QuantizedSlab("Q8_0", blocks, 4, 96)
    with pytest.raises(ValueError, match="do not hold 96 features"):
        block_matmul(np.zeros((1, 96)), blocks, "Q8_0")


def _tiny_gguf(kind: str) -> Path:
    folder = Path(COMM.bcast(tempfile.mkdtemp() if COMM.Get_rank() == 0 else None))
    cfg = dict(G.TINY, tied=False, hidden=128, heads=4, kv_heads=2, inter=192)
    if COMM.Get_rank() == 0:
        G.write_gguf(folder / "m.gguf", cfg, G.llama_arrays(cfg, seed=3), kind)
    COMM.Barrier()
    return folder / "m.gguf"


@pytest.mark.mpi
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_model_equals_the_dequantized_one(kind: str) -> None:
    """A Llama (hidden 128, MLP 192, untied head) written as `kind`, loaded at tp = gcd(world, 4)
    both ways in float64: logits equal to 1e-12 of their scale. At tp 4 the MLP's down
    projection (192 / 4 = 48 input features: not whole blocks) is dequantized and reported; the
    rest stays in blocks, the float arrays of those never written. Backward through a quantized
    matrix is an error."""
    import mpisplit as ms

    path = _tiny_gguf(kind)
    grid = ms.ProcessGrid(tp=math.gcd(COMM.Get_size(), 4))
    ids = np.array([[5, 70, 200, 3, 99, 14, 1, 260], [9, 8, 7, 6, 5, 4, 3, 2]])
    plain = ms.GPT.from_pretrained(path, grid, dtype="float64")
    kept = ms.GPT.from_pretrained(path, grid, dtype="float64", keep_quantized=True)
    report = kept.quantized_report
    down = [r for r in report["dequantized"] if "ffn_down" in r or "down_proj" in r]
    assert bool(down) == (grid.tp == 4), report
    assert len(report["kept"]) >= 2 * 6 and report["bytes"] > 0
    for name, p in kept.named_parameters():
        if p.quantized is not None:
            assert not p.data.any(), name  # never written
    with ms.no_grad():
        want, got = ms.to_numpy(plain(ids)), ms.to_numpy(kept(ids))
    assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()
    with pytest.raises(RuntimeError, match="serve only"):
        kept.loss(ids, ids).backward()
    grid.free()


@world(sizes=(1,))
def test_served_quantized_model_answers_as_the_dequantized_one(tmp_path: Path) -> None:
    """`mpisplit serve --gguf F --keep-quantized` at 1 and 3 ranks (heads and MLP split in whole
    blocks) against the dequantized server at 1 rank, float64, through the openai client: the
    same greedy text and logprobs to 1e-9; the start line says what stayed in blocks."""
    openai = pytest.importorskip("openai")
    from _serving import Server

    cfg = dict(G.TINY, tied=True, hidden=192, heads=6, kv_heads=3, inter=384)
    path = G.write_gguf(tmp_path / "m.gguf", cfg, G.llama_arrays(cfg, seed=5), "Q4_1")
    answers = []
    for n, extra in ((1, []), (1, ["--keep-quantized"]), (3, ["--keep-quantized"])):
        with Server(n, ["--gguf", str(path), "--dtype", "float64", *extra]) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=60, max_retries=0)
            got = client.completions.create(model=client.models.list().data[0].id, prompt="the world",
                                            max_tokens=24, temperature=0, logprobs=2)
            assert server.stop() == 0
            answers.append((got.choices[0].text, got.choices[0].logprobs.token_logprobs))
            kept = [line for line in server.log if "kept in their GGUF blocks" in line]
            assert bool(kept) == bool(extra) and (not kept or "dequantized" not in kept[0]), server.log[-5:]
    (text, ref), rest = answers[0], answers[1:]
    assert len(ref) == 24
    for other_text, other in rest:
        assert other_text == text
        assert max(abs(a - b) for a, b in zip(other, ref)) <= 1e-9
