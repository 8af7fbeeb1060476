"""Validation of a parsed index.json: schema, file names that cannot escape the folder, shards
that tile every split tensor exactly once, and pieces that tile their slabs exactly once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mpisplit.training.checkpoint.layout import (
    _DTYPES,
    _SHA256,
    FORMAT,
    INDEX_NAME,
    READABLE_VERSIONS,
    slab_rows_view,
)


def _check_file_name(name: Any) -> str:
    """A shard file must be a plain name inside the folder: no paths, no '..'."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or os.path.isabs(name)
        or os.path.basename(name) != name
    ):
        raise ValueError(
            f"index names file {name!r}, which is not a plain file name inside the checkpoint"
        )
    return name


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _require(ok: bool, message: str) -> None:
    # A malformed index is a ValueError whatever the field, wrong JSON types included.
    if not ok:
        raise ValueError(message)


def _validate_index(path: Path, index: Any) -> dict:
    """Check the structure of a parsed index.json; return it with shards sorted."""
    where = path / INDEX_NAME
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{where}: not a {FORMAT} index")
    if index.get("version") not in READABLE_VERSIONS or isinstance(index.get("version"), bool):
        known = ", ".join(str(v) for v in READABLE_VERSIONS)
        raise ValueError(f"{where}: format version {index.get('version')!r}, this reader knows {known}")
    for key in ("step", "tp", "dp"):
        if not _is_int(index.get(key)) or index[key] < 0:
            raise ValueError(f"{where}: {key} must be an int >= 0, got {index.get(key)!r}")
    files, tensors = index.get("files"), index.get("tensors")
    if not (isinstance(files, dict) and isinstance(tensors, dict)):
        raise ValueError(f"{where}: 'files' and 'tensors' must be objects")  # noqa: TRY004 - as _require
    _require(
        isinstance(index.get("meta"), dict) and isinstance(index.get("rank_meta"), list),
        f"{where}: 'meta' must be an object and 'rank_meta' a list",
    )
    for fname, digest in files.items():
        _check_file_name(fname)
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ValueError(f"{where}: file {fname!r} has no valid sha256 (got {digest!r})")
    for name, t in tensors.items():
        _require(isinstance(t, dict), f"{where}: entry of tensor {name!r} is not an object")
        gshape, axis, dtype, shards = (
            t.get("global_shape"),
            t.get("split_axis"),
            t.get("dtype"),
            t.get("shards"),
        )
        if not isinstance(gshape, list) or not all(_is_int(g) and g >= 0 for g in gshape):
            raise ValueError(f"{where}: tensor {name!r} has invalid global_shape {gshape!r}")
        if axis is not None and not (_is_int(axis) and 0 <= axis < len(gshape)):
            raise ValueError(
                f"{where}: tensor {name!r} has invalid split_axis {axis!r} for shape {gshape}"
            )
        if dtype not in _DTYPES:
            raise ValueError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
            raise ValueError(f"{where}: tensor {name!r} has invalid shards {shards!r}")
        for s in shards:
            if _check_file_name(s.get("file")) not in files:
                raise ValueError(
                    f"{where}: tensor {name!r} is in file {s.get('file')!r}, absent from 'files'"
                )
        if any("elements" in s for s in shards):
            _check_pieces(where, name, t, index.get("version"))
            continue
        if axis is None:
            if len(shards) != 1:
                raise ValueError(
                    f"{where}: replicated tensor {name!r} must have one shard, has {len(shards)}"
                )
            continue
        if not all(_is_int(s.get("start")) and _is_int(s.get("stop")) for s in shards):
            raise ValueError(f"{where}: tensor {name!r} has a shard without integer start/stop")
        shards.sort(key=lambda s: s["start"])
        pos = 0
        for s in shards:
            if s["start"] != pos or s["stop"] <= s["start"]:
                raise ValueError(
                    f"{where}: shards of tensor {name!r} do not cover rows [0, {gshape[axis]}) "
                    f"once: {s['file']} holds [{s['start']}, {s['stop']}) after row {pos}"
                )
            pos = s["stop"]
        if pos != gshape[axis]:
            raise ValueError(
                f"{where}: shards of tensor {name!r} cover rows [0, {pos}) of {gshape[axis]}"
            )
    return index


def _check_pieces(where: Path, name: str, t: dict, version: Any) -> None:
    """A tensor stored in pieces (layout.py): slabs that tile the split axis, each slab's
    pieces tiling its elements [0, outer * rows * inner); sorts the shards by (start, lo)."""
    shards, gshape, axis = t["shards"], t["global_shape"], t["split_axis"]
    _require(version != 1, f"{where}: tensor {name!r} has pieces, which format version 1 does not have")
    _require(all("elements" in s for s in shards), f"{where}: tensor {name!r} mixes pieces and plain slabs")
    for s in shards:
        e = s["elements"]
        _require(isinstance(e, list) and len(e) == 2 and all(_is_int(x) for x in e) and 0 <= e[0] < e[1],
                 f"{where}: tensor {name!r} has a piece with invalid elements {e!r}")
        if axis is None:
            _require(s.get("start") is None and s.get("stop") is None and s.get("rows") is None,
                     f"{where}: replicated tensor {name!r} has a piece with rows")
        else:
            start, rows = s.get("start"), s.get("rows")
            _require(_is_int(start) and start >= 0 and _is_int(rows) and rows > 0
                     and s.get("stop") == min(start + rows, gshape[axis]) and start < gshape[axis],
                     f"{where}: tensor {name!r} has a piece of invalid rows {[start, s.get('stop'), rows]}")
    shards.sort(key=lambda s: (s.get("start") or 0, s["elements"][0]))
    slabs: dict[tuple, list[list[int]]] = {}
    for s in shards:
        slabs.setdefault((s.get("start") or 0, s.get("stop"), s.get("rows")), []).append(s["elements"])
    pos = 0
    for (start, stop, rows), ranges in slabs.items():
        if axis is not None:
            _require(start == pos, f"{where}: slabs of tensor {name!r} do not cover rows [0, {gshape[axis]}) "
                     f"once: a slab starts at row {start} after row {pos}")
            pos = stop
        outer, n, inner = slab_rows_view(tuple(gshape), axis, rows)
        end = 0
        for lo, hi in ranges:
            _require(lo == end, f"{where}: pieces of tensor {name!r} (slab at row {start}) do not cover its "
                     f"elements once: [{lo}, {hi}) after element {end}")
            end = hi
        _require(end == outer * n * inner, f"{where}: pieces of tensor {name!r} (slab at row {start}) cover "
                 f"elements [0, {end}) of {outer * n * inner}")
    _require(axis is None or pos == gshape[axis],
             f"{where}: slabs of tensor {name!r} cover rows [0, {pos}) of {gshape[axis] if axis is not None else 0}")
