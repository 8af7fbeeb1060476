"""Sharded, atomic safetensors checkpoints that load at any tensor-parallel degree.

A tensor of logical global shape G is split along `split_axis` (None = replicated)
over the TP ranks; a rank's slab covers global rows [start, start + len) of that
axis in the padded layout the model uses. A checkpoint stores only logical rows:

    root/
      latest                           "step-00000200\\n"
      step-00000200/
        index.json                     schema, shard map, sha256 per file, meta
        tp00-of-04.safetensors         slabs of TP rank 0 (+ every replicated tensor)
        tp01-of-04.safetensors         ...

Every TP rank of DP replica 0 writes its own file in parallel; nothing is gathered
on one rank. Reading at another TP degree takes exactly the rows a rank needs from
whichever files overlap them (safetensors slices are lazy), and zero-fills rows
past the logical length (the padding of the new layout).

Atomicity: files go to a temporary sibling folder `root/.tmp-step-...`, are fsynced,
the index is written last, the folder is renamed into place, then `latest` is
replaced. A crash at any moment leaves `latest` naming a complete checkpoint. Re-saving
an existing step swaps the folders atomically (Linux renameat2); where the filesystem
cannot, the previous copy waits in `root/.old-step-...` between two renames, and
`latest_checkpoint` finds it there after a crash.

Errors are collective: every function that takes a communicator raises on all its
ranks when any rank fails ("rank r: ..."), so one bad file never hangs a job.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpisplit.errors import agree

if TYPE_CHECKING:
    from typing_extensions import Self

FORMAT = "mpisplit-checkpoint"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
LATEST_NAME = "latest"

# numpy dtype name -> safetensors header dtype code; only these round-trip bitwise.
_DTYPES = {
    "bool": "BOOL",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
}
_STEP_DIR = re.compile(r"^step-(\d+)$")
_OLD_STEP_DIR = re.compile(r"^\.old-step-(\d+)-[0-9a-f]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 16 << 20


@dataclass
class ShardInfo:
    """One rank's slab of a tensor.

    `array` holds global indices [start, start + array.shape[split_axis]) along
    `split_axis` (the padded layout; rows >= global_shape[split_axis] are padding
    and are not saved). `global_shape` is the logical, unpadded shape. With
    `split_axis=None` the tensor is replicated and `array.shape == global_shape`.
    """

    array: np.ndarray
    global_shape: tuple[int, ...]
    split_axis: int | None = None
    start: int = 0


# --------------------------------------------------------------------------- errors


def _mpi(comm: Any) -> Any:
    """The mpi4py communicator behind a Communicator (or the mpi4py comm itself)."""
    return getattr(comm, "mpi", comm)


def _agree(comm: Any) -> contextlib.AbstractContextManager[None]:
    """errors.agree over comm (raise on every rank if any raised); comm=None: this process alone."""
    return contextlib.nullcontext() if comm is None else agree(comm)


# ------------------------------------------------------------------- file helpers


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Persist a directory's entries (renames, new files); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_safetensors(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """Write, fsync and return the sha256 of the bytes that reached the file."""
    from safetensors.numpy import save_file

    save_file(arrays, str(path), metadata=metadata)
    _fsync_file(path)
    return _sha256_file(path)


def _write_text_atomic(path: Path, text: str, tmp_name: str) -> None:
    tmp = path.parent / tmp_name
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing directory entries (Linux renameat2 RENAME_EXCHANGE).

    Returns False where the kernel, C library or filesystem cannot (e.g. NFS, macOS).
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _shard_file_name(tp_rank: int, tp: int) -> str:
    return f"tp{tp_rank:02d}-of-{tp:02d}.safetensors"


def _step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------- save


def _check_shard(name: Any, info: Any) -> tuple[tuple[int, ...], int | None, str, int, int]:
    """Validate one entry; return (global_shape, split_axis, dtype, lo, hi), where
    [lo, hi) are the logical rows the slab holds along split_axis (hi <= lo: none)."""
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
            f"{type(arr).__name__} (convert with mpisplit.backend.to_numpy)"
        )
    if arr.dtype.name not in _DTYPES:
        raise TypeError(f"tensor {name!r}: dtype {arr.dtype} is not one of {sorted(_DTYPES)}")
    try:
        gshape = tuple(int(g) for g in info.global_shape)
    except TypeError:
        raise TypeError(
            f"tensor {name!r}: global_shape must be a tuple of ints, got {info.global_shape!r}"
        ) from None
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
        return gshape, None, arr.dtype.name, 0, 0
    if (
        isinstance(axis, bool)
        or not isinstance(axis, (int, np.integer))
        or not 0 <= axis < arr.ndim
    ):
        raise ValueError(f"tensor {name!r}: split_axis {axis!r} is not an axis of shape {gshape}")
    axis = int(axis)
    other = tuple(s for i, s in enumerate(arr.shape) if i != axis)
    if other != tuple(g for i, g in enumerate(gshape) if i != axis):
        raise ValueError(
            f"tensor {name!r}: slab shape {arr.shape} differs from global_shape {gshape} "
            f"outside split_axis {axis}"
        )
    start = info.start
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"tensor {name!r}: start must be an int >= 0, got {start!r}")
    start = int(start)
    return gshape, axis, arr.dtype.name, start, min(start + arr.shape[axis], gshape[axis])


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
    tensors. World rank 0 writes `index.json` (schema, shard map, sha256 of each
    file, `meta`, and the list of every rank's `rank_meta`), renames the folder into
    place atomically (replacing an existing save of the same step), points
    `root/latest` at it, then deletes stale temporary folders and all step folders
    except this one and the `keep_last - 1` highest other steps.

    `meta` and `rank_meta` must be JSON-serialisable. All ranks must pass the same
    tensor names, global shapes, split axes and dtypes; the slabs of a TP group must
    tile every split axis. `root` must be on a filesystem all ranks share.
    Returns the folder's path on every rank.
    """
    world, tp_comm, dp_comm = _mpi(grid.world), _mpi(grid.tp_comm), _mpi(grid.dp_comm)
    tp, tp_rank, dp_rank = tp_comm.Get_size(), tp_comm.Get_rank(), dp_comm.Get_rank()
    root = Path(root)

    # 1. Local validation, identical on every rank, before any data collective.
    with _agree(world):
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        if tp * dp_comm.Get_size() != world.Get_size():
            raise ValueError(
                f"grid: tp {tp} x dp {dp_comm.Get_size()} != world size {world.Get_size()}"
            )
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
        step = int(step)
        checked = {name: _check_shard(name, info) for name, info in tensors.items()}
        schema = {name: [list(g), axis, dt] for name, (g, axis, dt, _, _) in checked.items()}
        bounds = {
            name: (lo, hi) for name, (_, axis, _, lo, hi) in checked.items() if axis is not None
        }

    # 2. Cross-rank consistency: same schema everywhere, same slabs across DP
    #    replicas, and each TP group's slabs tile every split axis exactly once.
    schema0 = world.bcast(schema, root=0)
    bounds_dp0 = dp_comm.bcast(bounds, root=0)
    bounds_tp = tp_comm.gather(bounds, root=0)
    with _agree(world):
        if schema != schema0:
            diff = sorted(set(schema) ^ set(schema0)) or [
                n for n in schema if schema[n] != schema0[n]
            ]
            raise ValueError(
                f"tensor {diff[0]!r}: names, global shapes, split axes or dtypes differ "
                f"from world rank 0's (here {schema.get(diff[0])}, rank 0 {schema0.get(diff[0])})"
            )
        if bounds != bounds_dp0:
            name = next(n for n in bounds if bounds[n] != bounds_dp0[n])
            raise ValueError(
                f"tensor {name!r}: DP replica {dp_rank} holds rows {bounds[name]}, "
                f"DP replica 0 holds {bounds_dp0[name]}"
            )
        if tp_rank == 0:
            for name, (gshape, axis, _) in schema.items():
                if axis is not None:
                    ranges = [
                        (*b[name], r) for r, b in enumerate(bounds_tp) if b[name][1] > b[name][0]
                    ]
                    _check_tiling(name, gshape[axis], ranges)

    # 3. World rank 0 creates the temporary folder next to the final one.
    tmp_name = None
    with _agree(world):
        if world.Get_rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            tmp_name = f".tmp-{_step_dir_name(step)}-{secrets.token_hex(6)}"
            (root / tmp_name).mkdir()
    tmp_name = world.bcast(tmp_name, root=0)
    tmp, final = root / tmp_name, root / _step_dir_name(step)

    # 4. Writers (DP replica 0) write their own slabs in parallel.
    record = None
    try:
        with _agree(world):
            if dp_rank == 0:
                if not tmp.is_dir():
                    raise FileNotFoundError(
                        f"{tmp} created by world rank 0 is not visible here; "
                        f"the checkpoint root must be on a shared filesystem"
                    )
                arrays, shards = {}, {}
                for name, info in tensors.items():
                    gshape, axis, _, lo, hi = checked[name]
                    if axis is None:
                        if tp_rank == 0:
                            arrays[name], shards[name] = info.array, None
                    elif hi > lo:
                        rows = [slice(None)] * info.array.ndim
                        rows[axis] = slice(0, hi - lo)  # drop the padding rows >= G
                        arrays[name], shards[name] = info.array[tuple(rows)], (lo, hi)
                # safetensors stores little-endian, C-contiguous data.
                arrays = {
                    n: np.require(a, a.dtype.newbyteorder("<"), "C")  # keeps 0-d arrays 0-d
                    for n, a in arrays.items()
                }
                fname = _shard_file_name(tp_rank, tp)
                # One metadata key: safetensors orders several keys arbitrarily, and the
                # same state must give the same bytes (and checksum) every time.
                digest = _write_safetensors(tmp / fname, arrays, {"format": FORMAT})
                record = (tp_rank, fname, digest, shards)
        gathered = world.gather((record, rank_meta), root=0)

        # 5. World rank 0: index, rename into place, `latest`, clean-up.
        with _agree(world):
            if world.Get_rank() == 0:
                records = sorted(rec for rec, _ in gathered if rec is not None)
                index_tensors = {}
                for name, (gshape, axis, dt) in schema.items():
                    shards = [
                        {"file": f, "start": sh[name][0], "stop": sh[name][1]}
                        for _, f, _, sh in records
                        if name in sh and sh[name] is not None
                    ]
                    if axis is None:
                        shards = [{"file": records[0][1], "start": None, "stop": None}]
                    index_tensors[name] = {
                        "global_shape": gshape,
                        "split_axis": axis,
                        "dtype": dt,
                        "shards": shards,
                    }
                index = {
                    "format": FORMAT,
                    "version": FORMAT_VERSION,
                    "step": step,
                    "tp": tp,
                    "dp": world.Get_size() // tp,
                    "tensors": index_tensors,
                    "files": {f: digest for _, f, digest, _ in records},
                    "meta": meta,
                    "rank_meta": [rm for _, rm in gathered],
                }
                with open(tmp / INDEX_NAME, "w", encoding="utf-8") as f:
                    json.dump(index, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                _fsync_dir(tmp)
                _commit(root, tmp, final)
                _cleanup(root, final, keep_last)
    except BaseException:
        if world.Get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _commit(root: Path, tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`, then point `latest` at it."""
    if final.exists():
        # Re-saving a step: swap atomically where the filesystem can; otherwise the
        # previous copy sits in `.old-step-...` between the two renames, where
        # latest_checkpoint() finds it after a crash.
        if not _exchange(tmp, final):
            old = root / f".old-{final.name}-{secrets.token_hex(6)}"
            os.replace(final, old)
            os.replace(tmp, final)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    _write_text_atomic(root / LATEST_NAME, final.name + "\n", f".tmp-latest-{secrets.token_hex(6)}")
    _fsync_dir(root)


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
    _fsync_dir(root)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint folder `root/latest` names, or None if there is none.

    If `latest` is missing or names an incomplete folder (a crash during a first
    save, or between the two renames of a re-save on a filesystem without atomic
    swap), falls back to the highest-step complete folder. Never modifies the disk.
    """
    root = Path(root)
    try:
        name = (root / LATEST_NAME).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        name = ""
    if _STEP_DIR.match(name) and (root / name / INDEX_NAME).is_file():
        return root / name
    best: tuple[int, int, Path] | None = None
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return None
    for entry in entries:
        m = _STEP_DIR.match(entry.name) or _OLD_STEP_DIR.match(entry.name)
        if m and os.path.isfile(os.path.join(entry.path, INDEX_NAME)):
            key = (int(m.group(1)), int(entry.name.startswith("step-")), Path(entry.path))
            best = key if best is None or key[:2] > best[:2] else best
    return None if best is None else best[2]


# ---------------------------------------------------------------------------- load


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
    if index.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{where}: format version {index.get('version')!r}, this reader knows {FORMAT_VERSION}"
        )
    for key in ("step", "tp", "dp"):
        if not _is_int(index.get(key)) or index[key] < 0:
            raise ValueError(f"{where}: {key} must be an int >= 0, got {index.get(key)!r}")
    files, tensors = index.get("files"), index.get("tensors")
    _require(
        isinstance(files, dict) and isinstance(tensors, dict),
        f"{where}: 'files' and 'tensors' must be objects",
    )
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


def _shard_box(t: dict, shard: dict) -> list[tuple[int, int]]:
    """Global [lo, hi) per axis of the block a shard file holds."""
    box = [(0, g) for g in t["global_shape"]]
    if t["split_axis"] is not None:
        box[t["split_axis"]] = (shard["start"], shard["stop"])
    return box


def _check_files(path: Path, index: dict) -> None:
    """Every file is a regular file whose safetensors header lists the expected tensors."""
    from safetensors import safe_open

    expected: dict[str, dict[str, tuple[str, list[int]]]] = {f: {} for f in index["files"]}
    for name, t in index["tensors"].items():
        for s in t["shards"]:
            shape = [hi - lo for lo, hi in _shard_box(t, s)]
            expected[s["file"]][name] = (_DTYPES[t["dtype"]], shape)
    for fname, want in expected.items():
        fpath = path / fname
        try:
            mode = os.lstat(fpath).st_mode
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint file {fpath} is missing") from None
        if not stat.S_ISREG(mode):
            raise ValueError(f"checkpoint file {fpath} is not a regular file")
        try:
            with safe_open(str(fpath), framework="numpy") as f:
                keys = set(f.keys())
                for name, (code, shape) in want.items():
                    if name not in keys:
                        raise ValueError(f"checkpoint file {fpath} lacks tensor {name!r}")
                    sl = f.get_slice(name)
                    if sl.get_dtype() != code or list(sl.get_shape()) != shape:
                        raise ValueError(
                            f"checkpoint file {fpath}: tensor {name!r} is {sl.get_dtype()} "
                            f"{list(sl.get_shape())}, index says {code} {shape}"
                        )
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            raise ValueError(f"checkpoint file {fpath} is corrupt or truncated: {exc}") from None


class CheckpointReader:
    """Read a checkpoint folder written by `save_checkpoint`, at any TP layout.

    Opening validates the index (format version, well-formed JSON, every file a
    plain name inside the folder, files present with the listed tensors, shards
    covering each tensor exactly once, known dtypes). `read`, `verify` and the
    constructor are collective over `comm` (a Communicator or mpi4py comm; None:
    this process alone): every rank calls them in the same order, and a problem on
    any rank raises ValueError / FileNotFoundError on all. Never writes to disk.
    """

    def __init__(self, path: str | os.PathLike, comm: Any = None) -> None:
        self.path = Path(path)
        self._comm = comm
        self._handles: dict[str, Any] = {}
        index = None
        # World rank 0 reads and validates; the others receive the parsed index.
        with _agree(comm):
            if comm is None or _mpi(comm).Get_rank() == 0:
                index = self._load_index()
        if comm is not None:
            index = _mpi(comm).bcast(index, root=0)
        self._index = index
        self._tensors: dict[str, dict] = index["tensors"]

    def _load_index(self) -> dict:
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {self.path} does not exist")
        where = self.path / INDEX_NAME
        try:
            text = where.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{where} is missing: {self.path} is not a complete checkpoint"
            ) from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{where} is not UTF-8 text: {exc}") from None
        try:
            index = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON: {exc}") from None
        index = _validate_index(self.path, index)
        _check_files(self.path, index)
        return index

    # ---- metadata (local, no communication)

    @property
    def meta(self) -> dict:
        """The `meta` dict given to save_checkpoint."""
        return self._index["meta"]

    @property
    def step(self) -> int:
        return self._index["step"]

    @property
    def tp(self) -> int:
        """TP degree the checkpoint was saved at."""
        return self._index["tp"]

    @property
    def dp(self) -> int:
        return self._index["dp"]

    def rank_meta(self, world_rank: int) -> dict | None:
        """The `rank_meta` that world rank `world_rank` of the saving job passed."""
        rm = self._index["rank_meta"]
        if not _is_int(world_rank) or not 0 <= world_rank < len(rm):
            raise ValueError(
                f"world_rank {world_rank!r} is not in [0, {len(rm)}) (ranks of the saving job)"
            )
        return rm[world_rank]

    def names(self) -> list[str]:
        return list(self._tensors)

    def _entry(self, name: str) -> dict:
        if name not in self._tensors:
            raise ValueError(f"tensor {name!r} is not in checkpoint {self.path}")
        return self._tensors[name]

    def global_shape(self, name: str) -> tuple[int, ...]:
        """Logical (unpadded) shape of tensor `name`."""
        return tuple(self._entry(name)["global_shape"])

    def split_axis(self, name: str) -> int | None:
        """Axis the tensor was split along when saved (None: replicated)."""
        return self._entry(name)["split_axis"]

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self._entry(name)["dtype"])

    # ---- data (collective)

    def read(
        self,
        name: str,
        split_axis: int | None = None,
        start: int | None = None,
        stop: int | None = None,
    ) -> np.ndarray:
        """Global rows [start, stop) of `name` along `split_axis` (whole tensor if None).

        Reads only the overlapping parts of the shard files; rows >= the logical
        length (padding of the caller's layout) are zeros. Collective over comm.
        """
        with _agree(self._comm):
            out = self._read(name, split_axis, start, stop, None)
        return out

    def _read(
        self,
        name: str,
        split_axis: int | None,
        start: int | None,
        stop: int | None,
        expect_shape: tuple[int, ...] | None,
    ) -> np.ndarray:
        t = self._entry(name)
        gshape = tuple(t["global_shape"])
        if expect_shape is not None and tuple(expect_shape) != gshape:
            raise ValueError(
                f"tensor {name!r}: checkpoint global shape {gshape} != expected "
                f"{tuple(expect_shape)}"
            )
        if split_axis is None:
            if start is not None or stop is not None:
                raise ValueError(
                    f"tensor {name!r}: start/stop ({start}, {stop}) given without split_axis"
                )
            axis, start, stop = None, 0, 0
        else:
            if not _is_int(split_axis) or not 0 <= split_axis < len(gshape):
                raise ValueError(
                    f"tensor {name!r}: split_axis {split_axis!r} is not an axis of shape {gshape}"
                )
            axis = split_axis
            start = 0 if start is None else start
            stop = gshape[axis] if stop is None else stop
            if not (_is_int(start) and _is_int(stop)) or not 0 <= start <= stop:
                raise ValueError(f"tensor {name!r}: rows [{start}, {stop}) are not a valid range")
        dtype = np.dtype(t["dtype"])
        out_shape = list(gshape)
        if axis is not None:
            out_shape[axis] = stop - start
        out = np.zeros(out_shape, dtype=dtype)
        want = [(0, g) for g in gshape]
        if axis is not None:
            want[axis] = (min(start, gshape[axis]), min(stop, gshape[axis]))
        for shard in t["shards"]:
            box = _shard_box(t, shard)
            inter = [
                (max(w0, b0), min(w1, b1)) for (w0, w1), (b0, b1) in zip(want, box, strict=True)
            ]
            if any(hi <= lo for lo, hi in inter):
                continue  # no overlap (or an empty tensor): nothing to read
            src = tuple(
                slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(inter, box, strict=True)
            )
            off = [0] * len(gshape)
            if axis is not None:
                off[axis] = start
            dst = tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(inter, off, strict=True))
            out[dst] = self._slice(shard["file"], name, src)
        return out

    def _slice(self, fname: str, name: str, src: tuple[slice, ...]) -> np.ndarray:
        from safetensors import safe_open

        fpath = self.path / fname
        try:
            if fname not in self._handles:
                self._handles[fname] = safe_open(str(fpath), framework="numpy")
            handle = self._handles[fname]
            return handle.get_slice(name)[src] if src else handle.get_tensor(name)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint file {fpath} is missing") from None
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            raise ValueError(
                f"checkpoint file {fpath}: cannot read tensor {name!r}: {exc}"
            ) from None

    def verify(self, names: Iterable[str] | None = None) -> None:
        """Check the sha256 of the files holding `names` (all if None) against the index.

        The files are hashed in chunks, spread over the ranks of comm. Collective.
        """
        with _agree(self._comm):
            names = self.names() if names is None else list(names)
            files = sorted({s["file"] for n in names for s in self._entry(n)["shards"]})
            rank, size = (
                (0, 1)
                if self._comm is None
                else (_mpi(self._comm).Get_rank(), _mpi(self._comm).Get_size())
            )
            for fname in files[rank::size]:
                fpath = self.path / fname
                try:
                    digest = _sha256_file(fpath)
                except FileNotFoundError:
                    raise FileNotFoundError(f"checkpoint file {fpath} is missing") from None
                if digest != self._index["files"][fname]:
                    raise ValueError(
                        f"checkpoint file {fpath}: sha256 {digest} != index "
                        f"{self._index['files'][fname]}"
                    )

    def close(self) -> None:
        """Release the memory maps of the shard files (local)."""
        self._handles.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_shard(
    reader: CheckpointReader,
    name: str,
    *,
    global_shape: tuple[int, ...],
    split_axis: int | None,
    start: int | None,
    stop: int | None,
) -> np.ndarray:
    """A rank's slab of `name` for a model layout; collective over reader's comm.

    Raises ValueError naming both shapes if the checkpoint's logical global shape
    differs from `global_shape`; returns rows [start, stop) along `split_axis`
    (the whole tensor if split_axis is None), zero past the logical length.
    """
    with _agree(reader._comm):
        out = reader._read(name, split_axis, start, stop, tuple(global_shape))
    return out
