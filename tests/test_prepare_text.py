"""A text file as a corpus: cut into documents (blank lines, size) or its tail held out.

    python -m pytest -q tests/test_prepare_text.py

References: the `tokenizers` library applied to each expected piece on its own (plus the eos
id), pieces written out by hand, and the hold-out formula max(1, round(n f)).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _corpus import encode_each, make_bpe
from conftest import clean_mpi_env
from test_prepare import split_documents

from mpisplit.data.prepare import PrepareOptions, prepare
from mpisplit.training.config import TrainConfig
from mpisplit.training.prepared import load_tokens

pytestmark = pytest.mark.timeout(120)
QUIET = {"progress": False, "workers": 1}
BOOK = ("Chapter one.\nIt was a dark night\n\n\n  and the rain fell.\n \t\nThe end of it.\n\n"
        "Chapter two.\nMorning came" + " slowly" * 40 + ".\n")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bpe(tmp_path_factory.mktemp("tok") / "bpe")


def test_a_single_file_holds_out_its_tail(tmp_path: Path, bpe: Path) -> None:
    (tmp_path / "book.txt").write_text(BOOK)
    manifest = prepare([tmp_path / "book.txt"], bpe, tmp_path / "c", PrepareOptions(val_fraction=0.1, **QUIET))
    whole = encode_each(bpe, [BOOK])[0]  # the document and its eos
    held = max(1, round(len(whole) * 0.1))
    assert manifest["holdout"] == "tail" and held > 1
    assert split_documents(tmp_path / "c", "train") == [whole[:-held]]
    assert split_documents(tmp_path / "c", "val") == [whole[-held:]]
    data, _, _ = load_tokens(TrainConfig(data=str(tmp_path / "c")))
    x, y = data.batch("train", 0, 0, 4, 8)
    assert x.shape == y.shape == (4, 8) and np.array_equal(x[:, 1:], y[:, :-1])


def test_blank_lines_cut_paragraphs(tmp_path: Path, bpe: Path) -> None:
    (tmp_path / "book.txt").write_text(BOOK)
    prepare([tmp_path / "book.txt"], bpe, tmp_path / "c", PrepareOptions(split_text="blank-lines", val_fraction=0.25,
                                                                      **QUIET))
    pieces = ["Chapter one.\nIt was a dark night", "  and the rain fell.", "The end of it.",
              "Chapter two.\nMorning came" + " slowly" * 40 + ".\n"]
    expected = encode_each(bpe, pieces)
    assert split_documents(tmp_path / "c", "val") == [expected[3]]  # floor(4 x 0.25) > floor(3 x 0.25)
    assert split_documents(tmp_path / "c", "train") == expected[:3]


@pytest.mark.parametrize("size, chars", [("40", 40), ("1k", 1024), ("1KiB", 1024)])
def test_size_cuts_at_line_ends(tmp_path: Path, bpe: Path, size: str, chars: int) -> None:
    lines = [f"line {i} " + "word " * (i % 7) + "\n" for i in range(300)]
    text = "".join(lines)
    (tmp_path / "big.txt").write_text(text)
    manifest = prepare([tmp_path / "big.txt"], bpe, tmp_path / "c", PrepareOptions(split_text=size, **QUIET))
    pieces, piece = [], ""
    for line in lines:  # the reference: whole lines until the piece holds at least `chars` characters
        piece += line
        if len(piece) >= chars:
            pieces.append(piece)
            piece = ""
    pieces += [piece] if piece else []
    assert "".join(pieces) == text and len(pieces) > 1
    expected = encode_each(bpe, pieces)
    got = split_documents(tmp_path / "c", "train") + split_documents(tmp_path / "c", "val")
    assert sorted(map(tuple, got)) == sorted(map(tuple, expected))
    assert manifest["holdout"] == "documents" and manifest["val"]["documents"] >= 1


def test_command_line_says_how(tmp_path: Path, bpe: Path) -> None:
    (tmp_path / "book.txt").write_text(BOOK)
    cmd = [sys.executable, "-m", "mpisplit", "prepare", "--tokenizer", str(bpe), "--workers", "1", "--no-progress"]
    done = subprocess.run([*cmd, "--out", str(tmp_path / "c"), "--val-fraction", "0.1", str(tmp_path / "book.txt")],
                          check=False, capture_output=True, text=True, env=clean_mpi_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    held = max(1, round(len(encode_each(bpe, [BOOK])[0]) * 0.1))
    assert "1 train documents" in done.stdout and f"the last {held} tokens of the single document" in done.stdout
    shown = subprocess.run([*cmd, "--help"], check=True, capture_output=True, text=True, env=clean_mpi_env(),
                           timeout=60).stdout
    assert "--split-text" in shown and "blank-lines" in shown and "last share of tokens" in " ".join(shown.split())
