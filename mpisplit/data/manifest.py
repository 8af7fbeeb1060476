"""manifest.json of a prepared corpus: reading it and checking the files against it.

A shard or index file whose size or sha256 differs from the manifest (truncated, replaced,
edited) is a ValueError naming the file and both values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mpisplit.runtime.files import sha256_file

FORMAT = "mpisplit-tokens-v1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def is_prepared(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a prepared corpus: it has no {MANIFEST} (mpisplit prepare)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{str(path)!r} has format {found!r}; this version reads {FORMAT!r}")
    for split in SPLITS:
        part = manifest.get(split)
        if not isinstance(part, dict) or not {"documents", "tokens", "shards", "index"} <= part.keys():
            raise ValueError(f"{str(path)!r} lacks the description of the {split!r} split")
    if manifest.get("dtype") not in ("uint16", "uint32"):
        raise ValueError(f"{str(path)!r}: dtype {manifest.get('dtype')!r} is neither uint16 nor uint32")
    return manifest


def corpus_files(manifest: dict[str, Any]) -> list[tuple[str, int | None, str]]:
    """(file name, size in bytes or None, sha256) of every data file the manifest lists."""
    files: list[tuple[str, int | None, str]] = []
    for split in SPLITS:
        for part in (manifest[split], manifest[split].get("mask")):  # a chat corpus has loss-mask shards too
            if part is not None:
                files.extend((s["file"], s["bytes"], s["sha256"]) for s in part["shards"])
                files.append((part["index"]["file"], None, part["index"]["sha256"]))
    return files


def check_sizes(folder: Path, manifest: dict[str, Any]) -> None:
    """Every shard exists and has the manifest's size (cheap: no file is read)."""
    for name, size, _ in corpus_files(manifest):
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r}, listed in {MANIFEST}, does not exist")
        if size is not None and path.stat().st_size != size:
            raise ValueError(f"{str(path)!r} has {path.stat().st_size} bytes; {MANIFEST} says {size}")


def check_digests(folder: Path, manifest: dict[str, Any], rank: int = 0, size: int = 1) -> None:
    """The sha256 of files rank, rank + size, ...: each rank of a job reads its share."""
    for name, _, digest in corpus_files(manifest)[rank::size]:
        found = sha256_file(folder / name)
        if found != digest:
            raise ValueError(f"{str(folder / name)!r} has sha256 {found[:16]}...; {MANIFEST} says {digest[:16]}...")
