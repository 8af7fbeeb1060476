"""The serving pieces without a server: stop strings and held-back text, sampling, request
validation, the command line. References: plain string operations and hand-computed values."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from _serving import serve_env, write_char_checkpoint

import mpisplit as ms
from mpisplit.serving.sampling import (
    SamplingParams,
    choose,
    log_softmax,
    process_logits,
    top_logprobs,
)
from mpisplit.serving.text import TextStream, held_back
from mpisplit.serving.validation import ApiError, ModelInfo, parse_body, validate_completion
from mpisplit.training.data import CharTokenizer

TOK = CharTokenizer("abcdefghijklmnopqrstuvwxyz ")


def stream_pieces(text: str, stops: list[str], tokenizer=TOK) -> tuple[list[str], str, bool]:
    s = TextStream(tokenizer, stops)
    pieces = []
    for t in tokenizer.encode(text):
        pieces.append(s.push(int(t)))
        if s.stopped:
            break
    if not s.stopped:
        pieces.append(s.flush())
    return pieces, "".join(pieces), s.stopped


def test_held_back_is_the_longest_stop_prefix_at_the_end():
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["lo x", "o"]) == 2  # "lo" of "lo x"; "o" itself would have matched
    assert held_back("abc", ["xyz"]) == 0
    assert held_back("", ["a"]) == 0


@pytest.mark.parametrize("text,stops,expected,stopped", [
    ("the cat sat on the mat", ["sat"], "the cat ", True),
    ("the cat sat on the mat", ["on", "cat"], "the ", True),  # the earliest occurrence wins
    ("the cat sat", ["dog"], "the cat sat", False),
    ("the cat sa", ["sat"], "the cat sa", False),  # a held-back prefix is released at the end
])
def test_stop_strings_cut_like_openai(text, stops, expected, stopped):
    pieces, whole, was_stopped = stream_pieces(text, stops)
    assert whole == expected and was_stopped == stopped
    shown = ""
    for piece in pieces[:-1] if not stopped else pieces:
        shown += piece
        assert not any(stop in shown for stop in stops)


def test_incomplete_utf8_is_held_back():
    tokenizers = pytest.importorskip("tokenizers")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(["plain ascii text only"], vocab_size=260, show_progress=False)
    from mpisplit.models.hf_tokenizer import HFTokenizer

    tok = HFTokenizer(bpe._tokenizer, "test")
    ids = tok.encode("a→b")  # '→' is three bytes, three byte tokens here
    s = TextStream(tok, [])
    pieces = [s.push(int(t)) for t in ids] + [s.flush()]
    assert "".join(pieces) == "a→b" and "\ufffd" not in "".join(pieces)
    assert len(ids) > 3 and pieces[1] == ""


def test_choose_greedy_top_k_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    assert choose(logits, SamplingParams(temperature=0.0), rng) == 0
    draws = {choose(logits, SamplingParams(temperature=1.0, top_k=2, seed=0), rng) for _ in range(200)}
    assert draws == {0, 1}
    draws = {choose(logits, SamplingParams(temperature=1.0, top_p=0.8), rng) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.8
    draws = {choose(logits, SamplingParams(temperature=1.0, top_p=0.5), rng) for _ in range(50)}
    assert draws == {0}


def test_log_softmax_and_top_logprobs():
    logits = np.array([1.0, 3.0, 3.0, -2.0])
    lp = log_softmax(logits)
    assert np.isclose(np.exp(lp).sum(), 1.0, atol=1e-15, rtol=0)
    assert np.allclose(lp, logits - np.log(np.exp(logits).sum()), atol=1e-15, rtol=0)
    assert [i for i, _ in top_logprobs(lp, 3)] == [1, 2, 0]  # a tie goes to the smaller id


MODEL = ModelInfo("m", vocab_size=27, block_size=32, tokenizer=TOK)


def test_validation_defaults_and_fields():
    req = validate_completion({"prompt": "ab", "max_tokens": 5, "temperature": 0, "stop": "x", "seed": 3,
                               "top_k": -1, "logprobs": 2}, MODEL)
    assert req.prompt == [0, 1] and req.max_tokens == 5 and req.stops == ["x"] and req.logprobs == 2
    assert req.sampling == SamplingParams(temperature=0.0, top_k=None, top_p=1.0, seed=3)
    assert validate_completion({"prompt": ["ab"]}, MODEL).max_tokens == 16  # OpenAI's default
    no_tok = ModelInfo("m", 27, 32, None)
    with pytest.raises(ApiError, match="no tokenizer"):
        validate_completion({"prompt": "ab"}, no_tok)
    with pytest.raises(ApiError, match="needs a tokenizer"):
        validate_completion({"prompt": [1], "stop": "a"}, no_tok)
    for raw, needle in ((b"nope", "not valid JSON"), (b'"text"', "JSON object"), (b"\xff", "not valid JSON")):
        with pytest.raises(ApiError, match=needle):
            parse_body(raw)
    with pytest.raises(ApiError, match="'top_k' must be >= 1"):
        validate_completion({"prompt": "a", "top_k": 0}, MODEL)
    with pytest.raises(ApiError, match="'temperature' must be a number"):
        validate_completion({"prompt": "a", "temperature": True}, MODEL)


def test_serve_help_lists_every_flag():
    out = subprocess.run([sys.executable, "-m", "mpisplit.serve", "--help"], capture_output=True, text=True,
                         timeout=60, env=serve_env(), check=True).stdout
    out = " ".join(out.split())
    for flag in ("--ckpt", "--hf", "--host", "--port", "--tp", "--dtype", "--max-batch", "--max-queue",
                 "--api-key", "--api-key-file", "--prefill-chunk"):
        assert flag in out
    assert "127.0.0.1" in out and "(default: 16)" in out
    top = subprocess.run([sys.executable, "-m", "mpisplit.cli.main", "--help"], capture_output=True, text=True,
                         timeout=60, env=serve_env(), check=True).stdout
    assert "serve" in top


def test_serve_refuses_bad_flags():
    out = subprocess.run([sys.executable, "-m", "mpisplit.serve", "--ckpt", "/nonexistent", "--max-batch", "0"],
                         capture_output=True, text=True, timeout=60, env=serve_env(), check=False)
    assert out.returncode == 2 and out.stderr.strip() == "error: --max-batch must be >= 1, got 0"
    out = subprocess.run([sys.executable, "-m", "mpisplit.serve", "--ckpt", "/nonexistent"],
                         capture_output=True, text=True, timeout=60, env=serve_env(), check=False)
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = subprocess.run([sys.executable, "-m", "mpisplit.serve", "--ckpt", "/nonexistent", "--max-batch", "4",
                          "--prefill-chunk", "8", "--max-num-batched-tokens", "11"],
                         capture_output=True, text=True, timeout=60, env=serve_env(), check=False)
    assert out.returncode == 2 and "--max-num-batched-tokens must be 0 (no limit) or >= --max-batch + " \
        "--prefill-chunk (12), got 11" in out.stderr


def test_serve_on_a_gpu_without_cupy_stops_every_rank(tmp_path):
    """--device gpu where CuPy is missing: both ranks stop (non-zero exit, no hang) with the error
    said once, on one line."""
    pytest.importorskip("starlette")
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    from conftest import mpiexec_command

    usage = subprocess.run([sys.executable, "-m", "mpisplit.serve", "--help"], capture_output=True, text=True,
                           timeout=60, env=serve_env(), check=True).stdout
    assert "--device {cpu,gpu}" in usage and "--comm {auto,mpi,staged,nccl}" in usage
    ckpt = write_char_checkpoint(tmp_path / "char")
    out = subprocess.run([*mpiexec_command(2), sys.executable, "-m", "mpisplit.serve", "--ckpt", str(ckpt),
                          "--device", "gpu", "--port", "0"],
                         capture_output=True, text=True, timeout=120, env=serve_env(), check=False)
    assert out.returncode != 0
    errors = [line for line in (out.stdout + out.stderr).splitlines() if "--device gpu needs CuPy" in line]
    assert len(errors) == 1, out.stdout + out.stderr


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("k, n", [(32, 67), (32, 34), (768, 64), (48, 96)])
def test_row_blocks_give_a_row_the_same_bits_whatever_else_is_in_the_call(dtype, k, n):
    """Shapes where OpenBLAS's AVX-512 small-matrix kernels round a row differently with the
    number of rows: in row_blocks(8) the first row's product is the same bits for every batch
    size and for every position it takes."""
    from mpisplit.autograd import ops
    from mpisplit.autograd.linalg import row_blocks

    rng = np.random.default_rng(6)
    w = ms.Tensor(rng.standard_normal((k, n)).astype(dtype))
    wt = ms.Tensor(np.ascontiguousarray(w.data.T))
    x = rng.standard_normal((64, k)).astype(dtype)
    with row_blocks(8):
        ref = ops.linear(ms.Tensor(x[:8]), w).data[0]
        ref_t = ops.linear_t(ms.Tensor(x[:8]), wt).data[0]
        for rows in range(8, 65, 8):
            for pos in (0, rows - 1):
                xs = np.roll(x[:rows], pos, axis=0)  # row 0 of x now at `pos`
                assert np.array_equal(ops.linear(ms.Tensor(xs), w).data[pos], ref), (rows, pos)
                assert np.array_equal(ops.linear_t(ms.Tensor(xs), wt).data[pos], ref_t), (rows, pos)
        with pytest.raises(ValueError, match="multiple of row_blocks"):
            ops.linear(ms.Tensor(x[:12]), w)


EDGE_VALUES = [5e-324, 1e-310, 1e-300, 9.99e-6, 1e-5, 0.3, 1.0, 7.0, 1e300]


@pytest.mark.parametrize("temperature", EDGE_VALUES)
def test_sampling_is_finite_for_every_accepted_value(temperature):
    """Every temperature and top_p validation accepts, with and without top_k, min_p, bias and
    penalties, on logits as spread as a float32 model gives: a token id, never NaN; below 1e-5
    the argmax (vLLM's greedy rule)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 30, 257)
    logits[17] = 400.0
    history = rng.integers(0, 257, 40).tolist()
    for top_p in (5e-324, 1e-300, 0.5, 1.0):
        for extra in ({}, {"top_k": 1}, {"top_k": 50, "min_p": 5e-324}, {"min_p": 1.0},
                      {"logit_bias": ((3, 100.0), (17, -100.0)), "presence_penalty": 2.0, "frequency_penalty": -2.0,
                       "repetition_penalty": 0.01}):
            params = SamplingParams(temperature=temperature, top_p=top_p, **extra)
            z = process_logits(logits, params, history[:10], history[10:])
            assert not np.isnan(z).any()
            with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow is harmless
                token = choose(z, params, np.random.default_rng(1))
            assert 0 <= token < 257
            cut = top_p <= 1e-300 or extra.get("top_k") == 1 or extra.get("min_p") == 1.0
            if temperature < 1e-5 or (cut and temperature < 1e3):  # at 1e300 every p rounds alike
                assert token == int(np.argmax(z)), (temperature, top_p, extra)


def test_process_logits_equals_the_formulas_token_by_token():
    """OpenAI's presence/frequency rule over the completion, transformers' repetition rule over
    prompt and completion, the bias added, the banned ids at -inf: against plain loops."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, 40)
    prompt, generated = [1, 2, 2, 5], [5, 7, 7, 7, 9, 1]
    params = SamplingParams(logit_bias=((0, 3.0), (7, -1.5)), presence_penalty=0.4, frequency_penalty=0.25,
                            repetition_penalty=1.3)
    want = logits.copy()
    want[0] += 3.0
    want[7] -= 1.5
    for t in set(prompt + generated):
        want[t] = want[t] / 1.3 if want[t] > 0 else want[t] * 1.3
    for t in set(generated):
        want[t] -= generated.count(t) * 0.25 + 0.4
    want[[4, 9]] = -np.inf
    got = process_logits(logits, params, prompt, generated, banned=(4, 9))
    assert np.array_equal(got, want)
    assert np.array_equal(process_logits(logits, SamplingParams(), prompt, generated), logits)


def test_top_logprobs_equals_a_full_sort_with_ties():
    rng = np.random.default_rng(5)
    for V, n in ((49152, 20), (100, 100), (7, 3), (50, 1)):
        lp = np.round(rng.normal(0, 1, V), 1)  # many ties
        ref = np.lexsort((np.arange(V), -lp))[:n]
        assert [i for i, _ in top_logprobs(lp, n)] == ref.tolist()
        assert [v for _, v in top_logprobs(lp, n)] == lp[ref].tolist()


def test_huge_integers_and_unknown_fields():
    body = parse_body(b'{"prompt": "a", "max_tokens": ' + b"1" * 5000 + b', "stuff": 1}')
    with pytest.raises(ApiError, match=r"'max_tokens' must be in \[1, 32\], got <an integer of 5000 digits>") as info:
        validate_completion(body, MODEL)
    assert info.value.param == "max_tokens"
    assert validate_completion(parse_body(b'{"prompt": "a", "stuff": 1}'), MODEL).ignored == ("stuff",)
    with pytest.raises(ApiError, match="'use_beam_search' is not supported"):
        validate_completion({"prompt": "a", "use_beam_search": True}, MODEL)
    assert validate_completion({"prompt": "a", "use_beam_search": False, "suffix": ""}, MODEL).ignored == ()


def test_eos_ids_from_a_folder(tmp_path):
    from mpisplit.models.hf_eos import eos_token_ids

    assert eos_token_ids(tmp_path) == ()
    (tmp_path / "config.json").write_text('{"eos_token_id": 128001}')
    assert eos_token_ids(tmp_path) == (128001,)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [128001, 128008, 128009]}')
    assert eos_token_ids(tmp_path) == (128001, 128008, 128009)
    (tmp_path / "config.json").write_text('{"eos_token_id": [7, 128009]}')
    assert eos_token_ids(tmp_path) == (7, 128009, 128001, 128008)
    (tmp_path / "config.json").write_text('{"eos_token_id": "two"}')
    with pytest.raises(ValueError, match="config.json: eos_token_id must be"):
        eos_token_ids(tmp_path)
    # the tokenizer's eos token (tokenizer_config.json's, looked up in tokenizer.json) joins them
    (tmp_path / "config.json").write_text('{"eos_token_id": 7}')
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": {"content": "<|eot|>"}}')
    (tmp_path / "tokenizer.json").write_text(
        '{"added_tokens": [{"id": 5, "content": "<|bos|>"}, {"id": 9, "content": "<|eot|>"}], "model": {"vocab": {}}}')
    assert eos_token_ids(tmp_path) == (7, 128001, 128008, 128009, 9)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "w"}')
    (tmp_path / "tokenizer.json").write_text('{"added_tokens": [], "model": {"vocab": {"w": 3, "x": 4}}}')
    assert eos_token_ids(tmp_path) == (7, 128001, 128008, 128009, 3)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "absent"}')
    assert eos_token_ids(tmp_path) == (7, 128001, 128008, 128009)


def test_api_key_sources(tmp_path):
    from mpisplit.cli.serve import api_key, parse_args

    (tmp_path / "k").write_text("from-file\n")
    assert api_key(parse_args(["--ckpt", "x"]), {}) is None
    assert api_key(parse_args(["--ckpt", "x"]), {"MPISPLIT_API_KEY": "from-env"}) == "from-env"
    assert api_key(parse_args(["--ckpt", "x", "--api-key-file", str(tmp_path / "k")]), {}) == "from-file"
    assert api_key(parse_args(["--ckpt", "x", "--api-key", "k"]), {}) == "k"
    with pytest.raises(ValueError, match="one way, not --api-key-file and MPISPLIT_API_KEY"):
        api_key(parse_args(["--ckpt", "x", "--api-key-file", str(tmp_path / "k")]), {"MPISPLIT_API_KEY": "e"})
    with pytest.raises(ValueError, match="empty"):
        api_key(parse_args(["--ckpt", "x"]), {"MPISPLIT_API_KEY": ""})
    with pytest.raises(ValueError, match="cannot be read"):
        api_key(parse_args(["--ckpt", "x", "--api-key-file", str(tmp_path / "absent")]), {})


def test_library_generate_stops_at_eos():
    """GPT.generate with eos ids: a row ends at its first eos (kept, then repeated), the loop at
    the last row's; the tokens before are the ignore-eos run's."""
    from _serving import tiny_model

    model = tiny_model(31, seed=6)
    prompts = np.array([[1, 2, 3], [4, 5, 6]])
    free = model.generate(prompts, 20)[:, 3:].tolist()
    eos = tuple(next(t for i, t in enumerate(row) if i > 0 and t not in row[:i]) for row in free)
    ends = [min(row.index(t) for t in eos if t in row) for row in free]
    ended = model.generate(prompts, 20, eos_token_ids=eos)[:, 3:].tolist()
    assert len(ended[0]) == max(ends) + 1 < 20
    for row, end, got in zip(free, ends, ended):
        assert got == row[: end + 1] + [row[end]] * (max(ends) - end)
    assert model.generate(prompts, 20, temperature=1e-310)[:, 3:].tolist() == free
    with pytest.raises(ValueError, match="eos token id 31 is not an integer in"):
        model.generate(prompts, 2, eos_token_ids=(31,))
    model.grid.free()


def test_incremental_detokenization_equals_the_whole_decode():
    """Random ids of a byte-level BPE trained on text with multi-byte characters (so pieces end
    mid-character): the streamed pieces join to the tokenizer's decode of all the ids, with
    stop strings too (the text before the first one, as plain string search finds it)."""
    tokenizers = pytest.importorskip("tokenizers")
    from mpisplit.models.hf_tokenizer import HFTokenizer

    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(["Über café naïve résumé → déjà vu, the quick brown fox " * 5], vocab_size=300,
                            show_progress=False)
    tok = HFTokenizer(bpe._tokenizer, "test")
    rng = np.random.default_rng(7)
    for trial in range(30):
        ids = rng.integers(0, bpe.get_vocab_size(), 60).tolist()
        whole = tok.decode(ids)
        stops = [] if trial % 2 else [whole[20:23]]
        s = TextStream(tok, stops)
        pieces = []
        for t in ids:
            pieces.append(s.push(t))
            if s.stopped:
                break
        if not s.stopped:
            pieces.append(s.flush())
        want = whole[: whole.find(stops[0])] if stops and whole.find(stops[0]) >= 0 else whole
        assert "".join(pieces) == want, trial


def test_nucleus_equals_the_full_sort():
    """top_p's kept set through partitions equals the one of a stable argsort of the whole
    vocabulary, ties and flat distributions included."""
    from mpisplit.serving.sampling import _nucleus

    rng = np.random.default_rng(11)
    for V, scale in ((49152, 3.0), (49152, 0.01), (300, 1.0), (5, 1.0)):
        for rounding in (None, 2):
            z = rng.normal(0, scale, V)
            p = np.exp(z - z.max())
            p = np.round(p, rounding) + 1e-9 if rounding else p
            p /= p.sum()
            for top_p in (5e-324, 0.1, 0.5, 0.9, 0.999999):
                order = np.argsort(-p, kind="stable")
                cum = np.cumsum(p[order])
                want = order[: int(np.searchsorted(cum, top_p)) + 1]
                assert np.array_equal(_nucleus(p, top_p), want), (V, scale, rounding, top_p)


def test_eos_ids_of_a_gguf_file(tmp_path):
    """A GGUF file's eos ids: the eos it was written with, then llama.cpp's end-of-turn id
    (Llama 3's <|eot_id|> is not the eos) when the file names one."""
    pytest.importorskip("gguf")
    import _gguf_files as G

    from mpisplit.models.hf_eos import eos_token_ids

    plain = G.write_gguf(tmp_path / "a.gguf", G.TINY, G.llama_arrays(G.TINY))
    assert eos_token_ids(plain) == (2,)  # write_gguf's add_eos_token_id(2)
    turn = G.write_gguf(tmp_path / "b.gguf", G.TINY, G.llama_arrays(G.TINY),
                        metadata={"tokenizer.ggml.eot_token_id": 5})
    assert eos_token_ids(turn) == (2, 5)
