"""Reading a checkpoint at any TP layout: only the rows a rank needs (or, for a sharded optimizer,
only its range of elements), through lazy safetensors slices, from plain slabs and from pieces
alike; and finding the latest complete checkpoint of a run folder."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from typing_extensions import Self

from mpisplit.runtime.files import sha256_file
from mpisplit.training.checkpoint.index import _is_int, _validate_index
from mpisplit.training.checkpoint.layout import (
    _DTYPES,
    _OLD_STEP_DIR,
    _STEP_DIR,
    INDEX_NAME,
    LATEST_NAME,
    _agree,
    _mpi,
    slab_rows_view,
)


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
            if "elements" in s:  # a piece: a 1-D run of its slab's elements
                shape = [s["elements"][1] - s["elements"][0]]
            else:
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

    With `verify` (the default), a rank hashes each file before its first read from it and
    compares the sha256 with the index, so no rank uses a weight from a corrupted file: a
    mismatch raises ValueError naming the file and both digests, on every rank.
    """

    def __init__(self, path: str | os.PathLike, comm: Any = None, *, verify: bool = True) -> None:
        self.path = Path(path)
        self._comm = comm
        self._verify = verify
        self._handles: dict[str, Any] = {}
        # World rank 0 reads and validates; the others receive the parsed index. Every rank
        # ends with a dict: _load_index returns one or raises (then _agree raises everywhere).
        index: Any = None
        with _agree(comm):
            if comm is None or _mpi(comm).Get_rank() == 0:
                index = self._load_index()
        if comm is not None:
            index = _mpi(comm).bcast(index, root=0)
        self._index: dict[str, Any] = index
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

    @contextlib.contextmanager
    def within(self, comm: Any) -> Iterator[CheckpointReader]:
        """Inside the block, reads are collective over `comm` (a subgroup of the reader's ranks
        that read the same tensors, e.g. one pipeline stage) instead of the reader's comm."""
        saved, self._comm = self._comm, comm
        try:
            yield self
        finally:
            self._comm = saved

    @property
    def pp(self) -> int:
        """Pipeline stages of the saving job (1 for checkpoints written before stages existed)."""
        return int(self._index.get("pp", 1))

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
        t, axis, start, stop = self._request(name, split_axis, start, stop, expect_shape)
        gshape = tuple(t["global_shape"])
        if _has_pieces(t):
            k = _pieces_axis(name, t, axis)
            outer = slab_rows_view(gshape, k)[0]
            lo, hi = (start, stop) if axis is not None else (0, 1 if k is None else gshape[k])
            out_shape = list(gshape)
            if axis is not None:
                out_shape[axis] = stop - start
            return self._rows3(t, name, k, 0, outer, lo, hi).reshape(out_shape)
        box = [(0, g) for g in gshape]
        if axis is not None:
            box[axis] = (start, stop)
        return self._read_box(t, name, box)

    def _request(
        self, name: str, split_axis: int | None, start: int | None, stop: int | None,
        expect_shape: tuple[int, ...] | None,
    ) -> tuple[dict, int | None, int, int]:
        """The entry of `name` and the checked request (axis, start, stop)."""
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
            return t, None, 0, 0
        if not _is_int(split_axis) or not 0 <= split_axis < len(gshape):
            raise ValueError(
                f"tensor {name!r}: split_axis {split_axis!r} is not an axis of shape {gshape}"
            )
        start = 0 if start is None else start
        stop = gshape[split_axis] if stop is None else stop
        if not (_is_int(start) and _is_int(stop)) or not 0 <= start <= stop:
            raise ValueError(f"tensor {name!r}: rows [{start}, {stop}) are not a valid range")
        return t, split_axis, start, stop

    def _read_box(self, t: dict, name: str, box: list[tuple[int, int]]) -> np.ndarray:
        """Global indices box[d] = [lo, hi) of every axis d from plain slabs; zeros past the
        logical shape."""
        gshape = tuple(t["global_shape"])
        out = np.zeros([hi - lo for lo, hi in box], dtype=np.dtype(t["dtype"]))
        want = [(min(lo, g), min(hi, g)) for (lo, hi), g in zip(box, gshape, strict=True)]
        for shard in t["shards"]:
            held = _shard_box(t, shard)
            inter = [
                (max(w0, b0), min(w1, b1)) for (w0, w1), (b0, b1) in zip(want, held, strict=True)
            ]
            if any(hi <= lo for lo, hi in inter):
                continue  # no overlap (or an empty tensor): nothing to read
            src = tuple(
                slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(inter, held, strict=True)
            )
            dst = tuple(slice(lo - o, hi - o) for (lo, hi), (o, _) in zip(inter, box, strict=True))
            out[dst] = self._slice(shard["file"], name, src)
        return out

    def _rows3(self, t: dict, name: str, k: int | None, o0: int, o1: int, r0: int, r1: int) -> np.ndarray:
        """(o1 - o0, r1 - r0, inner): outer indices [o0, o1) and global rows [r0, r1) along axis k
        of the tensor seen as (outer, rows, inner) (slab_rows_view; k None: (1, 1, size)); zeros
        past the logical rows."""
        gshape = tuple(t["global_shape"])
        outer, _, inner = slab_rows_view(gshape, k)
        if _has_pieces(t):
            out = np.zeros((o1 - o0, r1 - r0, inner), dtype=np.dtype(t["dtype"]))
            for shard in t["shards"]:
                self._piece_rows(t, name, shard, k, o0, o1, r0, r1, out)
            return out
        if k is None:
            return self._read_box(t, name, [(0, g) for g in gshape]).reshape(1, 1, inner)
        # plain slabs: the box of whole leading indices that holds outer [o0, o1)
        per = outer // gshape[0] if k > 0 and gshape[0] else 1  # outer indices per index of axis 0
        box = [(0, g) for g in gshape]
        first = 0
        if k > 0:
            first = o0 // per
            box[0] = (first, -(-o1 // per))
        box[k] = (r0, r1)
        block = self._read_box(t, name, box).reshape(-1, r1 - r0, inner)
        return block[o0 - first * per: o1 - first * per]

    def _piece_rows(
        self, t: dict, name: str, shard: dict, k: int | None, o0: int, o1: int, r0: int, r1: int, out: np.ndarray,
    ) -> None:
        """Copy what piece `shard` holds of outer [o0, o1) x rows [r0, r1) into `out` (the
        (o1 - o0, r1 - r0, inner) block); reads at most the piece's own elements."""
        gshape = tuple(t["global_shape"])
        start = shard.get("start") or 0
        _, rows, inner = slab_rows_view(gshape, k, shard.get("rows"))
        real = rows if k is None else min(rows, gshape[k] - start)  # the slab's logical rows
        x0, x1 = max(r0, start), min(r1, start + real)
        lo, hi = shard["elements"]
        per = rows * inner  # elements per outer index in the slab
        oa, ob = max(o0, lo // per), min(o1, -(-hi // per))  # outer indices the piece meets
        if x1 <= x0 or ob <= oa:
            return
        a, b = (x0 - start) * inner, (x1 - start) * inner  # the wanted rows within one outer index

        def read(first: int, end: int) -> np.ndarray:  # slab elements [first, end) of the piece
            return self._slice(shard["file"], name, (slice(first - lo, end - lo),))

        full_lo, full_hi = max(oa, -(-lo // per)), min(ob, hi // per)  # outer indices held whole
        if full_lo < full_hi:
            block = read(full_lo * per, full_hi * per).reshape(full_hi - full_lo, rows, inner)
            out[full_lo - o0: full_hi - o0, x0 - r0: x1 - r0] = block[:, x0 - start: x1 - start]
        for o in sorted({oa, ob - 1} - set(range(full_lo, full_hi))):  # partly held: first, last
            first, end = max(lo, o * per + a), min(hi, o * per + b)
            if first < end:
                dst = out[o - o0, x0 - r0: x1 - r0].reshape(-1)  # contiguous: whole inner rows
                dst[first - o * per - a: end - o * per - a] = read(first, end)

    def read_range(
        self, name: str, split_axis: int | None, start: int | None, stop: int | None, lo: int, hi: int,
        expect_shape: tuple[int, ...] | None = None,
    ) -> np.ndarray:
        """Elements [lo, hi) of the C-order flattening of the slab of global rows [start, stop)
        along `split_axis` (the whole tensor if None), zeros past the logical length: a sharded
        optimizer's range of a parameter, read without the rest of the slab (at most one
        index of the outer axes more at each end). Collective over comm."""
        with _agree(self._comm):
            out = self._read_range(name, split_axis, start, stop, lo, hi, expect_shape)
        return out

    def _read_range(
        self, name: str, split_axis: int | None, start: int | None, stop: int | None, lo: int, hi: int,
        expect_shape: tuple[int, ...] | None,
    ) -> np.ndarray:
        t, axis, start, stop = self._request(name, split_axis, start, stop, expect_shape)
        gshape = tuple(t["global_shape"])
        k = _pieces_axis(name, t, axis) if _has_pieces(t) else axis
        if axis is None:
            start, stop = (0, 1) if k is None else (0, gshape[k])
        outer, rows, inner = slab_rows_view(gshape, k, stop - start)
        if not (_is_int(lo) and _is_int(hi)) or not 0 <= lo <= hi <= outer * rows * inner:
            raise ValueError(f"tensor {name!r}: elements [{lo}, {hi}) are not in [0, {outer * rows * inner})")
        out = np.empty(hi - lo, dtype=np.dtype(t["dtype"]))
        per = rows * inner
        o = lo // per if per else 0
        while lo < hi:  # one outer index at a time at the ends, the whole ones between in one read
            if lo % per == 0 and hi - lo >= per:
                n = (hi - lo) // per
                part = self._rows3(t, name, k, o, o + n, start, stop).reshape(-1)
            else:
                end = min(hi, (o + 1) * per)
                a, b = (lo - o * per) // inner, -(-(end - o * per) // inner)  # rows that hold them
                part = self._rows3(t, name, k, o, o + 1, start + a, start + b).reshape(-1)
                part = part[lo - o * per - a * inner: end - o * per - a * inner]
            out[out.size - (hi - lo): out.size - (hi - lo) + part.size] = part
            lo += part.size
            o = lo // per
        return out

    def _slice(self, fname: str, name: str, src: tuple[slice, ...]) -> np.ndarray:
        from safetensors import safe_open

        fpath = self.path / fname
        try:
            if fname not in self._handles:
                if self._verify:
                    self._check_sha256(fname)
                self._handles[fname] = safe_open(str(fpath), framework="numpy")
            handle = self._handles[fname]
            return handle.get_slice(name)[src] if src else handle.get_tensor(name)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint file {fpath} is missing") from None
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            raise ValueError(
                f"checkpoint file {fpath}: cannot read tensor {name!r}: {exc}"
            ) from None

    def _check_sha256(self, fname: str) -> None:
        """Hash `fname` (streamed in chunks) against the index: local, before its first read."""
        fpath = self.path / fname
        try:
            digest = sha256_file(fpath)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint file {fpath} is missing") from None
        except OSError as exc:
            raise OSError(f"checkpoint file {fpath} cannot be read: {exc}") from None
        want = self._index["files"][fname]
        if digest != want:
            raise ValueError(f"checkpoint file {fpath} is corrupt: sha256 {digest}, the index records {want}")

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
                self._check_sha256(fname)

    def close(self) -> None:
        """Release the memory maps of the shard files (local)."""
        self._handles.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _has_pieces(t: dict) -> bool:
    return any("elements" in s for s in t["shards"])


def _pieces_axis(name: str, t: dict, axis: int | None) -> int | None:
    """The axis whose rows the pieces' slabs are: the saved split axis (a read along another
    is an error: pieces are runs of a slab's flattening), or the reader's for a replicated tensor."""
    saved = t["split_axis"]
    if saved is None:
        return axis
    if axis is not None and axis != saved:
        raise ValueError(
            f"tensor {name!r} is stored in pieces of slabs split along axis {saved}: "
            f"it can be read along that axis or whole, not along axis {axis}"
        )
    return saved


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


def load_range(
    reader: CheckpointReader, name: str, *, global_shape: tuple[int, ...], split_axis: int | None,
    start: int | None, stop: int | None, lo: int, hi: int,
) -> np.ndarray:
    """Elements [lo, hi) of a rank's slab of `name` (flattened in C order), as load_shard
    would return the slab; collective over reader's comm."""
    return reader.read_range(name, split_axis, start, stop, lo, hi, tuple(global_shape))
