"""The documents of `mpisplit prepare`'s inputs, in a fixed order.

A text file is one document, or several when `split_text` cuts it: "blank-lines" at every run of
blank lines (paragraphs, chapters), a size such as "64KiB" into pieces of about that many
characters, each ending at a line end. A JSONL file (.jsonl, .ndjson) holds one document per line, the
string under `field`; a name ending in .gz is decompressed as it streams; a folder is walked in
sorted order of its relative paths (names starting with "." are skipped). Empty documents are
skipped. Every error names the file and the place in it.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")  # a line end and the blank lines after it
_UNITS = {"": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6}


@dataclass
class Document:
    text: str
    source: str  # "file" or "file:line", for messages
    disk_bytes: int  # bytes of the input file consumed since the previous document (progress)


def input_files(inputs: list[str | os.PathLike]) -> list[Path]:
    """Every file the inputs name, in order: files as given, folders walked sorted."""
    if not inputs:
        raise ValueError("no inputs: name text, JSONL or .gz files, or folders")
    files: list[Path] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = sorted(
                (p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))),
                key=lambda p: p.relative_to(path).as_posix(),
            )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {str(path)!r} does not exist")
    return files


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def is_jsonl(path: Path) -> bool:
    name = path.name.removesuffix(".gz")
    return name.endswith(_JSONL_SUFFIXES)


def check_split_text(split_text: str) -> int | None:
    """The piece size in characters of a size `split_text`, None for "file" and "blank-lines"."""
    if split_text in ("file", "blank-lines"):
        return None
    found = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", split_text)
    unit = found.group(2).lower() if found else ""
    if found is None or unit not in _UNITS or int(found.group(1)) < 1:
        raise ValueError(f"--split-text must be 'file', 'blank-lines' or a size such as 64KiB, got {split_text!r}")
    return int(found.group(1)) * _UNITS[unit]


def iter_documents(files: list[Path], field: str = "text", split_text: str = "file") -> Iterator[Document]:
    size = check_split_text(split_text)
    for path in files:
        if is_jsonl(path):
            yield from _jsonl_documents(path, field)
        else:
            doc = _text_document(path)
            yield from _pieces(doc, split_text, size)


def _pieces(doc: Document, split_text: str, size: int | None) -> Iterator[Document]:
    """The non-empty documents `doc` is cut into (the file's bytes counted with the first)."""
    if split_text == "file":
        texts = [doc.text]
    elif size is None:
        texts = _BLANK_LINES.split(doc.text)
    else:
        texts = list(_by_size(doc.text, size))
    disk = doc.disk_bytes
    kept = [t for t in texts if t] if split_text == "file" else [t for t in texts if t.strip()]
    for number, text in enumerate(kept):
        yield Document(text, doc.source if number == 0 else f"{doc.source} piece {number + 1}", disk)
        disk = 0


def _by_size(text: str, size: int) -> Iterator[str]:
    """Pieces of at least `size` characters that end at a line end (the last one may be shorter;
    a piece grows past `size` only up to its line's end)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size - 1)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


class _Counted:
    """The on-disk position of a (possibly compressed) stream, for the progress bar."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.reported = raw, 0

    def advance(self) -> int:
        now = self.raw.tell()
        step, self.reported = now - self.reported, now
        return step


def _open(path: Path) -> tuple[io.BufferedIOBase, _Counted]:
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller through the returned stream
    stream: io.BufferedIOBase = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith(".gz") else raw
    return stream, _Counted(raw)


def _decode(data: bytes, where: str, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{where} is not UTF-8 text: {exc.reason} at byte {offset + exc.start}"
        ) from None


def _text_document(path: Path) -> Document:
    stream, counted = _open(path)
    try:
        with stream:
            data = _read_all(stream, path)
            return Document(_decode(data, repr(str(path)), 0), str(path), counted.advance())
    finally:
        counted.raw.close()


def _read_all(stream: io.BufferedIOBase, path: Path) -> bytes:
    try:
        return stream.read()
    except (OSError, EOFError) as exc:  # a truncated or corrupt .gz
        raise ValueError(f"{str(path)!r} cannot be read: {exc}") from None


def _jsonl_documents(path: Path, field: str) -> Iterator[Document]:
    stream, counted = _open(path)
    try:
        with stream:
            offset = 0  # of the line's first byte in the (decompressed) stream
            for number, line in enumerate(_lines(stream, path), start=1):
                where = f"{str(path)!r} line {number}"
                text = _field(_decode(line, where, offset), field, f"{path}:{number}")
                offset += len(line)
                if text:
                    yield Document(text, f"{path}:{number}", counted.advance())
    finally:
        counted.raw.close()


def _lines(stream: io.BufferedIOBase, path: Path) -> Iterator[bytes]:
    try:
        yield from stream
    except (OSError, EOFError) as exc:
        raise ValueError(f"{str(path)!r} cannot be read: {exc}") from None


def _field(line: str, field: str, where: str) -> str:
    if not line.strip():
        return ""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: no field {field!r} (the line has {keys}); choose it with --field")
    text = record[field]
    if not isinstance(text, str):
        raise TypeError(f"{where}: field {field!r} holds {type(text).__name__}, not a string")
    return text
