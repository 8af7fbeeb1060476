"""Before training, every rank compares its configuration, code and data with the others'.

`check_consistent` all-gathers a hash of each part (the details only on a mismatch); a
difference raises `ConsistencyError` on every rank, naming the ranks and the keys that differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mpisplit.runtime.faults.common import (
    _mpi,
    format_ranks,
)


class ConsistencyError(ValueError):
    """Ranks of one job disagree on configuration, code or data."""

    per_rank = True  # every rank says what it holds (run_cli prints "[rank r] error: ...")


def file_digests(
    paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None
) -> dict[str, str]:
    """{name: sha256 hex} of files; names relative to `root` (default: the file name)."""
    out: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        name = p.relative_to(root).as_posix() if root is not None else p.name
        out[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def code_digests(extra: Iterable[str | os.PathLike] = ()) -> dict[str, str]:
    """sha256 of every source file of the mpisplit package ("mpisplit/...py") and of `extra`
    files (by file name, e.g. the training script)."""
    pkg = Path(__file__).resolve().parents[2]  # mpisplit/runtime/faults/consistency.py -> mpisplit/
    out = file_digests(sorted(pkg.rglob("*.py")), root=pkg.parent)
    out.update(file_digests(extra))
    return out


def text_digest(text: str | bytes) -> str:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


def _shown(value: Any) -> str:
    text = (
        value[:12]
        if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)
        else repr(value)
    )
    return text if len(text) <= 60 else text[:57] + "..."


_MISSING = "<absent>"


def check_consistent(comm: Any, **parts: Any) -> None:
    """Raise ConsistencyError on every rank unless every part is equal on all ranks. Collective.

    A part is a dict (compared key by key: the message names each key that differs and its
    value per group of ranks) or any JSON-serialisable value. One 64-byte all-gather when all
    agree; the parts themselves are gathered only to explain a mismatch.
    """
    mpi = _mpi(comm)
    blob = json.dumps(parts, sort_keys=True, default=repr)
    digest = hashlib.sha256(blob.encode()).hexdigest()
    if mpi.Get_size() == 1 or len(set(mpi.allgather(digest))) == 1:
        return
    everyone = mpi.allgather(json.loads(blob))
    problems: list[str] = []
    for name in parts:
        values = [e.get(name) for e in everyone]
        if isinstance(values[0], dict):
            keys = sorted({k for v in values if isinstance(v, dict) for k in v}, key=str)
            items = [
                (
                    f"{name} {k}",
                    [v.get(k, _MISSING) if isinstance(v, dict) else _MISSING for v in values],
                )
                for k in keys
            ]
        else:
            items = [(name, values)]
        for label, per_rank in items:
            groups: dict[str, list[int]] = {}
            for r, v in enumerate(per_rank):
                groups.setdefault(json.dumps(v, sort_keys=True), []).append(r)
            if len(groups) > 1:
                shown = "; ".join(
                    f"{_shown(json.loads(k))} on rank{'s' if len(rs) > 1 else ''} {format_ranks(rs)}"
                    for k, rs in groups.items()
                )
                problems.append(f"{label}: {shown}")
    raise ConsistencyError(
        "ranks of this job disagree (every rank must run the same configuration, code and data): "
        + " | ".join(problems)
    )
