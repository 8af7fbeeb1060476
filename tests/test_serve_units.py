"""The serving pieces without a server: stop strings and held-back text, sampling, request
validation, the command line. References: plain string operations and hand-computed values."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from _serving import serve_env, write_char_checkpoint

import mpisplit as ms
from mpisplit.serving.sampling import SamplingParams, choose, log_softmax, top_logprobs
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
                 "--api-key", "--prefill-chunk"):
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
