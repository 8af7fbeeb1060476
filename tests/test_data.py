"""Text data: tokenizer, file loading, batches, unigram entropy, the default corpus.

    python -m pytest -q tests/test_data.py

References: hand-written strings and hand-computed formulas.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mpisplit.training.data import (
    CharTokenizer,
    TextDataset,
    default_corpus,
    load_text,
    unigram_entropy,
)

TEXT = (
    "the quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs!\n" * 4
)


def test_tokenizer_round_trip() -> None:
    tok = CharTokenizer.from_text("hello, world")
    assert tok.chars == " ,dehlorw"  # distinct characters, sorted by code point
    assert tok.vocab_size == 9
    ids = tok.encode("hello")
    assert ids.dtype == np.int64
    assert ids.tolist() == [4, 3, 5, 5, 6]
    assert tok.decode(ids) == "hello"
    assert tok.decode(np.array([[8, 6], [7, 2]])) == "word"  # any shape, row-major
    text = "ünïcode ✓ text\twith\ttabs\n"
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("").shape == (0,)


def test_tokenizer_unknown_characters() -> None:
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(
        ValueError, match=r"2 character\(s\) not in the model's vocabulary: 'x', 'z'"
    ):
        tok.encode("abzcx")
    with pytest.raises(ValueError, match="distinct"):
        CharTokenizer("aba")
    with pytest.raises(ValueError, match="non-empty"):
        CharTokenizer("")


def test_load_text(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("Grüße, world\n", encoding="utf-8")
    assert load_text(good) == "Grüße, world\n"
    assert load_text(str(good)) == "Grüße, world\n"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "is empty"),
        (b" \n\t\n", "is empty"),  # whitespace only
        (b"text\x00more", "looks binary"),
        (
            b"caf\xe9 au lait",
            r"is not UTF-8 text \(invalid continuation byte at byte 3\)",
        ),  # Latin-1
        (b"\xff\xfeh\x00i\x00", "looks binary"),  # UTF-16 with a byte-order mark
    ],
)
def test_load_text_errors(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        load_text(path)
    assert str(path) in str(info.value)


def test_load_text_missing_and_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data file '.*absent\.txt' does not exist"):
        load_text(tmp_path / "absent.txt")
    with pytest.raises(ValueError, match="is not a file"):
        load_text(tmp_path)


def test_split_is_first_90_percent() -> None:
    data = TextDataset(TEXT)
    n = len(TEXT)
    n_val = int(n * 0.1)
    assert len(data.train) == n - n_val and len(data.val) == n_val
    assert data.tokenizer.decode(data.train) + data.tokenizer.decode(data.val) == TEXT


def test_batch_deterministic_and_shifted() -> None:
    data = TextDataset(TEXT)
    x, y = data.batch("train", seed=7, step=3, batch_size=6, seq_len=10)
    assert x.shape == y.shape == (6, 10) and x.dtype == y.dtype == np.int64
    x2, y2 = data.batch("train", seed=7, step=3, batch_size=6, seq_len=10)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    # Each row is a window of the training tokens; targets are the next tokens.
    train = data.train.tolist()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        assert row_x[1:] == row_y[:-1]
        starts = [i for i in range(len(train) - 10) if train[i : i + 11] == row_x + row_y[-1:]]
        assert starts, "row is not a window of the training tokens"
    # Another step, seed or split draws other windows.
    assert not np.array_equal(x, data.batch("train", 7, 4, 6, 10)[0])
    assert not np.array_equal(x, data.batch("train", 8, 3, 6, 10)[0])
    xv, yv = data.batch("val", 7, 3, 6, 10)
    val = data.val.tolist()
    for row_x, row_y in zip(xv.tolist(), yv.tolist()):
        assert any(val[i : i + 11] == row_x + row_y[-1:] for i in range(len(val) - 10))


def test_batch_reaches_the_last_window() -> None:
    """Start offsets range over [0, len - seq_len - 1]: with seq_len = len - 2 there are two."""
    data = TextDataset("abcdefghij" * 2)  # 18 train tokens, 2 validation tokens
    seen = {data.batch("train", 0, s, 4, 16)[0][0, 0] for s in range(40)}
    assert seen == {0, 1}
    x, y = data.batch("val", 0, 0, 3, 1)
    assert x.tolist() == [[data.val[0]]] * 3 and y.tolist() == [[data.val[1]]] * 3


@pytest.mark.parametrize("dp", [1, 2, 3, 4, 6])
def test_dp_shares_are_row_blocks(dp: int) -> None:
    data = TextDataset(TEXT)
    gx, gy = data.batch("train", 11, 5, 12, 8)
    per = 12 // dp
    for r in range(dp):
        x, y = data.batch("train", 11, 5, 12, 8, dp_rank=r, dp=dp)
        assert np.array_equal(x, gx[r * per : (r + 1) * per])
        assert np.array_equal(y, gy[r * per : (r + 1) * per])


def test_batch_not_divisible_by_dp() -> None:
    with pytest.raises(ValueError, match="batch size 10 is not divisible by dp=4"):
        TextDataset(TEXT).batch("train", 0, 0, 10, 8, dp_rank=0, dp=4)


def test_check_seq_len() -> None:
    data = TextDataset("x" * 95 + "y" * 5 + "z" * 10)  # 99 train tokens, 11 validation tokens
    data.check_seq_len(10)  # needs 11 tokens per split
    with pytest.raises(
        ValueError,
        match="sequence length 11 needs at least 12 tokens per split; "
        "the data has 99 train and 11 validation tokens",
    ):
        data.check_seq_len(11)


def test_unigram_entropy_formula() -> None:
    text = "aaaabbc"  # p = 4/7, 2/7, 1/7
    want = -(4 / 7 * math.log(4 / 7) + 2 / 7 * math.log(2 / 7) + 1 / 7 * math.log(1 / 7))
    tok = CharTokenizer("abcd")  # "d" never occurs: 0 log 0 = 0
    assert unigram_entropy(tok.encode(text), tok.vocab_size) == pytest.approx(want, rel=1e-15)
    assert unigram_entropy(np.zeros(5, dtype=np.int64), 3) == 0.0
    assert unigram_entropy(np.arange(8), 8) == pytest.approx(math.log(8), rel=1e-15)
    # A long text, against counts taken with Counter.
    data = TextDataset(TEXT)
    counts = Counter(data.tokenizer.decode(data.train))
    n = sum(counts.values())
    want = -sum(c / n * math.log(c / n) for c in counts.values())
    assert unigram_entropy(data.train, data.tokenizer.vocab_size) == pytest.approx(want, rel=1e-12)


def test_default_corpus_is_english_text() -> None:
    text = default_corpus()
    assert isinstance(text, str) and len(text) > 100_000
    assert text == default_corpus()  # the same on every call (every rank)
    words = Counter(text.lower().split())
    assert words.most_common(1)[0][0] == "the"
    data = TextDataset(text)
    assert 50 <= data.tokenizer.vocab_size <= 400
    data.check_seq_len(64)  # the default --seq-len fits
    assert (
        2.5
        < unigram_entropy(data.train, data.tokenizer.vocab_size)
        < math.log(data.tokenizer.vocab_size)
    )
