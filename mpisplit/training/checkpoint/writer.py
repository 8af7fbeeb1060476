"""Writing a checkpoint: every TP rank of DP replica 0 of every pipeline stage writes its own
slabs in parallel (a stage saves the parameters it owns, by their global names), and every DP
rank writes its own pieces (the parts of a sharded optimizer's state); world rank 0 writes the
index last and renames the folder into place (see layout.py for the layout and the atomicity
guarantees).

Errors are collective: a problem on any rank raises on all of them before any data moves.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mpisplit.runtime.files import exchange, fsync_dir, fsync_file, sha256_file, write_text_atomic
from mpisplit.training.checkpoint.index import _validate_index
from mpisplit.training.checkpoint.layout import (
    _DTYPES,
    _STEP_DIR,
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    LATEST_NAME,
    ShardInfo,
    _agree,
    _mpi,
    _shard_file_name,
    _step_dir_name,
    slab_rows_view,
)

__all__ = ["LATEST_NAME", "ShardInfo", "save_checkpoint"]


def _write_safetensors(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """Write, fsync and return the sha256 of the bytes that reached the file."""
    from safetensors.numpy import save_file

    save_file(arrays, str(path), metadata=metadata)
    fsync_file(path)
    return sha256_file(path)


def _check_shard(name: Any, info: Any) -> tuple[tuple[int, ...], int | None, str, int, int, tuple | None]:
    """Validate one entry; return (global_shape, split_axis, dtype, lo, hi, piece), where
    [lo, hi) are the logical rows the slab holds along split_axis (hi <= lo: none) and piece is
    None or (first element, end element, slab rows) of a piece."""
    if not isinstance(name, str) or not name or name == "__metadata__":
        raise ValueError(
            f"tensor name must be a non-empty string other than '__metadata__', got {name!r}"
        )
    if not isinstance(info, ShardInfo):
        raise TypeError(f"tensor {name!r}: expected ShardInfo, got {type(info).__name__}")
    arr = info.array
    if not isinstance(arr, np.ndarray):
        raise TypeError(
            f"tensor {name!r}: array must be a numpy.ndarray, got {type(arr).__module__}."
            f"{type(arr).__name__} (convert with mpisplit.to_numpy)"
        )
    if arr.dtype.name not in _DTYPES:
        raise TypeError(f"tensor {name!r}: dtype {arr.dtype} is not one of {sorted(_DTYPES)}")
    try:
        gshape = tuple(int(g) for g in info.global_shape)
    except TypeError:
        raise TypeError(
            f"tensor {name!r}: global_shape must be a tuple of ints, got {info.global_shape!r}"
        ) from None
    if info.elements is not None:
        return _check_piece(name, info, gshape)
    if any(g < 0 for g in gshape) or len(gshape) != arr.ndim:
        raise ValueError(
            f"tensor {name!r}: global_shape {gshape} does not fit a slab of shape {arr.shape}"
        )
    axis = info.split_axis
    if axis is None:
        if arr.shape != gshape:
            raise ValueError(
                f"tensor {name!r}: replicated slab shape {arr.shape} != global_shape {gshape}"
            )
        return gshape, None, arr.dtype.name, 0, 0, None
    axis = _check_axis(name, axis, gshape)
    other = tuple(s for i, s in enumerate(arr.shape) if i != axis)
    if other != tuple(g for i, g in enumerate(gshape) if i != axis):
        raise ValueError(
            f"tensor {name!r}: slab shape {arr.shape} differs from global_shape {gshape} "
            f"outside split_axis {axis}"
        )
    start = _check_count(name, "start", info.start)
    return gshape, axis, arr.dtype.name, start, min(start + arr.shape[axis], gshape[axis]), None


def _check_axis(name: str, axis: Any, gshape: tuple[int, ...]) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not 0 <= axis < len(gshape):
        raise ValueError(f"tensor {name!r}: split_axis {axis!r} is not an axis of shape {gshape}")
    return int(axis)


def _check_count(name: str, what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"tensor {name!r}: {what} must be an int >= 0, got {value!r}")
    return int(value)


def _check_piece(name: str, info: ShardInfo, gshape: tuple[int, ...]) -> tuple:
    """A piece: a 1-D array of elements [lo, hi) of its slab's flattening (layout.py)."""
    if any(g < 0 for g in gshape):
        raise ValueError(f"tensor {name!r}: global_shape {gshape} has a negative extent")
    try:
        # elements None: nothing to unpack, the same ValueError as any other malformed bounds.
        lo, hi = (_check_count(name, "a piece's element bound", e) for e in info.elements or ())
    except (TypeError, ValueError):
        raise ValueError(f"tensor {name!r}: elements must be two ints 0 <= lo <= hi, got {info.elements!r}") from None
    axis, start, stop = info.split_axis, 0, 0
    rows: int | None = None
    if axis is not None:
        axis = _check_axis(name, axis, gshape)
        start = _check_count(name, "start", info.start)
        rows = _check_count(name, "rows", info.rows)
        stop = min(start + rows, gshape[axis])
    outer, n, inner = slab_rows_view(gshape, axis, rows)
    if info.array.ndim != 1 or info.array.size != hi - lo or not lo <= hi <= outer * n * inner:
        raise ValueError(
            f"tensor {name!r}: a piece of elements [{lo}, {hi}) of a slab of {outer * n * inner} "
            f"needs a 1-D array of {hi - lo}, got shape {info.array.shape}"
        )
    return gshape, axis, info.array.dtype.name, start, stop, (lo, hi, rows)


def _check_tiling(name: str, length: int, ranges: list[tuple[int, int, int]]) -> None:
    """ranges: (lo, hi, tp_rank) of the non-empty slabs; they must cover [0, length) once."""
    pos = 0
    for lo, hi, r in sorted(ranges):
        if lo < pos:
            raise ValueError(
                f"tensor {name!r}: TP rank {r}'s rows [{lo}, {hi}) overlap rows below {pos}"
            )
        if lo > pos:
            raise ValueError(
                f"tensor {name!r}: rows [{pos}, {lo}) of {length} are held by no TP rank"
            )
        pos = hi
    if pos != length:
        raise ValueError(
            f"tensor {name!r}: rows [{pos}, {length}) of {length} are held by no TP rank"
        )


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    tensors: dict[str, ShardInfo],
    *,
    grid: Any,
    meta: dict,
    rank_meta: dict | None = None,
    keep_last: int = 3,
) -> Path:
    """Save every rank's slabs as `root/step-{step:08d}/`; collective over grid.world.

    Each TP rank of DP replica 0 writes its own split slabs (logical rows only) to
    `tp{r:02d}-of-{tp:02d}.safetensors`; TP rank 0 also writes the replicated
    tensors. Pieces (ShardInfo.elements) are written by every DP rank that holds
    elements of them, DP rank d > 0 into `dp{d:02d}-of-{dp:02d}-tp...`; the pieces of a
    replicated tensor by the ranks of TP rank 0. World rank 0 writes `index.json` (schema, shard map, sha256 of each
    file, `meta`, and the list of every rank's `rank_meta`), renames the folder into
    place atomically (replacing an existing save of the same step), points
    `root/latest` at it, then deletes stale temporary folders and all step folders
    except this one and the `keep_last - 1` highest other steps.

    `meta` and `rank_meta` must be JSON-serialisable. All ranks must pass the same
    tensor names, global shapes, split axes, dtypes and kinds (slab or piece); the slabs of
    a TP group must tile every split axis, and the pieces of each slab its elements (checked
    on the index before it is written). `root` must be on a filesystem all ranks share.
    Returns the folder's path on every rank.
    """
    world, tp_comm, dp_comm = _mpi(grid.world), _mpi(grid.tp_comm), _mpi(grid.dp_comm)
    # Without pipeline stages the whole world is one stage.
    stage_comm, pp_comm = _mpi(getattr(grid, "stage_comm", grid.world)), getattr(grid, "pp_comm", None)
    pp_comm = _mpi(pp_comm) if pp_comm is not None else None
    root = Path(root)
    with _agree(world):  # 1. local validation, identical on every rank, before any data collective
        step, checked = _check_arguments(step, tensors, meta, rank_meta, keep_last, world, tp_comm, dp_comm, pp_comm)
    schema = {name: [list(g), axis, dt, piece is not None] for name, (g, axis, dt, _, _, piece) in checked.items()}
    _check_across_ranks(schema, checked, world, tp_comm, dp_comm, stage_comm)  # 2.
    _check_across_stages(schema, world, pp_comm)
    tmp_name = None
    with _agree(world):  # 3. world rank 0 creates the temporary folder next to the final one
        if world.Get_rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            tmp_name = f".tmp-{_step_dir_name(step)}-{secrets.token_hex(6)}"
            (root / tmp_name).mkdir()
    tmp_name = world.bcast(tmp_name, root=0)
    tmp, final = root / tmp_name, root / _step_dir_name(step)
    try:
        record = None
        with _agree(world):  # 4. writers (DP replica 0; every DP rank for pieces) in parallel
            record = _write_slabs(tmp, tensors, checked, tp_comm, dp_comm, pp_comm)
        gathered = world.gather((record, schema, rank_meta), root=0)
        with _agree(world):  # 5. world rank 0: index, rename into place, `latest`, clean-up
            if world.Get_rank() == 0:
                index = _index(gathered, step, tp_comm.Get_size(), dp_comm.Get_size(), meta)
                _validate_index(tmp, json.loads(json.dumps(index)))  # what a reader will check
                _write_index(tmp, index)
                _commit(root, tmp, final)
                _cleanup(root, final, keep_last)
    except BaseException:
        if world.Get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _check_arguments(
    step: Any, tensors: Any, meta: Any, rank_meta: Any, keep_last: Any, world: Any, tp_comm: Any, dp_comm: Any,
    pp_comm: Any = None,
) -> tuple[int, dict[str, tuple]]:
    """The arguments of save_checkpoint checked locally; (step, {name: _check_shard(...)})."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
    tp, pp = tp_comm.Get_size(), 1 if pp_comm is None else pp_comm.Get_size()
    if tp * dp_comm.Get_size() * pp != world.Get_size():
        raise ValueError(f"grid: tp {tp} x dp {dp_comm.Get_size()} x pp {pp} != world size {world.Get_size()}")
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict of ShardInfo, got {type(tensors).__name__}")
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    if rank_meta is not None and not isinstance(rank_meta, dict):
        raise TypeError(f"rank_meta must be a dict or None, got {type(rank_meta).__name__}")
    for what, obj in (("meta", meta), ("rank_meta", rank_meta)):
        try:
            json.dumps(obj)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{what} is not JSON-serialisable: {exc}") from None
    return int(step), {name: _check_shard(name, info) for name, info in tensors.items()}


def _check_across_stages(schema: dict, world: Any, pp_comm: Any) -> None:
    """No tensor saved by two pipeline stages (each stage saves what it owns)."""
    if pp_comm is None or pp_comm.Get_size() == 1:
        return
    stages = pp_comm.allgather(sorted(schema))
    with _agree(world):
        owner: dict[str, int] = {}
        for stage, names in enumerate(stages):
            for name in names:
                if name in owner:
                    raise ValueError(f"tensor {name!r} is saved by pipeline stages {owner[name]} and {stage}")
                owner[name] = stage


def _check_across_ranks(
    schema: dict, checked: dict, world: Any, tp_comm: Any, dp_comm: Any, stage_comm: Any = None,
) -> None:
    """Same schema on every rank of a pipeline stage (`stage_comm`; default: the world), same
    slabs across DP replicas, and each TP group's slabs tile every split axis exactly once."""
    # plain split slabs: the same on every DP replica, tiling each axis over TP (pieces: checked
    # in the index, where every DP rank's ranges meet)
    bounds = {name: (lo, hi) for name, (_, axis, _, lo, hi, piece) in checked.items()
              if axis is not None and piece is None}
    schema0 = (world if stage_comm is None else stage_comm).bcast(schema, root=0)
    bounds_dp0 = dp_comm.bcast(bounds, root=0)
    bounds_tp = tp_comm.gather(bounds, root=0)
    with _agree(world):
        if schema != schema0:
            diff = sorted(set(schema) ^ set(schema0)) or [n for n in schema if schema[n] != schema0[n]]
            raise ValueError(
                f"tensor {diff[0]!r}: names, global shapes, split axes or dtypes differ "
                f"from world rank 0's (here {schema.get(diff[0])}, rank 0 {schema0.get(diff[0])})"
            )
        if bounds != bounds_dp0:
            name = next(n for n in bounds if bounds[n] != bounds_dp0[n])
            raise ValueError(
                f"tensor {name!r}: DP replica {dp_comm.Get_rank()} holds rows {bounds[name]}, "
                f"DP replica 0 holds {bounds_dp0[name]}"
            )
        if tp_comm.Get_rank() == 0:
            for name, (gshape, axis, _, pieces) in schema.items():
                if axis is not None and not pieces:
                    ranges = [(*b[name], r) for r, b in enumerate(bounds_tp) if b[name][1] > b[name][0]]
                    _check_tiling(name, gshape[axis], ranges)


def _write_slabs(
    tmp: Path, tensors: dict[str, ShardInfo], checked: dict, tp_comm: Any, dp_comm: Any, pp_comm: Any = None,
) -> tuple | None:
    """This rank's file: on DP replica 0 its split slabs (logical rows only; TP rank 0 also the
    replicated tensors), on every DP rank its pieces (of replicated tensors: TP rank 0's).
    Returns (dp_rank, tp_rank, file name, sha256, {name: shard entry without the file}), or
    None for a DP rank > 0 without pieces (it writes no file)."""
    if not tmp.is_dir():
        raise FileNotFoundError(
            f"{tmp} created by world rank 0 is not visible here; the checkpoint root must be on a shared filesystem"
        )
    tp_rank, dp_rank = tp_comm.Get_rank(), dp_comm.Get_rank()
    arrays: dict[str, np.ndarray] = {}
    shards: dict[str, dict[str, Any]] = {}
    for name, info in tensors.items():
        _, axis, _, lo, hi, piece = checked[name]
        if piece is not None:
            first, end, rows = piece
            if end > first and (hi > lo if axis is not None else tp_rank == 0):
                arrays[name] = info.array
                shards[name] = {"start": lo, "stop": hi, "rows": rows} if axis is not None else {
                    "start": None, "stop": None}
                shards[name]["elements"] = [first, end]
        elif dp_rank > 0:
            continue
        elif axis is None:
            if tp_rank == 0:
                arrays[name], shards[name] = info.array, {"start": None, "stop": None}
        elif hi > lo:
            rows = [slice(None)] * info.array.ndim
            rows[axis] = slice(0, hi - lo)  # drop the padding rows >= G
            arrays[name], shards[name] = info.array[tuple(rows)], {"start": lo, "stop": hi}
    if dp_rank > 0 and not arrays:
        return None
    # safetensors stores little-endian, C-contiguous data.
    arrays = {n: np.require(a, a.dtype.newbyteorder("<"), "C") for n, a in arrays.items()}  # keeps 0-d arrays 0-d
    pp_rank, pp = (0, 1) if pp_comm is None else (pp_comm.Get_rank(), pp_comm.Get_size())
    fname = _shard_file_name(tp_rank, tp_comm.Get_size(), pp_rank, pp, dp_rank, dp_comm.Get_size())
    # One metadata key: safetensors orders several keys arbitrarily, and the same state must
    # give the same bytes (and checksum) every time.
    digest = _write_safetensors(tmp / fname, arrays, {"format": FORMAT})
    return dp_rank, tp_rank, fname, digest, shards


def _index(gathered: list, step: int, tp: int, dp: int, meta: dict) -> dict:
    """The index.json content from every rank's (record, schema, rank_meta); version 1 unless
    some tensor is stored in pieces."""
    records = sorted((rec for rec, _, _ in gathered if rec is not None), key=lambda r: r[:3])
    schema = {}
    for _, stage_schema, _ in gathered:  # the union of the stages' tensors
        schema.update(stage_schema)
    index_tensors = {}
    for name, (gshape, axis, dt, pieces) in schema.items():
        shards = [{"file": f, **sh[name]} for _, _, f, _, sh in records if name in sh]
        if axis is None and not pieces:  # the file of TP rank 0 of the stage that holds it
            shards = shards[:1]
        index_tensors[name] = {"global_shape": gshape, "split_axis": axis, "dtype": dt, "shards": shards}
    pp = len(gathered) // (tp * dp)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION if any(pieces for *_, pieces in schema.values()) else 1,
        "step": step,
        "tp": tp,
        "dp": dp,
        "pp": pp,
        "tensors": index_tensors,
        "files": {f: digest for _, _, f, digest, _ in records},
        "meta": meta,
        "rank_meta": [rm for _, _, rm in gathered],
    }


def _write_index(tmp: Path, index: dict) -> None:
    with open(tmp / INDEX_NAME, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)


def _commit(root: Path, tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`, then point `latest` at it."""
    if final.exists():
        # Re-saving a step: swap atomically where the filesystem can; otherwise the
        # previous copy sits in `.old-step-...` between the two renames, where
        # latest_checkpoint() finds it after a crash.
        if not exchange(tmp, final):
            old = root / f".old-{final.name}-{secrets.token_hex(6)}"
            os.replace(final, old)
            os.replace(tmp, final)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    write_text_atomic(root / LATEST_NAME, final.name + "\n", f".tmp-latest-{secrets.token_hex(6)}")
    fsync_dir(root)


def _cleanup(root: Path, final: Path, keep_last: int) -> None:
    """Delete temporaries and all step folders but `final` and the keep_last - 1 highest others."""
    steps = []
    for entry in os.scandir(root):
        if entry.name.startswith((".tmp-", ".old-")):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        elif (
            (m := _STEP_DIR.match(entry.name))
            and entry.is_dir(follow_symlinks=False)
            and entry.name != final.name
        ):
            steps.append((int(m.group(1)), entry.path))
    for _, path in sorted(steps, reverse=True)[keep_last - 1 :]:
        shutil.rmtree(path)
    fsync_dir(root)
