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

from mpisplit.kernels.quant_blocks import BLOCK_ELEMS, KINDS, block_matmul, dequantize_rows
from mpisplit.nn import quantized as nq

COMM = MPI.COMM_WORLD
# gguf quantizes these; the K-quants (super-blocks of 256) it only dequantizes
QUANTIZABLE = [k for k in KINDS if BLOCK_ELEMS[k] == 32]


def _blocks(kind: str, rows: int, features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, the dequantized matrix in float64) of a seeded matrix; a K-quant's features
    rounded up to whole super-blocks of 256, its blocks random bytes (every byte string is a
    valid block) with fp16 scales of a weight's size, as gguf has no K-quant quantizer."""
    qt = gguf.GGMLQuantizationType[kind]
    rng = np.random.default_rng(seed)
    if BLOCK_ELEMS[kind] == 32:
        blocks = gguf.quants.quantize(rng.standard_normal((rows, features)).astype(np.float32), qt)
    else:
        blocks = G.random_k_blocks(rows, -(-features // 256) * 256, kind, rng)
    return blocks, gguf.quants.dequantize(blocks, qt).astype(np.float64)


@world(sizes=(1,))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows,features", [(1, 32), (7, 96), (33, 576), (130, 64)])
def test_dequantize_rows_equals_gguf(kind: str, rows: int, features: int) -> None:
    blocks, ref = _blocks(kind, rows, features)
    features = ref.shape[1]
    assert np.array_equal(dequantize_rows(blocks, kind, features), ref.astype(np.float32))
    assert np.array_equal(dequantize_rows(blocks, kind, features, np.float64), ref)
    assert np.array_equal(dequantize_rows(blocks, kind, features, threads=False), ref.astype(np.float32))


@world(sizes=(1,))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows,features", [(1, 32), (7, 96), (33, 576), (130, 64)])
@pytest.mark.parametrize("n", [1, 3, nq.FUSED_MAX_ROWS + 1, 17])
def test_products_equal_the_dequantized_product(kind: str, rows: int, features: int, n: int) -> None:
    """float64 activations: the fused kernel (and, past FUSED_MAX_ROWS, the tiled BLAS path)
    equal x @ W.T with W dequantized, to 1e-12 of the largest output; float32 to float32's."""
    blocks, ref = _blocks(kind, rows, features, seed=rows)
    features = ref.shape[1]
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
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_row_gets_the_same_bits_alone_and_in_a_batch(kind: str, dtype: type) -> None:
    """Each row of x multiplied alone equals, bit for bit, the same row among 1..9 others (rows
    taken four at a time and one at a time): what batch-invariant serving relies on."""
    blocks, ref = _blocks(kind, 70, 160, seed=3)
    x = np.random.default_rng(4).standard_normal((9, ref.shape[1])).astype(dtype)
    alone = np.concatenate([block_matmul(x[i:i + 1], blocks, kind) for i in range(9)])
    for n in range(2, 10):
        assert np.array_equal(block_matmul(x[:n], blocks, kind), alone[:n]), n
    assert np.array_equal(block_matmul(x[::-1].copy(), blocks, kind), alone[::-1])


@world(sizes=(1,))
def test_a_fused_group_equals_its_parts_and_holds_one_copy() -> None:
    """q, k and v kept in blocks, fused into one slab (nn/quantized.fused_slab): its product is
    the three products side by side, bit for bit; each part's blocks are a view of the fused
    ones; a part of another kind, or a padded one, is not fused."""
    from mpisplit.nn.module import Parameter

    parts, want = [], []
    x = np.random.default_rng(5).standard_normal((3, 96)).astype(np.float32)
    for rows in (64, 32, 32):
        blocks, _ = _blocks("Q4_1", rows, 96, seed=rows)
        w = Parameter(np.zeros((96, rows), dtype=np.float32))
        w.quantized = nq.QuantizedSlab("Q4_1", blocks, rows, 96)
        parts.append(w)
        want.append(w.quantized.matmul_t(x))
    fused = nq.fused_slab(parts)
    assert fused is not None and fused.rows == 128 and nq.fused_slab(parts) is fused
    assert np.array_equal(fused.matmul_t(x), np.concatenate(want, axis=1))
    assert all(np.shares_memory(w.quantized.blocks, fused.blocks) for w in parts)
    other, _ = _blocks("Q8_0", 32, 96)
    odd = Parameter(np.zeros((96, 32), dtype=np.float32))
    odd.quantized = nq.QuantizedSlab("Q8_0", other, 32, 96)
    assert nq.fused_slab([parts[0], odd]) is None
    padded = Parameter(np.zeros((96, 40), dtype=np.float32))
    padded.quantized = parts[1].quantized
    assert nq.fused_slab([parts[0], padded]) is None


@world(sizes=(1,))
def test_a_second_process_reuses_the_cached_kernels(tmp_path: Path) -> None:
    """numba's cache key of a kernel includes what it closes over; the block kernels close over
    intrinsics whose identity is fixed (kernels/block_dot.stable_identity), so a second process
    finds the first one's compiled kernels and writes no new cache file."""
    import os
    import subprocess
    import sys

    code = ("import numpy as np; from mpisplit.kernels.quant_blocks import block_matmul, dequantize_rows; "
            "b = np.zeros((4, 72), np.uint8); block_matmul(np.ones((1, 128), np.float32), b, 'Q4_0'); "
            "block_matmul(np.ones((5, 128)), b, 'Q4_0'); dequantize_rows(b, 'Q4_0', 128)")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    counts = []
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
        counts.append(sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.nbc")))
    assert counts[0] and counts[1] == counts[0], counts


@world(sizes=(1,))
def test_bad_blocks_and_kinds_are_named() -> None:
    blocks, _ = _blocks("Q8_0", 4, 64)
    with pytest.raises(ValueError, match="no quantized kernel for Q2_K"):
        nq.QuantizedSlab("Q2_K", blocks, 4, 64)
    with pytest.raises(ValueError, match="do not hold a 4 x 96 slab"):
        nq.QuantizedSlab("Q8_0", blocks, 4, 96)
    with pytest.raises(ValueError, match="do not hold 96 features"):
        block_matmul(np.zeros((1, 96)), blocks, "Q8_0")


def _tiny_gguf(kind: str) -> Path:
    folder = Path(COMM.bcast(tempfile.mkdtemp() if COMM.Get_rank() == 0 else None))
    cfg = dict(G.TINY, tied=False, hidden=128, heads=4, kv_heads=2, inter=192)
    if BLOCK_ELEMS[kind] == 256:  # whole super-blocks: every matrix 256 or 512 features wide
        cfg.update(hidden=256, inter=512)
    if COMM.Get_rank() == 0:
        G.write_gguf(folder / "m.gguf", cfg, G.llama_arrays(cfg, seed=3), kind)
    COMM.Barrier()
    return folder / "m.gguf"


@pytest.mark.mpi
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_model_equals_the_dequantized_one(kind: str) -> None:
    """A Llama (hidden 128, MLP 192, untied head; the K-quants 256 and 512: whole super-blocks)
    written as `kind`, loaded at tp = gcd(world, 4) both ways in float64: logits equal to 1e-12
    of their scale. At tp 4 the MLP's down projection (192 / 4 = 48, 512 / 4 = 128 input
    features: not whole blocks) is dequantized and reported; the
    rest stays in blocks, the float arrays of those read-only zeros in no memory. Backward through a quantized
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
        if p.quantized is not None:  # zeros that take no memory: one element seen everywhere, read-only
            assert not p.data.any() and set(p.data.strides) == {0} and not p.data.flags.writeable, name
    with ms.no_grad():
        want, got = ms.to_numpy(plain(ids)), ms.to_numpy(kept(ids))
    assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()
    with pytest.raises(RuntimeError, match="serve only"):
        kept.loss(ids, ids).backward()
    grid.free()


@world(sizes=(1,))
def test_served_quantized_model_answers_as_the_dequantized_one(tmp_path: Path) -> None:
    """`mpisplit serve --gguf F` (the file's blocks kept: the default) at 1 and 3 ranks (heads and
    MLP split in whole blocks) against `--dequantize` at 1 rank, float64, through the openai
    client: the same greedy text and logprobs to 1e-9; the start line says what stayed in blocks,
    or, with the kernels off (MPISPLIT_KERNELS=numpy), that the matrices were dequantized and why."""
    openai = pytest.importorskip("openai")
    from _serving import Server, serve_env

    cfg = dict(G.TINY, tied=True, hidden=192, heads=6, kv_heads=3, inter=384)
    path = G.write_gguf(tmp_path / "m.gguf", cfg, G.llama_arrays(cfg, seed=5), "Q4_1")
    answers = []
    numpy_only = {**serve_env(), "MPISPLIT_KERNELS": "numpy"}
    for n, extra, env in ((1, ["--dequantize"], None), (1, [], None), (3, [], None), (1, [], numpy_only)):
        with Server(n, ["--gguf", str(path), "--dtype", "float64", *extra], env=env) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=60, max_retries=0)
            got = client.completions.create(model=client.models.list().data[0].id, prompt="the world",
                                            max_tokens=24, temperature=0, logprobs=2)
            assert server.stop() == 0
            answers.append((got.choices[0].text, got.choices[0].logprobs.token_logprobs))
            kept = [line for line in server.log if "kept in their GGUF blocks" in line]
            blocks = not extra and env is None
            assert bool(kept) == blocks and (not kept or "dequantized" not in kept[0]), server.log[-5:]
            if env is not None:  # said once, at the start
                assert any("dequantized to float64 (the block kernels are off" in line for line in server.log)
    (text, ref), rest = answers[0], answers[1:]
    assert len(ref) == 24
    for other_text, other in rest:
        assert other_text == text
        assert max(abs(a - b) for a, b in zip(other, ref)) <= 1e-9


def _tiny(family: str, tp: int):
    import mpisplit as ms

    shape = {"vocab_size": 100, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 128}
    cfg = (ms.GPTConfig.llama(**shape, n_kv_head=2, intermediate_size=256, tie_embeddings=True)
           if family == "llama" else ms.GPTConfig(**shape))
    grid = ms.ProcessGrid(tp=tp)
    return ms.GPT(cfg, grid, dtype="float64", seed=4), grid


def _blocked(model, kind: str) -> int:
    """Every linear and embedding slab replaced by gguf's dequantize(quantize(rows)); how many."""
    from mpisplit.nn.embedding import VocabParallelEmbedding
    from mpisplit.nn.attention import QKVProjection
    from mpisplit.nn.gqa import HeadProjection
    from mpisplit.nn.linear import ColumnParallelLinear, Linear, RowParallelLinear

    qt, n = gguf.GGMLQuantizationType[kind.upper()], 0
    for m in model.modules():
        linear = isinstance(m, (Linear, ColumnParallelLinear, RowParallelLinear, HeadProjection, QKVProjection))
        if linear or isinstance(m, VocabParallelEmbedding):
            rows = m.weight.data.T if linear else m.weight.data
            back = gguf.quants.dequantize(gguf.quants.quantize(rows.astype(np.float32), qt), qt)
            m.weight.data[...] = back.T if linear else back
            n += 1
    return n


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_quantize_at_load_equals_the_dequantized_weights(family: str, kind: str) -> None:
    """`quantize_model` (serve --quantize) at tp = gcd(world, 4), float64: logits equal those of
    the same model whose matrices are gguf's dequantize(quantize(.)) of each slab, to 1e-12 of
    their scale; every linear and embedding slab kept (their float arrays let go, zeros), none
    dequantized (128 and 512 / tp input features: whole blocks)."""
    import mpisplit as ms
    from mpisplit.models.quantize import quantize_model

    tp = math.gcd(COMM.Get_size(), 4)
    (model, grid), (ref, _) = _tiny(family, tp), _tiny(family, tp)
    report = quantize_model(model, kind)
    assert len(report["kept"]) == _blocked(ref, kind) and not report["dequantized"], report
    products = {name for name, p in model.named_parameters() if p.ndim == 2 and name != "wpe.weight"}
    assert set(report["kept"]) == products  # every matrix of a product (GPT-2's position table is added)
    assert all(not p.data.any() and set(p.data.strides) == {0} for _, p in model.named_parameters()
               if p.quantized is not None)
    ids = np.array([[5, 70, 99, 3, 42, 14, 1, 60], [9, 8, 7, 6, 5, 4, 3, 2]])
    with ms.no_grad():
        want, got = ms.to_numpy(ref(ids)), ms.to_numpy(model(ids))
    assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()
    grid.free()


@world(sizes=(1,))
def test_served_with_quantize_answers_as_the_dequantized_weights(tmp_path: Path) -> None:
    """`mpisplit serve --hf FOLDER --quantize q4_0` at 2 ranks, float64, through the openai
    client: the greedy ids of the in-process model with gguf's dequantized Q4_0 weights; the
    start line says what was quantized. --quantize with a GGUF file is one clear error."""
    import subprocess
    import sys

    openai = pytest.importorskip("openai")
    from _serving import Server, greedy_reference, serve_env

    model, grid = _tiny("llama", 1)
    model.save_pretrained(tmp_path / "hf")
    _blocked(model, "q4_0")
    prompt = [5, 70, 99, 3]
    want = greedy_reference(model, prompt, 12).tolist()
    with Server(2, ["--hf", str(tmp_path / "hf"), "--dtype", "float64", "--quantize", "q4_0"]) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=60, max_retries=0)
        got = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=12,
                                        temperature=0, logprobs=1)
        assert server.stop() == 0
    assert [line for line in server.log if "matrices quantized to Q4_0 blocks" in line], server.log[-5:]
    assert [int(t) for t in got.choices[0].logprobs.tokens] == want  # no tokenizer: each token is its id
    grid.free()
    path = G.write_gguf(tmp_path / "m.gguf", dict(G.TINY), G.llama_arrays(dict(G.TINY)), "Q8_0")
    bad = subprocess.run([sys.executable, "-m", "mpisplit", "serve", "--gguf", str(path), "--quantize", "q8_0"],
                         capture_output=True, text=True, timeout=120, env=serve_env(), check=False)
    assert bad.returncode != 0 and "GGUF file's own blocks are kept" in bad.stderr, bad.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "mpisplit", "serve", "--hf", str(tmp_path / "hf"), "--dequantize"],
                         capture_output=True, text=True, timeout=120, env=serve_env(), check=False)
    assert bad.returncode != 0 and "--dequantize applies to --gguf files" in bad.stderr, bad.stderr[-2000:]
